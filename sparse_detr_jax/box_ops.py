"""Box utilities shared by the model, the losses and post-processing (boxes are (cx, cy, w, h) unless named)."""

import jax.numpy as jnp

INVERSE_SIGMOID_EPS = 1e-5


def inverse_sigmoid(x: jnp.ndarray, eps: float = INVERSE_SIGMOID_EPS) -> jnp.ndarray:
  """log(x / (1 - x)) with the official clamping: x to [0, 1], both terms to at least eps."""
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1.0 - x, eps))


def cxcywh_to_xyxy(b: jnp.ndarray) -> jnp.ndarray:
  cx, cy, w, h = jnp.moveaxis(b, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(b: jnp.ndarray) -> jnp.ndarray:
  x0, y0, x1, y1 = jnp.moveaxis(b, -1, 0)
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(b: jnp.ndarray) -> jnp.ndarray:
  return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def generalized_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """GIoU of xyxy boxes, broadcasting: (..., 4) x (..., 4) -> (...).

  Pairwise: generalized_iou(a[:, None], b[None]) -> (N, M). Boxes must have positive area.
  """
  area_a, area_b = box_area(a), box_area(b)
  lt = jnp.maximum(a[..., :2], b[..., :2])
  rb = jnp.minimum(a[..., 2:], b[..., 2:])
  wh = jnp.clip(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = area_a + area_b - inter
  iou = inter / union
  lt_c = jnp.minimum(a[..., :2], b[..., :2])
  rb_c = jnp.maximum(a[..., 2:], b[..., 2:])
  wh_c = jnp.clip(rb_c - lt_c, 0)
  area_c = wh_c[..., 0] * wh_c[..., 1]
  return iou - (area_c - union) / area_c
