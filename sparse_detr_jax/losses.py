"""The Sparse DETR training objective, term by term as the official `SetCriterion`.

    loss_dict = losses.compute(outputs, targets, config)   # official key names
    loss = losses.total(loss_dict, config)                 # weighted sum with the official weight_dict

`config` has `config.model` (config.model_config) and `config.loss` (losses.loss_config). `targets`:
`labels` (B, M) int in 1..num_classes-1, `boxes` (B, M, 4) cxcywh normalised, `valid` (B, M) bool
(targets padded to a fixed M; images with no boxes are fine).

For every prediction set (last decoder layer '', earlier layers '_i', two-stage encoder output '_enc',
encoder aux layers '_enc_i'): Hungarian matching, `loss_ce` (sigmoid focal loss, summed over
predictions and classes, divided by the box count), `loss_bbox` (L1), `loss_giou`, and the logged
`cardinality_error` (and `class_error` for the last layer). With rho > 0: `loss_mask_prediction`
(scoring logits against the DAM target) and the `corr_mask_attn_map_dec_*` metrics. The box count is
the number of targets averaged over the devices of `axis_name` (inside shard_map), at least 1.

An official quirk kept on purpose: encoder aux outputs and the corr metrics cover K = max over the
(per-device) batch of `sparse_token_nums` slots for every image; slots past K are masked out.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sparse_detr_jax import box_ops, dam, matcher
from sparse_detr_jax import config as config_lib

DUMMY_BOX = (0.5, 0.5, 1.0, 1.0)  # stands in for padded targets so no NaN reaches the gradients


def loss_config(**overrides: Any) -> ml_collections.ConfigDict:
  """Official loss weights and matching costs."""
  c = ml_collections.ConfigDict()
  c.cls_loss_coef = 2.0
  c.bbox_loss_coef = 5.0
  c.giou_loss_coef = 2.0
  c.mask_prediction_coef = 1.0
  c.set_cost_class = 2.0
  c.set_cost_bbox = 5.0
  c.set_cost_giou = 2.0
  c.focal_alpha = 0.25
  c.matcher = "auto"  # 'scipy' (host callback), 'jax' (on-device exact solver), 'auto': jax on TPU
  c.update(overrides)
  return c


def weight_dict(config: ml_collections.ConfigDict) -> dict[str, float]:
  """The official weight_dict (including the unused `_backbone` entries, as official)."""
  m, l = config.model, config.loss
  base = {"loss_ce": l.cls_loss_coef, "loss_bbox": l.bbox_loss_coef, "loss_giou": l.giou_loss_coef}
  suffixes = [f"_{i}" for i in range(m.dec_layers - 1)] if m.aux_loss else []
  suffixes += ["_enc"] if m.two_stage else []
  suffixes += [f"_enc_{i}" for i in range(m.enc_layers - 1)] if m.use_enc_aux_loss else []
  suffixes += ["_backbone"] if m.rho else []
  out = dict(base)
  for s in suffixes:
    out.update({k + s: v for k, v in base.items()})
  out["loss_mask_prediction"] = l.mask_prediction_coef
  return out


def total(loss_dict: dict[str, jnp.ndarray], config: ml_collections.ConfigDict) -> jnp.ndarray:
  """Sum of loss * weight over the keys present in both."""
  return sum(loss_dict[k] * w for k, w in weight_dict(config).items() if k in loss_dict)


def sigmoid_focal_loss(logits: jnp.ndarray, targets: jnp.ndarray, alpha: float, gamma: float = 2.0) -> jnp.ndarray:
  """Element-wise focal loss (RetinaNet) of logits against {0, 1} targets."""
  prob = jax.nn.sigmoid(logits)
  ce = jax.nn.softplus(logits) - logits * targets  # binary cross-entropy with logits
  p_t = prob * targets + (1 - prob) * (1 - targets)
  alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
  return alpha_t * ce * (1 - p_t) ** gamma


def _check_targets(targets: dict[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
  for key in ("labels", "boxes", "valid"):
    if key not in targets:
      raise ValueError(f"targets: missing '{key}' (expected labels (B, M), boxes (B, M, 4), valid (B, M))")
  b, m = targets["valid"].shape
  if targets["labels"].shape != (b, m) or targets["boxes"].shape != (b, m, 4):
    raise ValueError(
      f"targets: expected labels (B, M), boxes (B, M, 4) with valid {(b, m)}, got "
      f"labels {targets['labels'].shape}, boxes {targets['boxes'].shape}"
    )
  valid = targets["valid"].astype(bool)
  return {
    "valid": valid,
    "labels": jnp.where(valid, targets["labels"], 0).astype(jnp.int32),
    "boxes": jnp.where(valid[..., None], targets["boxes"], jnp.asarray(DUMMY_BOX, jnp.float32)),
  }


def _set_losses(
  pred: dict[str, jnp.ndarray],
  targets: dict[str, jnp.ndarray],
  num_boxes: jnp.ndarray,
  slot_valid: jnp.ndarray,
  lc: ml_collections.ConfigDict,
  log: bool,
) -> dict[str, jnp.ndarray]:
  """Matching and the detection losses of one prediction set. pred: pred_logits (B, Q, C), pred_boxes (B, Q, 4)."""
  logits, boxes = pred["pred_logits"], pred["pred_boxes"]
  q, c = logits.shape[1:]
  assigned = matcher.match(logits, boxes, targets, slot_valid, lc)  # (B, M)
  matched = assigned >= 0
  safe = jnp.maximum(assigned, 0)
  onehot_q = jax.nn.one_hot(jnp.where(matched, assigned, -1), q)  # (B, M, Q)
  target_cls = jnp.einsum("bmq,bmc->bqc", onehot_q, jax.nn.one_hot(targets["labels"], c))
  focal = sigmoid_focal_loss(logits, target_cls, lc.focal_alpha) * slot_valid[..., None]
  src = jnp.take_along_axis(boxes, safe[..., None], axis=1)  # (B, M, 4)
  w = matched.astype(jnp.float32)
  l1 = jnp.sum(jnp.abs(src - targets["boxes"]), -1)
  giou = box_ops.generalized_iou(box_ops.cxcywh_to_xyxy(src), box_ops.cxcywh_to_xyxy(targets["boxes"]))
  out = {
    "loss_ce": jnp.sum(focal) / num_boxes,
    "loss_bbox": jnp.sum(l1 * w) / num_boxes,
    "loss_giou": jnp.sum((1 - giou) * w) / num_boxes,
  }
  # Logged, no gradient. Cardinality counts predictions whose argmax is not the last class (inherited quirk).
  sg = jax.lax.stop_gradient(logits)
  card_pred = jnp.sum((jnp.argmax(sg, -1) != c - 1) & slot_valid, 1)
  out["cardinality_error"] = jnp.mean(jnp.abs(card_pred - jnp.sum(targets["valid"], 1)).astype(jnp.float32))
  if log:
    src_top = jnp.argmax(jnp.take_along_axis(sg, safe[..., None], axis=1), -1)  # (B, M)
    n = jnp.sum(w)
    correct = jnp.sum((src_top == targets["labels"]) * w)
    out["class_error"] = jnp.where(n > 0, 100.0 - 100.0 * correct / jnp.maximum(n, 1.0), 100.0)
  return out


def _losses_of_sets(
  sets: list[dict[str, jnp.ndarray]],
  targets: dict[str, jnp.ndarray],
  num_boxes: jnp.ndarray,
  slot_valid: jnp.ndarray,
  lc: ml_collections.ConfigDict,
  stacked: bool,
) -> list[dict[str, jnp.ndarray]]:
  """`_set_losses` (with class_error) of prediction sets of one shape (the decoder layers', the encoder layers'):
  one by one, or with `stacked` vmapped over the stacked sets, so that the program holds one matching and one set
  of loss terms for them all (the same values)."""
  if not stacked or len(sets) == 1:
    return [_set_losses(p, targets, num_boxes, slot_valid, lc, log=True) for p in sets]
  preds = jax.tree.map(lambda *xs: jnp.stack(xs), *sets)  # (S, B, Q, ...)
  per = jax.vmap(lambda p: _set_losses(p, targets, num_boxes, slot_valid, lc, log=True))(preds)
  return [{k: v[i] for k, v in per.items()} for i in range(len(sets))]


def compute(
  outputs: dict[str, Any],
  targets: dict[str, jnp.ndarray],
  config: ml_collections.ConfigDict,
  axis_name: str | None = None,
) -> dict[str, jnp.ndarray]:
  """Every official loss term and logged metric, official names. See the module docstring."""
  mc, lc = config.model, config.loss
  targets = _check_targets(targets)
  num_boxes = jnp.sum(targets["valid"]).astype(jnp.float32)
  if axis_name is not None:
    num_boxes = jax.lax.pmean(num_boxes, axis_name)
  num_boxes = jnp.maximum(num_boxes, 1.0)
  every_slot = lambda p: jnp.ones(p["pred_logits"].shape[:2], bool)

  stacked = config_lib.scans_layers(mc)  # one traced copy of the matching and losses for same-shaped sets
  final = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
  decoder_sets = [*outputs.get("aux_outputs", []), final]
  per_set = _losses_of_sets(decoder_sets, targets, num_boxes, every_slot(outputs), lc, stacked)
  losses = per_set[-1]
  for i, set_losses in enumerate(per_set[:-1]):
    losses.update({f"{k}_{i}": v for k, v in set_losses.items() if k != "class_error"})
  if "enc_outputs" in outputs:
    enc_targets = targets if mc.eff_specific_head else dict(targets, labels=jnp.zeros_like(targets["labels"]))
    enc = _set_losses(outputs["enc_outputs"], enc_targets, num_boxes, every_slot(outputs["enc_outputs"]), lc, False)
    losses.update({f"{k}_enc": v for k, v in enc.items()})
  if "sparse_token_nums" in outputs:
    k_slots = outputs["backbone_topk_proposals"].shape[1]
    batch_slots = jnp.arange(k_slots)[None, :] < jnp.max(outputs["sparse_token_nums"])  # (1, K): official K
    batch_slots = jnp.broadcast_to(batch_slots, outputs["backbone_topk_proposals"].shape)
  enc_sets = outputs.get("aux_outputs_enc", [])
  if enc_sets:
    slots = batch_slots if "sparse_token_nums" in outputs else every_slot(enc_sets[0])
    for i, set_losses in enumerate(_losses_of_sets(enc_sets, targets, num_boxes, slots, lc, stacked)):
      losses.update({f"{k}_enc_{i}": v for k, v in set_losses.items() if k != "class_error"})
  if "backbone_mask_prediction" in outputs:
    shapes = [tuple(int(x) for x in hw) for hw in np.asarray(outputs["spatial_shapes"])]
    attn = jax.lax.stop_gradient(
      dam.attention_map(shapes, outputs["sampling_locations_dec"], outputs["attn_weights_dec"])
    )  # (B, N)
    target = dam.dam_target(attn, outputs["mask_flatten"], outputs["sparse_token_nums"])
    losses["loss_mask_prediction"] = dam.mask_prediction_loss(outputs["backbone_mask_prediction"], target)
    losses.update(dam.kept_attention_share(attn, outputs["backbone_topk_proposals"], batch_slots, shapes))
  return losses
