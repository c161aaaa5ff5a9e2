"""Compiled programs saved on one machine and loaded on another: a pod's first step without compiling.

`python -m sparse_detr_jax.preflight ... --save_compiled DIR` writes, for every canvas it compiles, the serialized
executable (`jax.experimental.serialize_executable`) of the train step and of the inference function, and
DIR/manifest.json: what must match for a saved program to be the program a run would compile (JAX and jaxlib
versions, the backend and its plugin, the devices in the mesh's order, per-chip batch, the epoch length the
learning-rate schedule is built with, the compiler flags, and a hash of every config field that changes the
program, with the fields themselves). `train.py --compiled_dir DIR` (and evaluate.py's, for the inference
function; `Loader`) loads a canvas's executable instead of compiling it when everything matches; otherwise one
log line names each field that differs, with the saved and the running value, and the run compiles as it would
without DIR. The devices are compared before anything is loaded (loading onto other devices would abort the process).

A saved program is as trusted as code: loading it unpickles it, which can run anything. Load only what you (or
your own pipeline) wrote.
"""

import hashlib
import importlib.metadata
import json
import logging
import os
import pathlib
import pickle
from typing import Any

import jax
import ml_collections
from jax.experimental import serialize_executable

from sparse_detr_jax import workdir as workdir_lib

FORMAT = "sparse_detr_jax.compiled/1"
MANIFEST = "manifest.json"
# Config fields (or `block.` prefixes) that never change a compiled program: what the run reads, watches and
# stores, the data's paths and augmentation (the canvas is the program's input shape, recorded per file).
NOT_IN_PROGRAM = (
  *(h for h in workdir_lib.HARMLESS if h != "model.scan_layers"),
  "train.seed",
  "train.batch_size",  # the manifest's per_chip_batch
  "eval.batch_size",
  "train.init_checkpoint",
  "train.backbone_checkpoint",
  "data.",
)
PLUGINS = ("libtpu", "jax-cuda13-plugin", "jax-cuda12-plugin")


def _excluded(field: str) -> bool:
  return any(field == h or (h.endswith(".") and field.startswith(h)) for h in NOT_IN_PROGRAM)


def program_fields(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config fields that change the compiled train step and inference function (data.max_boxes included)."""
  flat = workdir_lib.flatten(json.loads(cfg.to_json_best_effort()))
  return {k: v for k, v in sorted(flat.items()) if not _excluded(k) or k == "data.max_boxes"}


def _plugin_versions() -> dict[str, str]:
  out = {}
  for name in PLUGINS:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def _devices(mesh: jax.sharding.Mesh) -> list[str]:
  return [f"{d.id}:{d.device_kind}" for d in mesh.devices.flat]


def expected(
  cfg: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  per_chip_batch: int,
  steps_per_epoch: int | None,
  platform: str | None = None,
) -> dict[str, Any]:
  """Everything a saved program must share with a run to be its program (the manifest's fields but the files).
  steps_per_epoch: None for a run of the inference function only (evaluate.py), which has no schedule; platform:
  the target's (preflight), default the mesh's."""
  fields = program_fields(cfg)
  if platform is None:  # this process's devices (JAX says 'gpu' where preflight's topologies say 'cuda')
    platform = {"gpu": "cuda"}.get(mesh.devices.flat[0].platform, mesh.devices.flat[0].platform)
  return {
    "format": FORMAT,
    "jax": jax.__version__,
    "jaxlib": importlib.metadata.version("jaxlib"),
    "plugins": _plugin_versions() if platform != "cpu" else {},
    "compiler": mesh.devices.flat[0].client.platform_version,  # libtpu's build, the CUDA plugin's, or 'cpu'
    "platform": platform,
    "devices": _devices(mesh),
    "per_chip_batch": int(per_chip_batch),
    "steps_per_epoch": None if steps_per_epoch is None else int(steps_per_epoch),
    "flags": {k: os.environ.get(k, "") for k in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")},
    "config_sha256": hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest(),
    "config": fields,
  }


def file_name(function: str, canvas: tuple[int, int]) -> str:
  return f"{function}_{canvas[0]}x{canvas[1]}.xla"


class Writer:
  """Writes serialized executables and, on `close`, the manifest (`expected` plus the files per canvas)."""

  def __init__(self, directory: str, manifest: dict[str, Any]):
    self.root = pathlib.Path(directory)
    self.root.mkdir(parents=True, exist_ok=True)
    self.manifest = {**manifest, "programs": {}}

  def add(self, function: str, canvas: tuple[int, int], compiled: Any) -> None:
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    name = file_name(function, canvas)
    tmp = self.root / f".{name}.tmp"
    tmp.write_bytes(pickle.dumps((payload, in_tree, out_tree)))
    os.replace(tmp, self.root / name)
    self.manifest["programs"][f"{function} {canvas[0]}x{canvas[1]}"] = name

  def close(self) -> None:
    (self.root / MANIFEST).write_text(json.dumps(self.manifest, indent=1))


class Loader:
  """The executables of a --compiled_dir that match this run (see the module docstring); `load` is None for a
  canvas without one, or for every canvas after a mismatch (logged once, naming the fields)."""

  def __init__(self, directory: str, want: dict[str, Any], mesh: jax.sharding.Mesh):
    self.root = pathlib.Path(directory)
    self.mesh = mesh
    self.loaded = 0
    path = self.root / MANIFEST
    if not path.is_file():
      raise FileNotFoundError(f"{path}: not found; expected a directory written by preflight --save_compiled")
    saved = json.loads(path.read_text())
    self.programs: dict[str, str] = saved.get("programs", {})
    self.mismatches = [
      f"{k}: {saved.get(k, '<absent>')!r} saved, {v!r} in this run"
      for k, v in want.items()
      if k not in ("config", "config_sha256") and v is not None and saved.get(k) != v
    ]
    a, b = saved.get("config", {}), want["config"]
    self.mismatches += [
      f"{k}: {a.get(k, '<absent>')!r} saved, {b.get(k, '<absent>')!r} in this run"
      for k in sorted(set(a) | set(b))
      if a.get(k) != b.get(k)
    ]
    for line in self.mismatches:
      logging.warning("%s: not used, every program compiles: %s", self.root, line)

  def load(self, function: str, canvas: tuple[int, int]) -> Any | None:
    name = self.programs.get(f"{function} {canvas[0]}x{canvas[1]}")
    if self.mismatches or name is None:
      return None
    payload, in_tree, out_tree = pickle.loads((self.root / name).read_bytes())
    compiled = serialize_executable.deserialize_and_load(
      payload, in_tree, out_tree, execution_devices=list(self.mesh.devices.flat)
    )
    self.loaded += 1
    logging.info("%s %dx%d: loaded from %s (not compiled)", function, canvas[0], canvas[1], self.root / name)
    return compiled
