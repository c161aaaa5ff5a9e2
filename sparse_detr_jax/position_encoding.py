"""Sine position embeddings: of feature-map pixels (from the padding mask) and of two-stage query boxes."""

import math

import jax
import jax.numpy as jnp

TEMPERATURE = 10000.0
SCALE = 2 * math.pi
NORMALIZE_EPS = 1e-6


def _interleave_sin_cos(x: jnp.ndarray, num_feats: int) -> jnp.ndarray:
  """x (...,) -> (..., num_feats): [sin(x/t_0), cos(x/t_0), sin(x/t_1), ...] as the official stack/flatten."""
  dim_t = jnp.arange(num_feats, dtype=jnp.float32)
  dim_t = TEMPERATURE ** (2 * (dim_t // 2) / num_feats)
  pos = x[..., None] / dim_t  # (..., F)
  pos = jnp.stack([jnp.sin(pos[..., 0::2]), jnp.cos(pos[..., 1::2])], axis=-1)
  return pos.reshape(*x.shape, num_feats)


def sine_position_embedding(mask: jnp.ndarray, num_feats: int = 128) -> jnp.ndarray:
  """Normalised sine embedding of a feature map from its padding mask.

  mask: (B, H, W) bool, True on padding. Returns (B, H, W, 2 * num_feats) = concat(pos_y, pos_x).
  """
  not_mask = (~mask).astype(jnp.float32)
  y = jnp.cumsum(not_mask, axis=1)  # (B, H, W)
  x = jnp.cumsum(not_mask, axis=2)
  y = (y - 0.5) / (y[:, -1:, :] + NORMALIZE_EPS) * SCALE
  x = (x - 0.5) / (x[:, :, -1:] + NORMALIZE_EPS) * SCALE
  return jnp.concatenate([_interleave_sin_cos(y, num_feats), _interleave_sin_cos(x, num_feats)], axis=-1)


def box_position_embedding(boxes_unact: jnp.ndarray, num_feats: int = 128) -> jnp.ndarray:
  """Embedding of two-stage query boxes: (B, Q, 4) unsigmoided -> (B, Q, 4 * num_feats)."""
  b = jax.nn.sigmoid(boxes_unact) * SCALE
  pos = _interleave_sin_cos(b, num_feats)  # (B, Q, 4, F)
  return pos.reshape(*b.shape[:-1], 4 * num_feats)
