"""Official Sparse DETR checkpoints (.pth) -> Flax variables, and back to disk with Orbax.

    python -m sparse_detr_jax.convert CKPT.pth OUT_DIR [--num_classes K]

writes OUT_DIR/variables (Orbax), OUT_DIR/config.json (the model) and OUT_DIR/labels.json (COCO's category names
for the official 91 class logits; none with --num_classes, whose new class heads have no names yet).
Checkpoints of the original Deformable DETR code lack the Sparse DETR fields of `args` and are refused.

    from sparse_detr_jax import convert
    model, variables, config = convert.load_official("sparse_detr_r50_10.pth")

The checkpoint is read without PyTorch (`pth.load`), allowing only tensors, containers and
`argparse.Namespace`: a pickle that would run code is refused. Every official key maps to exactly one
variable; keys the official model stores twice (shared heads, `transformer.decoder.class_embed` ...)
must hold equal tensors. Unknown, missing or mis-shaped keys are an error that lists them.
"""

import argparse
import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from sparse_detr_jax import config as config_lib
from sparse_detr_jax import pth
from sparse_detr_jax.data import categories
from sparse_detr_jax.model import (
  SparseDETR,
  build_model,
  heads_are_cloned,
  init_variables,
  num_prediction_heads,
  variable_shapes,
)
from sparse_detr_jax.swin import relative_position_index

Path = tuple[str, ...]
CONFIG_FILE = "config.json"  # the model config beside a converted checkpoint (`save`)
# The official argparse fields that define the architecture (see config.model_config).
ARCH_ARGS = (
  "backbone",
  "hidden_dim",
  "nheads",
  "enc_layers",
  "dec_layers",
  "dim_feedforward",
  "dropout",
  "num_feature_levels",
  "enc_n_points",
  "dec_n_points",
  "num_queries",
  "with_box_refine",
  "two_stage",
  "eff_query_init",
  "eff_specific_head",
  "use_enc_aux_loss",
  "rho",
  "aux_loss",
)


def _linear(w: np.ndarray) -> np.ndarray:
  return w.T


def _conv(w: np.ndarray) -> np.ndarray:
  return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO


def _same(w: np.ndarray) -> np.ndarray:
  return w


def _param_kind(leaf: str, ndim: int) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
  """Flax leaf name and transform for a torch leaf of a Linear / norm / conv module."""
  if leaf == "bias":
    return "bias", _same
  if ndim == 4:
    return "kernel", _conv
  if ndim == 2:
    return "kernel", _linear
  return "scale", _same  # LayerNorm / GroupNorm weight


def head_aliases(c: ml_collections.ConfigDict) -> dict[str, list[int]]:
  """The official model's second registrations of its prediction heads: {'encoder' | 'decoder': the head indices
  that `transformer.<which>.class_embed.<j>` / `.bbox_embed.<j>` are, j = 0, 1, ...}. Two-stage models give the
  decoder the whole head list; the encoder aux loss gives the encoder its last enc_layers - 1 heads (as official,
  by Python's slice [-(enc_layers - 1):], which is the whole list for one encoder layer)."""
  heads = list(range(num_prediction_heads(c)))
  out = {}
  if c.two_stage:
    out["decoder"] = heads
  if c.use_enc_aux_loss:
    out["encoder"] = heads[-(c.enc_layers - 1) :]
  return out


