"""The official optimiser: AdamW with three learning-rate groups, global-norm clipping, a step drop.

Groups (official main.py): the backbone at `lr_backbone`; parameters whose name contains
`sampling_offsets` or `reference_points` at lr * `lr_linear_proj_mult`; the rest at `lr`. Both lr
and lr_backbone are scaled by sqrt(global_batch / 16) (official util.misc.scale_learning_rate) and
multiplied by 0.1 after `lr_drop` epochs. Weight decay applies to every parameter, as official.
Frozen parameters (official requires_grad=False) get no update and do not count in the clipping norm:
the ResNet stem and layer1 always; Swin's patch embedding and first stage when `freeze_early_backbone`.
"""

from typing import Any

import jax
import optax

LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")
FROZEN_PREFIXES = {
  "resnet50": ("backbone/conv1", "backbone/layer1_"),
  "swin-t": ("backbone/patch_embed", "backbone/layers_0_"),
  "none": (),
  "small_convnet": (),
}


def param_labels(params: Any, backbone: str, freeze_early_backbone: bool) -> Any:
  """'frozen' | 'backbone' | 'linear_proj' | 'base' for every parameter leaf."""
  frozen = FROZEN_PREFIXES[backbone] if freeze_early_backbone else ()

  def label(path, _):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name.startswith(frozen):
      return "frozen"
    if name.startswith("backbone/"):
      return "backbone"
    if any(n in name for n in LINEAR_PROJ_NAMES):
      return "linear_proj"
    return "base"

  return jax.tree_util.tree_map_with_path(label, params)


def scaled_lr(lr: float, global_batch: int) -> float:
  """Official square-root scaling: lr * sqrt(global_batch / 16)."""
  return lr * (global_batch / 16) ** 0.5


def make_optimizer(
  t, model_config, params: Any, global_batch: int, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
  """(optimizer, lr schedule per group) from the config's `train` block `t`."""
  drop = {t.lr_drop * steps_per_epoch: 0.1}
  base, backbone = scaled_lr(t.lr, global_batch), scaled_lr(t.lr_backbone, global_batch)
  schedules = {
    "base": optax.piecewise_constant_schedule(base, drop),
    "backbone": optax.piecewise_constant_schedule(backbone, drop),
    "linear_proj": optax.piecewise_constant_schedule(base * t.lr_linear_proj_mult, drop),
  }
  adamw = {k: optax.adamw(s, b1=0.9, b2=0.999, eps=1e-8, weight_decay=t.weight_decay) for k, s in schedules.items()}
  labels = param_labels(params, model_config.backbone, t.freeze_early_backbone)
  tx = optax.chain(
    optax.multi_transform({"frozen": optax.set_to_zero(), **{k: optax.identity() for k in adamw}}, labels),
    optax.clip_by_global_norm(t.clip_max_norm) if t.clip_max_norm > 0 else optax.identity(),
    optax.multi_transform({"frozen": optax.set_to_zero(), **adamw}, labels),
  )
  return tx, schedules
