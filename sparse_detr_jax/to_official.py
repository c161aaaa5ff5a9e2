"""Flax variables -> the official Sparse DETR checkpoint: `{'model': state_dict, 'args': Namespace}`, as the
official `main.py` saves it, written without PyTorch (`pth.save`).

    python -m sparse_detr_jax.export --checkpoint PATH --format pth --out model.pth

The state_dict is the inverse of `convert`: every official key the model's config implies (the heads the official
model registers twice, its Swin relative-position buffers), float32 in the official layouts, and `convert` maps
each key back to the variable it came from (a key that does not is an error, never a guess). `args` is the official
argparse defaults with the model's architecture and, for a training checkpoint, the run's optimiser and loss
settings of the same names: the official code builds the model from it (`models.build_model(args)`) and loads the
state_dict with strict=True. Two things the official args cannot say, and the files say so when written: the class
count (the official build takes 91 for COCO) and Swin widths other than swin-t's.
"""

import argparse
import re
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

from sparse_detr_jax import config as config_lib
from sparse_detr_jax import convert, pth
from sparse_detr_jax.model import num_prediction_heads
from sparse_detr_jax.swin import relative_position_index

# The official main.py's argparse defaults (its get_args_parser() parsed without flags).
OFFICIAL_DEFAULTS: dict[str, Any] = {
  "lr": 2e-4, "lr_backbone_names": ["backbone.0"], "lr_backbone": 2e-5,
  "lr_linear_proj_names": ["reference_points", "sampling_offsets"], "lr_linear_proj_mult": 0.1, "batch_size": 2,
  "weight_decay": 1e-4, "epochs": 50, "lr_drop": 40, "lr_drop_epochs": None, "clip_max_norm": 0.1, "sgd": False,
  "with_box_refine": False, "two_stage": False, "frozen_weights": None, "backbone": "resnet50", "dilation": False,
  "position_embedding": "sine", "position_embedding_scale": 6.283185307179586, "num_feature_levels": 4,
  "backbone_from_scratch": False, "finetune_early_layers": False, "scrl_pretrained_path": "", "enc_layers": 6,
  "dec_layers": 6, "dim_feedforward": 1024, "hidden_dim": 256, "dropout": 0.1, "nheads": 8, "num_queries": 300,
  "dec_n_points": 4, "enc_n_points": 4, "eff_query_init": False, "eff_specific_head": False,
  "use_enc_aux_loss": False, "rho": 0.0, "masks": False, "aux_loss": True, "set_cost_class": 2, "set_cost_bbox": 5,
  "set_cost_giou": 2, "mask_loss_coef": 1, "dice_loss_coef": 1, "cls_loss_coef": 2, "bbox_loss_coef": 5,
  "giou_loss_coef": 2, "mask_prediction_coef": 1, "focal_alpha": 0.25, "dataset_file": "coco",
  "coco_path": "./data/coco", "coco_panoptic_path": None, "remove_difficult": False, "output_dir": "",
  "device": "cuda", "seed": 42, "resume": "", "start_epoch": 0, "eval": False, "num_workers": 2,
  "cache_mode": False, "approx_benchmark_only": False, "benchmark_only": False, "benchmark": True,
}  # fmt: skip
OFFICIAL_NUM_CLASSES = 91  # what the official build() gives a COCO model
_INVERSE = {convert._linear: np.transpose, convert._conv: lambda w: w.transpose(3, 2, 0, 1), convert._same: None}
_MASK_PREDICTOR = {  # Flax module -> official `enc_mask_predictor` index
  "layer1_norm": "layer1.0",
  "layer1_linear": "layer1.1",
  "layer2_linear0": "layer2.0",
  "layer2_linear1": "layer2.2",
  "layer2_linear2": "layer2.4",
}
_TRANSFORMER_MODULES = ("enc_output", "enc_output_norm", "pos_trans", "pos_trans_norm", "reference_points")


