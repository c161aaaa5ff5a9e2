"""Every checkpoint this project reads, in one place, and the one model-compatibility check.

A checkpoint is one of
- an official Sparse DETR `.pth` (architecture from its `args`; COCO's label map for 91 classes),
- a directory written by `sparse_detr_jax.convert` (`variables/`, `config.json`, `labels.json`),
- a training workdir (its latest complete checkpoint) or one of its step directories WORKDIR/checkpoints/N
  (architecture from WORKDIR/config.json, label map from WORKDIR/labels.json).

`find` says which, with its architecture and label map, reading no weights; `load` reads the weights into the
model a config asks for, after `check_model` has compared the checkpoint's variable shapes with that model's:
a mismatch is one ValueError naming the config fields that differ and the values the checkpoint implies, before
anything is compiled.
"""

import contextlib
import dataclasses
import functools
import json
import logging
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from sparse_detr_jax import config as config_lib
from sparse_detr_jax import convert
from sparse_detr_jax import model as model_lib
from sparse_detr_jax import workdir as workdir_lib
from sparse_detr_jax.data import categories

Shapes = dict[str, tuple[int, ...]]  # 'params/level_embed' -> (4, 256)
# Model fields that never change the variables (how the model computes, not what it holds).
NO_WEIGHTS = ("dtype", "scan_layers", "dropout", "rho", "aux_loss")
COMPUTE_FIELDS = ("dtype", "scan_layers")  # how a model computes: inference takes them from a given config


@dataclasses.dataclass
class Checkpoint:
  """What a path holds. model_config is None only for a step directory whose workdir has no config.json."""

  path: pathlib.Path  # the weights: the .pth, the converted directory, or the step directory
  kind: str  # 'official' | 'converted' | 'training'
  model_config: ml_collections.ConfigDict | None
  run_config: ml_collections.ConfigDict | None  # a training checkpoint's whole config (WORKDIR/config.json)
  names: dict[int, str] | None  # the label map; None where the names cannot be known
  directory: pathlib.Path  # where results about it go: the training workdir, else the directory holding it
  step: int | None = None  # training checkpoints
  state: dict[str, np.ndarray] | None = dataclasses.field(default=None, repr=False)  # a .pth's tensors, read once
  args: dict[str, Any] | None = dataclasses.field(default=None, repr=False)  # a .pth's official args

  def describe(self) -> str:
    return f"{self.path} (step {self.step})" if self.step is not None else str(self.path)


def _latest_step(checkpoints: pathlib.Path) -> int | None:
  with contextlib.closing(ocp.CheckpointManager(checkpoints, item_names=("state", "data"))) as mngr:
    return mngr.latest_step()


def find(path: str) -> Checkpoint:
  """The checkpoint at `path` (see the module docstring), or a FileNotFoundError / ValueError naming it."""
  p = pathlib.Path(path).expanduser().absolute()
  if p.suffix == ".pth" or p.is_file():  # pth.load names what any other file holds
    state, args = convert.read_checkpoint(str(p))
    if args is None:
      raise ValueError(f"{path}: the checkpoint has no 'args', so its architecture is unknown")
    mc = convert.config_from_args(args, state)
    names = categories.for_official(mc.num_classes)
    return Checkpoint(p, "official", mc, None, names, p.parent, state=state, args=args)
  if (p / "variables").is_dir() and (p / convert.CONFIG_FILE).is_file():
    return Checkpoint(p, "converted", convert.read_config(str(p)), None, categories.read(p), p)
  if (p / "checkpoints").is_dir():
    workdir, step = p, _latest_step(p / "checkpoints")
    if step is None:
      raise FileNotFoundError(f"{p / 'checkpoints'}: no complete checkpoint step directory")
    p = p / "checkpoints" / str(step)
  elif p.parent.name == "checkpoints" and p.name.isdigit() and p.is_dir():
    workdir, step = p.parent.parent, int(p.name)
  else:
    raise FileNotFoundError(
      f"{path}: {'no such file or directory' if not p.exists() else 'no checkpoint in this directory'}: "
      "expected an official .pth, a directory written by sparse_detr_jax.convert, a training workdir "
      "or a checkpoint step directory WORKDIR/checkpoints/N"
    )
  run = workdir_lib.load_config(str(workdir)) if (workdir / workdir_lib.CONFIG_FILE).is_file() else None
  return Checkpoint(p, "training", run.model if run else None, run, categories.read(workdir), workdir, step)