class KeyMapper:
  """Maps official state_dict keys to (collection, flax path, transform) for one model config."""

  def __init__(self, c: ml_collections.ConfigDict):
    self.c = c
    self.cloned = heads_are_cloned(c)
    self.aliases = head_aliases(c)

  def head(self, i: int) -> str:
    return str(i if self.cloned else 0)

  def __call__(self, key: str, ndim: int) -> tuple[str, Path, Callable] | None:
    parts = key.split(".")
    leaf = parts[-1]
    m = re.fullmatch(r"transformer\.(encoder|decoder)\.(class_embed\.|bbox_embed\.)(\d+)(\..+)", key)
    if m:  # second registrations of the top-level head list
      heads = self.aliases.get(m.group(1), [])
      j = int(m.group(3))
      return self(f"{m.group(2)}{heads[j]}{m.group(4)}", ndim) if j < len(heads) else None
    m = re.fullmatch(r"class_embed\.(\d+)\.(weight|bias)", key)
    if m:
      name, fn = _param_kind(leaf, ndim)
      return "params", (f"class_embed_{self.head(int(m.group(1)))}", name), fn
    m = re.fullmatch(r"bbox_embed\.(\d+)\.layers\.(\d+)\.(weight|bias)", key)
    if m:
      name, fn = _param_kind(leaf, ndim)
      return "params", (f"bbox_embed_{self.head(int(m.group(1)))}", f"layers_{m.group(2)}", name), fn
    if key == "transformer.level_embed":
      return "params", ("level_embed",), _same
    if key == "query_embed.weight":
      return "params", ("query_embed",), _same
    m = re.fullmatch(r"input_proj\.(\d+)\.([01])\.(weight|bias)", key)
    if m:
      name, fn = _param_kind(leaf, ndim)
      return "params", (f"input_proj_{m.group(1)}", "conv" if m.group(2) == "0" else "norm", name), fn
    m = re.fullmatch(r"transformer\.enc_mask_predictor\.layer([12])\.(\d)\.(weight|bias)", key)
    if m:
      sub = {
        ("1", "0"): "layer1_norm",
        ("1", "1"): "layer1_linear",
        ("2", "0"): "layer2_linear0",
        ("2", "2"): "layer2_linear1",
        ("2", "4"): "layer2_linear2",
      }.get((m.group(1), m.group(2)))
      if sub is None:
        return None
      name, fn = _param_kind(leaf, ndim)
      return "params", ("mask_predictor", sub, name), fn
    m = re.fullmatch(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m:
      layer = f"{m.group(1)}_layers_{m.group(2)}"
      mod = m.group(3).split(".")
      name, fn = _param_kind(leaf, ndim)
      return "params", (layer, *mod, name), fn
    m = re.fullmatch(r"transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)", key)
    if m:
      return (
        "params",
        (f"decoder_layers_{m.group(1)}", "self_attn", "in_proj_" + ("kernel" if ndim == 2 else "bias")),
        _linear if ndim == 2 else _same,
      )
    m = re.fullmatch(
      r"transformer\.(enc_output|enc_output_norm|pos_trans|pos_trans_norm|reference_points)\.(weight|bias)", key
    )
    if m:
      name, fn = _param_kind(leaf, ndim)
      return "params", (m.group(1), name), fn
    if key.startswith("backbone.0.body."):
      return self.backbone(parts[3:], ndim)
    return None

  def backbone(self, parts, ndim: int) -> tuple[str, Path, Callable] | None:
    """ResNet-50 (torchvision names; frozen BN tensors go to `batch_stats`) or Swin -> backbone/..."""
    if self.c.backbone == "swin-t":
      return self.swin(parts, ndim)
    if self.c.backbone != "resnet50":
      return None
    if parts[0].startswith("layer"):
      block, rest = f"{parts[0]}_{parts[1]}", parts[2:]
      if rest[0] == "downsample":
        rest = ["downsample_conv" if rest[1] == "0" else "downsample_bn"] + rest[2:]
      path = ("backbone", block, rest[0])
    else:
      path, rest = ("backbone", parts[0]), parts
    leaf = rest[-1]
    if "bn" in path[-1]:
      return "batch_stats", path + (leaf,), _same
    if leaf == "weight" and ndim == 4:
      return "params", path + ("kernel",), _conv
    return None

  @staticmethod
  def swin(parts, ndim: int) -> tuple[str, Path, Callable] | None:
    """Official Swin names: layers.i.blocks.j.X / layers.i.downsample.X / patch_embed.X / normI."""
    name = ".".join(parts[:-1])
    leaf = parts[-1]
    m = re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", name)
    if m:
      path = (f"layers_{m.group(1)}_blocks_{m.group(2)}", *m.group(3).replace("mlp.", "mlp_").split("."))
    elif re.fullmatch(r"layers\.\d+\.downsample\.reduction", name):
      return "params", ("backbone", f"layers_{parts[1]}_downsample", "reduction_kernel"), _linear
    elif re.fullmatch(r"layers\.\d+\.downsample\.norm", name):
      path = (f"layers_{parts[1]}_downsample", "norm")
    elif name in ("patch_embed.proj", "patch_embed.norm") or re.fullmatch(r"norm\d", name):
      path = (name.replace(".", "_"),)
    else:
      return None
    if leaf == "relative_position_bias_table":
      return "params", ("backbone", *path, leaf), _same
    kind, fn = _param_kind(leaf, ndim)
    return "params", ("backbone", *path, kind), fn


def swin_config_from_state(state: dict[str, np.ndarray]) -> dict[str, Any]:
  """Swin widths, depths, heads and window size read off a state_dict's tensor shapes."""
  pre = "backbone.0.body."
  embed = int(state[pre + "patch_embed.proj.weight"].shape[0])
  depths, heads = [], []
  while any(k.startswith(f"{pre}layers.{len(depths)}.") for k in state):
    i = len(depths)
    depths.append(len({k.split(".")[6] for k in state if k.startswith(f"{pre}layers.{i}.blocks.")}))
    heads.append(int(state[f"{pre}layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1]))
  table = state[f"{pre}layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
  window = (int(round(table**0.5)) + 1) // 2
  return dict(embed_dim=embed, depths=tuple(depths), num_heads=tuple(heads), window_size=window)


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
  """Read an official .pth safely, without PyTorch: (state_dict as float32 numpy, args as dict or None)."""
  ckpt = pth.load(path)
  if isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
    sd, args = ckpt["model"], ckpt.get("args")
  elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, np.ndarray) for v in ckpt.values()):
    sd, args = ckpt, None
  else:
    raise pth.CheckpointError(
      f"{path}: a PyTorch file, but not a checkpoint: expected {{'model': state_dict, 'args': Namespace}} or a "
      f"bare state_dict, found {type(ckpt).__name__}"
      + (f" with keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else "")
    )
  bad = sorted(k for k, v in sd.items() if not isinstance(v, np.ndarray))
  if bad:
    raise pth.CheckpointError(f"{path}: state_dict entries that are not tensors: {bad[:8]}")
  state = {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16" else v
           for k, v in sd.items()}  # fmt: skip
  return state, (vars(args) if isinstance(args, argparse.Namespace) else args)


def config_from_args(args: dict[str, Any], state: dict[str, np.ndarray]) -> ml_collections.ConfigDict:
  """Model config from the official argparse values (and the class count from the head's shape)."""
  missing = [k for k in ARCH_ARGS if k not in args]
  if missing:
    raise ValueError(f"checkpoint args: missing fields {missing}")
  if args.get("dilation"):
    raise ValueError("checkpoint args.dilation: dilated ResNet (DC5) models are not supported")
  if args.get("masks"):
    raise ValueError("checkpoint args.masks: segmentation models are not supported")
  c = config_lib.model_config(**{k: args[k] for k in ARCH_ARGS})
  c.rho = float(c.rho or 0.0)
  if c.backbone == "swin-t":
    c.swin.update(swin_config_from_state(state))
  if "class_embed.0.weight" in state:
    c.num_classes = int(state["class_embed.0.weight"].shape[0])
  return c


def convert_state_dict(
  state: dict[str, np.ndarray], c: ml_collections.ConfigDict, skip: Callable[[str], bool] = lambda k: False
) -> dict[str, Any]:
  """Official state_dict -> Flax variables {'params': ..., 'batch_stats': ...} checked against the model."""
  mapper = KeyMapper(c)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  source: dict[tuple[str, ...], str] = {}
  unknown, conflicts = [], []
  for key, value in state.items():
    if key.endswith("num_batches_tracked") or skip(key):
      continue
    if key.endswith("relative_position_index"):  # a buffer we compute: it must be the one we compute
      if c.backbone != "swin-t" or not np.array_equal(value, relative_position_index(c.swin.window_size)):
        conflicts.append(f"{key} is not the relative position index of window {c.swin.window_size}")
      continue
    target = mapper(key, value.ndim)
    if target is None:
      unknown.append(key)
      continue
    coll, path, fn = target
    full = (coll,) + path
    arr = np.ascontiguousarray(fn(value))
    if full in flat:
      if flat[full].shape != arr.shape or not np.array_equal(flat[full], arr):
        conflicts.append(f"{key} != {source[full]}")
      continue
    flat[full], source[full] = arr, key
  model = build_model(c)
  expected = traverse_util.flatten_dict(variable_shapes(model))
  expected = {k: v for k, v in expected.items() if not skip_path(k, skip)}
  missing = sorted("/".join(k) for k in expected if k not in flat)
  extra = sorted(source[k] for k in flat if k not in expected)
  bad_shape = sorted(
    f"{source[k]}: {flat[k].shape} vs {expected[k].shape}"
    for k in flat
    if k in expected and flat[k].shape != expected[k].shape
  )
  problems = [
    f"{name}: {items}"
    for name, items in (
      ("unknown keys", unknown),
      ("keys with no Flax variable", extra),
      ("missing Flax variables", missing),
      ("shape mismatches", bad_shape),
      ("aliases that differ", conflicts),
    )
    if items
  ]
  if problems:
    raise ValueError("official state_dict does not match the model:\n  " + "\n  ".join(problems))
  return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})


def skip_path(path: tuple[str, ...], skip: Callable[[str], bool]) -> bool:
  """Whether a Flax path belongs to a module the caller re-initialises (class heads when re-heading)."""
  return skip("class_embed.") and any(p.startswith("class_embed_") for p in path)


def load_official(
  path: str, num_classes: int | None = None, seed: int = 0
) -> tuple[SparseDETR, dict[str, Any], ml_collections.ConfigDict]:
  """Load an official checkpoint: (model, variables, config).

  num_classes: to fine-tune on another dataset, the class heads are dropped and re-initialised (official
  init, rng `seed`) for this many classes; every other weight comes from the checkpoint.
  """
  state, args = read_checkpoint(path)
  if args is None:
    raise ValueError(f"{path}: the checkpoint has no 'args', so its architecture is unknown")
  c = config_from_args(args, state)
  reinit = num_classes is not None and num_classes != c.num_classes
  if reinit:
    c.num_classes = int(num_classes)
  skip = (lambda k: "class_embed." in k) if reinit else (lambda k: False)
  variables = convert_state_dict(state, c, skip)
  model = build_model(c)
  if reinit:
    fresh = init_variables(model, jax.random.PRNGKey(seed))
    for name, value in fresh["params"].items():
      if name.startswith("class_embed_"):
        variables["params"][name] = value
  return model, variables, c


def save(out_dir: str, variables: dict[str, Any], c: ml_collections.ConfigDict, names: dict[int, str] | None) -> None:
  """Write variables as an Orbax checkpoint (OUT_DIR/variables), the model config (OUT_DIR/config.json) and the
  label map (OUT_DIR/labels.json; none where the names are unknown)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(out_dir, "variables"), variables, force=True)
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(c.to_dict(), f, indent=2, sort_keys=True)
  if names is not None:
    categories.write(out_dir, names)


def read_config(out_dir: str) -> ml_collections.ConfigDict:
  """The model config `save` wrote (OUT_DIR/config.json)."""
  cfg_path = os.path.join(os.path.abspath(out_dir), CONFIG_FILE)
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{cfg_path}: not found; expected a directory written by sparse_detr_jax.convert")
  with open(cfg_path) as f:
    return config_lib.model_config(**config_lib.from_json(json.load(f)))


def restore_converted(out_dir: str, model: SparseDETR) -> dict[str, Any]:
  """The variables `save` wrote, restored for `model`."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(os.path.abspath(out_dir), "variables"), variable_shapes(model))


def load_converted(out_dir: str) -> tuple[SparseDETR, dict[str, Any], ml_collections.ConfigDict]:
  """Read what `save` wrote: (model, variables, config)."""
  c = read_config(out_dir)
  model = build_model(c)
  return model, restore_converted(out_dir, model), c


def load_torchvision_resnet50(path: str, variables: dict[str, Any]) -> dict[str, Any]:
  """Replace the backbone of `variables` with torchvision's ResNet-50 ImageNet weights.

  `path`: a bare torchvision state_dict, e.g. resnet50-0676ba61.pth (as the official code starts from);
  the classifier (`fc.*`) is ignored. Every backbone variable must be covered, with the same shape.
  """
  state, _ = read_checkpoint(path)
  mapper = KeyMapper(config_lib.model_config(backbone="resnet50"))
  flat = traverse_util.flatten_dict(variables)
  found, unknown = set(), []
  for key, value in state.items():
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
      continue
    target = mapper("backbone.0.body." + key, value.ndim)
    if target is None:
      unknown.append(key)
      continue
    coll, sub, fn = target
    full = (coll,) + sub
    if full not in flat or flat[full].shape != fn(value).shape:
      unknown.append(f"{key} {value.shape}")
      continue
    flat[full] = jnp.asarray(fn(value))
    found.add(full)
  missing = sorted("/".join(k) for k in flat if k[1] == "backbone" and k not in found)
  if unknown or missing:
    raise ValueError(
      f"{path}: not a torchvision ResNet-50 state_dict for this model: unknown or mis-shaped "
      f"{unknown[:10]}, missing {missing[:10]}"
    )
  return traverse_util.unflatten_dict(flat)


def main(argv: list[str]) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel

  from sparse_detr_jax import cli  # pylint: disable=import-outside-toplevel

  if len(argv) != 3:
    cli.usage_error("give the official checkpoint and the output directory: CKPT.pth OUT_DIR")
  num_classes = flags.FLAGS.num_classes
  if num_classes is not None and num_classes < 1:
    cli.usage_error(f"--num_classes: expected a positive number of class logits, got {num_classes}")
  _, variables, c = load_official(argv[1], num_classes)
  names = categories.for_official(c.num_classes) if num_classes is None else None
  save(argv[2], variables, c, names)
  n = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
  named = "COCO's category names" if names else f"{c.num_classes} class logits without names (new class heads)"
  print(f"wrote {argv[2]}: {n / 1e6:.2f}M parameters, backbone {c.backbone}, rho {c.rho}, {named}")


if __name__ == "__main__":
  from absl import flags as absl_flags

  from sparse_detr_jax import cli as cli_lib

  absl_flags.DEFINE_integer("num_classes", None, "re-initialise the class heads for this many class logits")
  cli_lib.run(main)
