"""Host side of the training loop: what keeps an accelerator busy and a pod preemptible.

- `DevicePrefetch`: global batches placed on the devices ahead of the step that uses them.
- `StepExecutables`: one compiled step per canvas (bucket), compiled up front or on first sight.
- `PreemptionWatcher`: SIGTERM (one process) or JAX's preemption sync point (multi-host).
- `enable_compilation_cache`: JAX's persistent compilation cache for a run.
"""

import collections
import concurrent.futures
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

  def __init__(self, jitted: Callable, name: str = "train step", load: Callable[[tuple[int, int]], Any] | None = None):
    """load(canvas): an executable saved for that canvas (compiled.Loader), or None: compile."""
    self._jitted, self._name, self._load = jitted, name, load
    self._compiled: dict[tuple, Any] = {}
    self.seconds: dict[tuple, float] = {}
    self.loaded = 0

  @staticmethod
  def _key(batch: dict[str, Any]) -> tuple:
    return tuple(batch["image"].shape)

  def _loaded(self, key: tuple) -> bool:
    """Whether the executable of `key` is at hand: compiled before, or loaded now."""
    if key not in self._compiled and self._load is not None:
      executable = self._load(tuple(key[1:3]))
      if executable is not None:
        self._compiled[key] = executable
        self.loaded += 1
    return key in self._compiled

  def compile(self, state: Any, batch: dict[str, Any]) -> Any:
    key = self._key(batch)
    if not self._loaded(key):
      start = time.time()
      self._compiled[key] = self._jitted.lower(state, batch).compile()
      self.seconds[key] = time.time() - start
      logging.info("%s for batch %s: compiled in %.1f s", self._name, key, self.seconds[key])
    return self._compiled[key]

  def compile_all(
    self, state: Any, batch: dict[str, jax.Array], canvases: Sequence[tuple[int, int]], threads: int = 0
  ) -> None:
    """Compile for every canvas (h, w), from the shapes, dtypes and shardings of one real `batch`: lowered one
    after another (lowering holds Python's lock), compiled in `threads` threads at once (XLA compiles without
    it; 0: compile_threads' default)."""
    todo = []
    for h, w in canvases:
      abstract = {}
      for k, v in batch.items():
        shape = (v.shape[0], h, w) + v.shape[3:] if v.ndim >= 3 and k in ("image", "padding_mask") else v.shape
        abstract[k] = jax.ShapeDtypeStruct(shape, v.dtype, sharding=v.sharding)
      key = self._key(abstract)
      if not self._loaded(key) and key not in [k for k, _ in todo]:
        todo.append((key, self._jitted.lower(state, abstract)))
    start, threads = time.time(), compile_threads(threads, max(len(todo), 1))
    for key, compiled, seconds in parallel_compile(todo, threads):
      self._compiled[key], self.seconds[key] = compiled, seconds
      logging.info("%s for batch %s: compiled in %.1f s", self._name, key, seconds)
    if len(todo) > 1:
      logging.info("%d canvases: %.1f s to compile them all, %d at a time", len(todo), time.time() - start, threads)

  def __call__(self, state: Any, batch: dict[str, jax.Array]) -> Any:
    return self.compile(state, batch)(state, batch)


# Host memory one more concurrent compile may take: two ResNet-50 rho 0.1 train steps compiled at once for a v5e-16
# peaked at 20.3 GiB of resident memory, one at 16.0 GiB (benchmarks/compile_canvases.py measures it on the CPU).
COMPILE_GIB = 8.0


def _available_gib() -> float:
  try:
    with open("/proc/meminfo") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20
  except (OSError, StopIteration, ValueError):
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2**30


def compile_threads(threads: int, jobs: int) -> int:
  """How many programs to compile at once: `threads`, or (0) one per job, at most the host's cores and one per
  COMPILE_GIB of the memory available now."""
  if threads < 0:
    raise ValueError(f"compile threads: expected 0 (automatic) or a positive number, got {threads}")
  if threads:
    return max(1, min(jobs, threads))
  return max(1, min(jobs, os.cpu_count() or 1, int(_available_gib() // COMPILE_GIB)))


def parallel_compile(lowered: Sequence[tuple[Any, Any]], threads: int = 0) -> Iterator[tuple[Any, Any, float]]:
  """(key, compiled, seconds) for each (key, jax Lowered), in order, compiled in `compile_threads` threads: XLA
  releases Python's lock while it compiles, so canvases compile side by side on a many-core host."""

  def one(item: tuple[Any, Any]) -> tuple[Any, Any, float]:
    key, low = item
    start = time.time()
    return key, low.compile(), time.time() - start

  if not lowered:
    return
  with concurrent.futures.ThreadPoolExecutor(compile_threads(threads, len(lowered))) as pool:
    yield from pool.map(one, lowered)


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