@functools.lru_cache(maxsize=16)
def _shapes_of(model_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
  model = model_lib.build_model(config_lib.from_json(json.loads(model_json)))
  flat = traverse_util.flatten_dict(model_lib.variable_shapes(model))
  return tuple(sorted(("/".join(k), tuple(v.shape)) for k, v in flat.items()))


def model_shapes(model_config: ml_collections.ConfigDict) -> Shapes:
  """{variable path: shape} of the model a config builds (nothing is computed)."""
  return dict(_shapes_of(model_config.to_json(sort_keys=True)))


def _stored_shapes(step_dir: pathlib.Path) -> Shapes:
  """A training checkpoint's variable shapes from its metadata (no array is read)."""
  with contextlib.closing(ocp.CheckpointManager(step_dir.parent, item_names=("state", "data"))) as mngr:
    state = mngr.item_metadata(int(step_dir.name))["state"]
  flat = traverse_util.flatten_dict({"params": state["params"], **state["constants"]})
  return {"/".join(k): tuple(v.shape) for k, v in flat.items()}


def implied_fields(shapes: Shapes) -> dict[str, Any]:
  """The model fields that a set of variable shapes shows plainly (for checkpoints that carry no config)."""
  out: dict[str, Any] = {}
  if "params/level_embed" in shapes:
    out["num_feature_levels"], out["hidden_dim"] = shapes["params/level_embed"]
  if "params/class_embed_0/kernel" in shapes:
    out["num_classes"] = shapes["params/class_embed_0/kernel"][-1]
  for field, prefix in (("enc_layers", "params/encoder_layers_"), ("dec_layers", "params/decoder_layers_")):
    out[field] = len({k[len(prefix) :].split("/")[0] for k in shapes if k.startswith(prefix)})
  if "params/encoder_layers_0/linear1/kernel" in shapes:
    out["dim_feedforward"] = shapes["params/encoder_layers_0/linear1/kernel"][-1]
  return out


def _model_fields(c: ml_collections.ConfigDict) -> dict[str, Any]:
  return workdir_lib.flatten(json.loads(c.to_json(sort_keys=True)))


def check_model(
  ckpt: Checkpoint, wanted: ml_collections.ConfigDict, what: str, allow_num_classes: bool = False
) -> list[str]:
  """Raise ValueError, in one line, when the checkpoint's variables do not fit the model `wanted` builds: the
  config fields that differ, with the values the checkpoint implies. Returns the differing fields that change
  no variable (logged). allow_num_classes: the class heads may differ (fine-tuning re-initialises them)."""
  wanted = ml_collections.ConfigDict(wanted.to_dict())
  stored = None if ckpt.model_config else _stored_shapes(ckpt.path)
  if allow_num_classes:
    found_classes = ckpt.model_config.num_classes if ckpt.model_config else implied_fields(stored).get("num_classes")
    wanted.num_classes = found_classes or wanted.num_classes
  if ckpt.model_config:
    a, b = _model_fields(ckpt.model_config), _model_fields(wanted)
    differ = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
  else:
    b = _model_fields(wanted)
    differ = {k: (v, b.get(k)) for k, v in implied_fields(stored).items() if v != b.get(k)}
  if ckpt.model_config and not differ:
    return []
  found_shapes = stored or model_shapes(ckpt.model_config)
  try:
    fits = model_shapes(wanted) == found_shapes
  except ValueError as e:  # the config cannot build a model at all
    raise ValueError(f"{what}: {e}") from None
  if fits:
    return [f"model.{k}: {x!r} in the checkpoint, {y!r} in the config" for k, (x, y) in differ.items()]
  culprits = {k: v for k, v in differ.items() if k.split(".")[0] not in NO_WEIGHTS}
  if culprits:
    fields = "; ".join(f"model.{k} = {x!r} in the checkpoint, {y!r} in the config" for k, (x, y) in culprits.items())
    fix = " ".join(f"--config.model.{k}={_flag_value(x)}" for k, (x, _) in culprits.items())
    raise ValueError(f"{what}: its weights do not fit the config's model: {fields} (to use it, set {fix})")
  wanted_shapes = model_shapes(wanted)
  bad = sorted(k for k in set(found_shapes) | set(wanted_shapes) if found_shapes.get(k) != wanted_shapes.get(k))
  listed = ", ".join(f"{k} {found_shapes.get(k)} vs {wanted_shapes.get(k)}" for k in bad[:4])
  raise ValueError(f"{what}: its weights do not fit the config's model ({len(bad)} variables: {listed} ...)")


def _flag_value(v: Any) -> str:
  return f"'{tuple(v)}'" if isinstance(v, list | tuple) else str(v)


def restore_variables(step_dir: str) -> dict:
  """{'params', ...constants} of a training checkpoint step directory, on this host's first device whatever
  topology saved it (e.g. a multi-host run evaluated on one machine)."""
  path = pathlib.Path(step_dir).absolute()
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with contextlib.closing(
    ocp.CheckpointManager(
      path.parent,
      item_names=("state", "data"),
      item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
    )
  ) as ckpt:
    target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), ckpt.item_metadata(int(path.name))["state"]
    )
    state = ckpt.restore(int(path.name), args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  return {"params": state["params"], **state["constants"]}


def load(
  ckpt: Checkpoint, model_config: ml_collections.ConfigDict | None = None, what: str | None = None
) -> tuple[Any, dict]:
  """(model, variables) of a checkpoint: its own model (`inference_model_config`'s compute fields aside), or
  `model_config` where the checkpoint carries none (a step directory without its workdir's config.json), after
  check_model. model_config must otherwise build the checkpoint's variables."""
  what = what or ckpt.describe()
  mc = model_config if model_config is not None else ckpt.model_config
  if ckpt.model_config is None:
    if model_config is None:
      raise FileNotFoundError(
        f"{what}: {ckpt.directory / workdir_lib.CONFIG_FILE} not found, so the model is unknown: give --config"
      )
    check_model(ckpt, model_config, what)
  model = model_lib.build_model(mc)
  if ckpt.kind == "official":
    return model, convert.convert_state_dict(ckpt.state, mc)
  if ckpt.kind == "converted":
    return model, convert.restore_converted(str(ckpt.path), model)
  return model, restore_variables(str(ckpt.path))


def inference_model_config(ckpt: Checkpoint, cfg: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict | None:
  """The model inference runs: the checkpoint's architecture, computed as a given config says (COMPUTE_FIELDS).
  A config's other model fields are not used (said in the log where they differ): it gives the data settings."""
  if ckpt.model_config is None or cfg is None:
    return ckpt.model_config
  mc = ml_collections.ConfigDict(ckpt.model_config.to_dict())
  for field in COMPUTE_FIELDS:
    if field in cfg.model:
      mc[field] = cfg.model[field]
  a, b = _model_fields(mc), _model_fields(cfg.model)
  differ = [f"model.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
  if differ:
    logging.info(
      "the model is the checkpoint's (%s); the config's model block differs (%s) and is not used",
      ckpt.describe(),
      ", ".join(differ[:6]) + (" ..." if len(differ) > 6 else ""),
    )
  return mc
