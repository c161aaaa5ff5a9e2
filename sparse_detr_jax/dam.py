"""The decoder cross-attention map (DAM): Sparse DETR's training target for the scoring network.

Every decoder sampling location splats its attention weight onto its 4 neighbouring tokens with
bilinear shares (official `util/dam.py::attn_map_to_flat_grid`: `floor(loc * size)`, no half-pixel
shift, corners outside the level get nothing), summed over decoder layers and heads.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from sparse_detr_jax.deformable_attention import corner_indices_and_weights, level_start_index


def attention_map(
  spatial_shapes: Sequence[tuple[int, int]], locations: jnp.ndarray, weights: jnp.ndarray
) -> jnp.ndarray:
  """DAM over the flat token grid. locations (B, L_dec, Q, M, L, P, 2), weights (B, L_dec, Q, M, L, P) -> (B, N)."""
  b = locations.shape[0]
  n = int(sum(h * w for h, w in spatial_shapes))
  idx, w = corner_indices_and_weights(spatial_shapes, locations, weights, pixel_offset=0.0)  # (..., L, P, 4)
  return jax.vmap(lambda i, x: jnp.zeros((n,), x.dtype).at[i].add(x))(idx.reshape(b, -1), w.reshape(b, -1))


def dam_target(dam: jnp.ndarray, padding_mask: jnp.ndarray, counts: jnp.ndarray) -> jnp.ndarray:
  """Binary target: the top counts[b] tokens of image b's DAM (padded tokens never). (B, N) float32."""
  k = dam.shape[1]
  dam = jnp.where(padding_mask, jnp.min(dam) - 1, dam)  # below every real token, as official
  _, order = jax.lax.top_k(dam, k)  # (B, N) tokens by decreasing attention
  positive = jnp.arange(k)[None, :] < counts[:, None]
  return jax.vmap(lambda o, p: jnp.zeros((k,), jnp.float32).at[o].set(p.astype(jnp.float32)))(order, positive)


def mask_prediction_loss(scores: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
  """torch multilabel_soft_margin_loss: mean over tokens of the logistic loss, then mean over images."""
  per_token = target * jax.nn.softplus(-scores) + (1 - target) * jax.nn.softplus(scores)
  return jnp.mean(jnp.mean(per_token, axis=1))


def kept_attention_share(
  dam: jnp.ndarray, kept: jnp.ndarray, slot_valid: jnp.ndarray, spatial_shapes: Sequence[tuple[int, int]]
) -> dict[str, jnp.ndarray]:
  """The official `corr_mask_attn_map_dec_*` metrics: share of the DAM mass on kept tokens, overall and per level.

  dam (B, N); kept (B, K) token indices; slot_valid (B, K) the slots the official code counts.
  """
  b, n = dam.shape
  on_kept = jax.vmap(lambda i, v: jnp.zeros((n,), jnp.float32).at[i].max(v.astype(jnp.float32)))(kept, slot_valid)
  hit = on_kept * dam
  out = {"corr_mask_attn_map_dec_all": jnp.mean(hit.sum(-1) / dam.sum(-1))}
  starts = level_start_index(spatial_shapes)
  for lvl, (h, w) in enumerate(spatial_shapes):
    sl = slice(int(starts[lvl]), int(starts[lvl]) + h * w)
    out[f"corr_mask_attn_map_dec_{lvl}"] = jnp.mean(hit[:, sl].sum(-1) / dam[:, sl].sum(-1))
  return out