_RENAMED = {  # Flax backbone module -> official
  "downsample_conv": "downsample.0",
  "downsample_bn": "downsample.1",
  "mlp_fc1": "mlp.fc1",
  "mlp_fc2": "mlp.fc2",
  "patch_embed_proj": "patch_embed.proj",
  "patch_embed_norm": "patch_embed.norm",
}
_SWIN_SHAPE = ("embed_dim", "depths", "num_heads", "window_size")


def _module_name(part: str) -> str:
  """A Flax module name inside the backbone -> the official dotted one (ResNet `layer1_0`, Swin
  `layers_0_blocks_1`, `layers_1_downsample`, ...)."""
  if m := re.fullmatch(r"layer(\d)_(\d+)", part):
    return f"layer{m.group(1)}.{m.group(2)}"
  if m := re.fullmatch(r"layers_(\d+)_(blocks)_(\d+)|layers_(\d+)_(downsample)", part):
    return ".".join(["layers", *(g for g in m.groups() if g is not None)])
  return _RENAMED.get(part, part)


def official_name(path: tuple[str, ...]) -> str | None:
  """The official state_dict key of a Flax variable path (collection first); None for the prediction heads, whose
  keys come from `head_keys`."""
  coll, *mods, leaf = path
  name = {"kernel": "weight", "scale": "weight", "reduction_kernel": "reduction.weight"}.get(leaf, leaf)
  top = mods[0] if mods else leaf
  if top.startswith(("class_embed_", "bbox_embed_")):
    return None
  if top in ("level_embed", "query_embed"):
    return {"level_embed": "transformer.level_embed", "query_embed": "query_embed.weight"}[top]
  if top.startswith("input_proj_"):
    return f"input_proj.{top.split('_')[-1]}.{0 if mods[1] == 'conv' else 1}.{name}"
  if top == "mask_predictor":
    return f"transformer.enc_mask_predictor.{_MASK_PREDICTOR[mods[1]]}.{name}"
  if top.startswith(("encoder_layers_", "decoder_layers_")):
    which, _, index = top.split("_")
    if leaf.startswith("in_proj_"):
      name = "in_proj_" + ("weight" if leaf == "in_proj_kernel" else "bias")
    return ".".join(("transformer", which, "layers", index, *mods[1:], name))
  if top in _TRANSFORMER_MODULES:
    return f"transformer.{top}.{name}"
  if top == "backbone" and coll in ("params", "batch_stats"):
    return ".".join(("backbone.0.body", *(_module_name(m) for m in mods[1:]), name))
  raise ValueError(f"{'/'.join(path)}: no official name for this variable")


def head_keys(c: ml_collections.ConfigDict) -> list[str]:
  """The official keys of the prediction heads: the head list `class_embed.<i>` / `bbox_embed.<i>.layers.<k>` and
  its second registrations under the transformer (convert.head_aliases)."""
  lists = [("", range(num_prediction_heads(c)))]
  lists += [(f"transformer.{which}.", range(len(heads))) for which, heads in convert.head_aliases(c).items()]
  keys = []
  for prefix, indices in lists:
    for i in indices:
      keys += [f"{prefix}class_embed.{i}.{leaf}" for leaf in ("weight", "bias")]
      keys += [f"{prefix}bbox_embed.{i}.layers.{k}.{leaf}" for k in range(3) for leaf in ("weight", "bias")]
  return keys


