"""The official post-processing: the top detections over queries x classes, boxes in image pixels."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from sparse_detr_jax import box_ops

NUM_DETECTIONS = 100  # per image, as official (COCO evaluation keeps at most 100)


def postprocess(
  outputs: dict[str, jnp.ndarray],
  image_sizes: jnp.ndarray,
  num_detections: int = NUM_DETECTIONS,
  class_ids: Sequence[int] | None = None,
) -> dict[str, jnp.ndarray]:
  """Top `num_detections` (query, class) pairs by sigmoid score (all of them if there are fewer).

  outputs: pred_logits (B, Q, C), pred_boxes (B, Q, 4) cxcywh in [0, 1]; image_sizes: (B, 2) (h, w) of the
  original images; class_ids: rank only these classes (a model's label map; the others score 0 and come last),
  None: all, as official. Returns scores (B, D), labels (B, D) int, boxes (B, D, 4) xyxy in pixels of that size.
  """
  logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
  b, q, c = logits.shape
  if class_ids is not None:
    ranked = jnp.zeros(c, bool).at[jnp.asarray(sorted(class_ids), jnp.int32)].set(True)  # (C,)
    logits = jnp.where(ranked, logits, -jnp.inf)
  scores, idx = jax.lax.top_k(jax.nn.sigmoid(logits).reshape(b, q * c), min(num_detections, q * c))  # (B, D)
  query, labels = idx // c, idx % c
  xyxy = jnp.take_along_axis(box_ops.cxcywh_to_xyxy(boxes), query[..., None], axis=1)  # (B, D, 4)
  h, w = image_sizes[:, 0].astype(jnp.float32), image_sizes[:, 1].astype(jnp.float32)
  scale = jnp.stack([w, h, w, h], -1)[:, None, :]
  return {"scores": scores, "labels": labels, "boxes": xyxy * scale}
