"""Host side of the training loop: what keeps an accelerator busy and a pod preemptible.

- `DevicePrefetch`: global batches placed on the devices ahead of the step that uses them.
- `StepExecutables`: one compiled step per canvas (bucket), compiled up front or on first sight.
- `PreemptionWatcher`: SIGTERM (one process) or JAX's preemption sync point (multi-host).
- `enable_compilation_cache`: JAX's persistent compilation cache for a run.
"""

import collections
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# train.py / evaluate.py --compilation_cache_dir default: $JAX_COMPILATION_CACHE_DIR, else a per-user directory.
DEFAULT_CACHE_DIR = os.environ.get(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "sparse_detr_jax", "jax")
)


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays sharded over the mesh's `data` axis (an async copy)."""
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


class DevicePrefetch:
  """Iterator of (global batch on the devices, host-local extras, data-iterator state after the batch).

  `size` batches are in flight: batch k+size-1 is read from the host loader and copied to the
  devices while the steps before k run (the copy is asynchronous). `keys` go to the devices; every
  other key of the host batch (image ids, skip counts) stays on the host. The state is taken right after
  each batch is read, so a checkpoint of the step that consumed the batch resumes at the next one.
  """

  def __init__(
    self, it: Iterator[dict[str, np.ndarray]], mesh: Mesh, keys: Sequence[str], size: int = 2, with_state: bool = True
  ):
    if size < 1:
      raise ValueError(f"prefetch size must be >= 1, got {size}")
    self._it, self._mesh, self._keys, self._size, self._with_state = it, mesh, tuple(keys), size, with_state
    self._queue: collections.deque = collections.deque()
    self._exhausted = False

  def _load(self) -> bool:
    try:
      local = next(self._it)
    except StopIteration:
      self._exhausted = True
      return False
    device = global_batch(self._mesh, {k: local[k] for k in self._keys})
    host = {k: v for k, v in local.items() if k not in self._keys}
    self._queue.append((device, host, self._it.get_state() if self._with_state else None))
    return True

  def __iter__(self) -> "DevicePrefetch":
    return self

  def __next__(self) -> tuple[dict[str, jax.Array], dict[str, np.ndarray], Any]:
    while len(self._queue) < self._size and not self._exhausted and self._load():
      pass
    if not self._queue:
      raise StopIteration
    return self._queue.popleft()


class StepExecutables:
  """The jitted step compiled once per batch shape (canvas); `compile_all` compiles a list up front.

  Calling it runs the executable of the batch's canvas, compiling (and logging the seconds) on first
  sight; with the persistent compilation cache on, a resumed run loads instead of compiling.
  """

  def __init__(self, jitted: Callable, name: str = "train step"):
    self._jitted, self._name = jitted, name
    self._compiled: dict[tuple, Any] = {}
    self.seconds: dict[tuple, float] = {}

  @staticmethod
  def _key(batch: dict[str, Any]) -> tuple:
    return tuple(batch["image"].shape)

  def compile(self, state: Any, batch: dict[str, Any]) -> Any:
    key = self._key(batch)
    if key not in self._compiled:
      start = time.time()
      self._compiled[key] = self._jitted.lower(state, batch).compile()
      self.seconds[key] = time.time() - start
      logging.info("%s for batch %s: compiled in %.1f s", self._name, key, self.seconds[key])
    return self._compiled[key]

  def compile_all(self, state: Any, batch: dict[str, jax.Array], canvases: Sequence[tuple[int, int]]) -> None:
    """Compile for every canvas (h, w), from the shapes, dtypes and shardings of one real `batch`."""
    for h, w in canvases:
      abstract = {}
      for k, v in batch.items():
        shape = (v.shape[0], h, w) + v.shape[3:] if v.ndim >= 3 and k in ("image", "padding_mask") else v.shape
        abstract[k] = jax.ShapeDtypeStruct(shape, v.dtype, sharding=v.sharding)
      self.compile(state, abstract)

  def __call__(self, state: Any, batch: dict[str, jax.Array]) -> Any:
    return self.compile(state, batch)(state, batch)


class PreemptionWatcher:
  """Has a preemption notice arrived? Ask `reached(step)` at every step, on every host.

  One process (no jax.distributed client): a SIGTERM handler sets a flag, and `reached` is true at the
  first step after it. Multi-host: JAX's preemption service (it catches SIGTERM on any host) and
  `reached` is true on every host at the same step, the sync point. Use it as a context manager: the
  previous SIGTERM handler comes back on exit.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    self._multihost = jax.distributed.is_initialized()

  def __enter__(self) -> "PreemptionWatcher":
    if not self._multihost and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._event.set()

  def reached(self, step: int) -> bool:
    if self._multihost:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # the preemption service is off (jax_enable_preemption_service=False)
        return False
    return self._event.is_set()


def default_compilation_cache() -> None:
  """What a library entry point (Detector) does: JAX's persistent compilation cache in DEFAULT_CACHE_DIR, unless
  the program has chosen a directory of its own or turned the cache off (`jax_enable_compilation_cache`)."""
  if jax.config.jax_enable_compilation_cache and not jax.config.jax_compilation_cache_dir:
    enable_compilation_cache(DEFAULT_CACHE_DIR)


def enable_compilation_cache(path: str | None) -> None:
  """Persist compiled programs under `path` ('' or None: off), so a rerun or resume loads them."""
  jax.config.update("jax_enable_compilation_cache", bool(path))
  if path:
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(path)))