def state_dict(variables: dict[str, Any], c: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The official state_dict of a model's variables {'params', 'batch_stats'?}: float32 arrays in the official
  layouts; a key the official model registers twice is the same array object (one storage when saved)."""
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables).items()}
  keys = [(name, v.ndim) for k, v in flat.items() if (name := official_name(k)) is not None]
  keys += [(key, 2 if key.endswith("weight") else 1) for key in head_keys(c)]  # Linear weights and biases
  mapper = convert.KeyMapper(c)
  out, used = {}, {}
  for key, ndim in keys:  # the official tensor's rank (the Flax variable's) picks the mapper's transform
    target = mapper(key, ndim)
    if target is None or (target[0], *target[1]) not in flat or flat[(target[0], *target[1])].ndim != ndim:
      raise ValueError(f"official key {key}: no variable of the model maps to it")
    coll, path, fn = target
    full = (coll, *path)
    if full not in used:
      inverse = _INVERSE[fn]
      value = flat[full].astype(np.float32) if np.issubdtype(flat[full].dtype, np.floating) else flat[full]
      used[full] = np.ascontiguousarray(value if inverse is None else inverse(value))
    out[key] = used[full]
  left = sorted("/".join(k) for k in flat if k not in used)
  if left:
    raise ValueError(f"variables with no official key: {left[:8]}")
  if c.backbone == "swin-t":  # buffers of the official Swin blocks
    for key in [k for k in out if k.endswith(".attn.relative_position_bias_table")]:
      out[key.replace("bias_table", "index")] = relative_position_index(c.swin.window_size).astype(np.int64)
  return out


def official_args(model_config: ml_collections.ConfigDict, run_config: ml_collections.ConfigDict | None = None):
  """The official argparse Namespace that builds this model: OFFICIAL_DEFAULTS with the architecture fields
  (convert.ARCH_ARGS) and a run config's optimiser (`train`) and loss (`loss`) fields of official names."""
  if model_config.backbone not in ("resnet50", "swin-t", "none"):
    raise ValueError(
      f"model.backbone: {model_config.backbone!r} has no official counterpart (official: resnet50, swin-t, none)"
    )
  values = dict(OFFICIAL_DEFAULTS)
  for block in ("train", "loss") if run_config is not None else ():
    values.update({k: v for k, v in run_config.get(block, {}).items() if k in OFFICIAL_DEFAULTS})
  if run_config is not None:
    values["finetune_early_layers"] = not run_config.train.get("freeze_early_backbone", True)
  values.update({k: model_config[k] for k in convert.ARCH_ARGS})
  values["rho"] = float(values["rho"])
  return argparse.Namespace(**{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})


def caveats(c: ml_collections.ConfigDict) -> list[str]:
  """What the official args cannot say about this model: what a user must change in the official code."""
  notes = []
  if c.num_classes != OFFICIAL_NUM_CLASSES:
    notes.append(
      f"{c.num_classes} class logits: the official build() makes {OFFICIAL_NUM_CLASSES} for COCO; pass "
      f"num_classes={c.num_classes} to its DeformableDETR to load this state_dict"
    )
  swin_t = config_lib.model_config().swin
  if c.backbone == "swin-t" and any(tuple(np.ravel(c.swin[k])) != tuple(np.ravel(swin_t[k])) for k in _SWIN_SHAPE):
    notes.append(
      f"Swin widths/depths {c.swin.embed_dim}/{tuple(c.swin.depths)}: the official code builds swin-t's "
      f"{swin_t.embed_dim}/{tuple(swin_t.depths)}"
    )
  return notes


def save(
  path: str, variables: dict[str, Any], model_config: ml_collections.ConfigDict, args: argparse.Namespace
) -> list[str]:
  """Write {'model': state_dict(variables), 'args': args} to `path` (pth.save); returns `caveats`."""
  pth.save(path, {"model": state_dict(variables, model_config), "args": args})
  return caveats(model_config)


def from_checkpoint(path: str, out: str, config: ml_collections.ConfigDict | None = None) -> list[str]:
  """The official checkpoint of what `path` holds (an official .pth, a converted directory, a training workdir or
  step: checkpoints.find), written to `out`; returns `caveats`. An official .pth keeps its own args; the others get
  `official_args` of their model and run config (a training workdir's, else `config`'s; `config` also gives the
  model of a step directory without its workdir's config.json)."""
  from sparse_detr_jax import checkpoints  # pylint: disable=import-outside-toplevel

  ckpt = checkpoints.find(path)
  _, variables = checkpoints.load(ckpt, None if ckpt.model_config is not None or config is None else config.model)
  mc = ckpt.model_config if ckpt.model_config is not None else config.model
  if ckpt.kind == "official":
    args = argparse.Namespace(**ckpt.args)
  else:
    args = official_args(mc, ckpt.run_config if ckpt.run_config is not None else config)
  return save(out, variables, mc, args)
