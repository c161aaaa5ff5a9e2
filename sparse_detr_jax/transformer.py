"""Deformable transformer pieces: encoder/decoder layers, reference points, proposals, top-k queries.

Tokens of all levels are flattened level by level, row-major inside a level (the official order), so
token indices agree with the official `backbone_topk_proposals` and two-stage query indices.
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparse_detr_jax import layers
from sparse_detr_jax.deformable_attention import MSDeformAttn, SpatialShapes

PROPOSAL_BASE_SIZE = 0.05  # two-stage proposal size at level l: 0.05 * 2**l
PROPOSAL_VALID_RANGE = (0.01, 0.99)  # a proposal is valid when all 4 numbers lie strictly inside


def valid_ratios(level_masks) -> jnp.ndarray:
  """(valid width / W, valid height / H) of every level from its first row/column: (B, L, 2)."""
  ratios = []
  for m in level_masks:  # (B, h, w)
    vh = jnp.sum(~m[:, :, 0], axis=1).astype(jnp.float32) / m.shape[1]
    vw = jnp.sum(~m[:, 0, :], axis=1).astype(jnp.float32) / m.shape[2]
    ratios.append(jnp.stack([vw, vh], -1))
  return jnp.stack(ratios, 1)


def encoder_reference_points(spatial_shapes: SpatialShapes, ratios: jnp.ndarray) -> jnp.ndarray:
  """Token centres normalised by their level's valid size, then scaled to every level: (B, N, L, 2)."""
  refs = []
  for lvl, (h, w) in enumerate(spatial_shapes):
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32) + 0.5, np.arange(w, dtype=np.float32) + 0.5, indexing="ij")
    ry = ys.reshape(-1)[None] / (ratios[:, None, lvl, 1] * h)  # (B, h*w)
    rx = xs.reshape(-1)[None] / (ratios[:, None, lvl, 0] * w)
    refs.append(jnp.stack([rx, ry], -1))
  ref = jnp.concatenate(refs, 1)  # (B, N, 2)
  return ref[:, :, None] * ratios[:, None]  # (B, N, L, 2)


def token_centres(n: int) -> np.ndarray:
  """(n + 1, n) float32: row v holds the centres (i + 0.5) / v of tokens i of a level whose valid extent is v
  tokens (row 0 unused), each correctly rounded, as PyTorch divides. XLA:CPU divides a vector by a scalar as
  a multiplication by the reciprocal, 1 ulp off (49.5 / 50 gives 0.98999995, not 0.99), which moves tokens across
  the proposals' 0.01 / 0.99 validity bounds: at an 800-pixel-high canvas the last row of level 1."""
  i = np.arange(n, dtype=np.float32)[None] + np.float32(0.5)
  return i / np.maximum(np.arange(n + 1, dtype=np.float32), 1)[:, None]


def encoder_proposals(padding_mask: jnp.ndarray, spatial_shapes: SpatialShapes) -> tuple[jnp.ndarray, jnp.ndarray]:
  """A box proposal for every token (official `gen_encoder_output_proposals`, geometry part).

  Centre ((x + 0.5) / valid_w, (y + 0.5) / valid_h) (from `token_centres`), size 0.05 * 2**level.
  padding_mask: (B, N). Returns proposals (B, N, 4) unsigmoided (+inf on padded or invalid tokens) and
  valid (B, N) bool.
  """
  b = padding_mask.shape[0]
  props, start = [], 0
  for lvl, (h, w) in enumerate(spatial_shapes):
    m = padding_mask[:, start : start + h * w].reshape(b, h, w)
    vh = jnp.sum(~m[:, :, 0], axis=1)  # (B,) valid rows
    vw = jnp.sum(~m[:, 0, :], axis=1)  # (B,) valid columns
    cx = jnp.broadcast_to(jnp.asarray(token_centres(w))[vw][:, None, :], (b, h, w)).reshape(b, -1)  # (B, h*w)
    cy = jnp.broadcast_to(jnp.asarray(token_centres(h))[vh][:, :, None], (b, h, w)).reshape(b, -1)
    wh = jnp.full_like(cx, PROPOSAL_BASE_SIZE * 2.0**lvl)
    props.append(jnp.stack([cx, cy, wh, wh], -1))
    start += h * w
  p = jnp.concatenate(props, 1)  # (B, N, 4)
  lo, hi = PROPOSAL_VALID_RANGE
  valid = jnp.all((p > lo) & (p < hi), axis=-1) & ~padding_mask
  safe = jnp.where(valid[..., None], p, 0.5)
  return jnp.where(valid[..., None], jnp.log(safe / (1 - safe)), jnp.inf), valid


class _LayerShape(nn.Module):
  """Sizes shared by encoder and decoder layers."""

  d_model: int
  d_ffn: int
  dropout: float
  n_levels: int
  n_heads: int
  n_points: int
  dtype: Any = None


class EncoderLayer(_LayerShape):
  """Deformable self-attention (queries may be a subset of tokens) + FFN, post-norm."""

  @nn.compact
  def __call__(
    self,
    query: jnp.ndarray,
    pos: jnp.ndarray,
    reference_points: jnp.ndarray,
    memory: jnp.ndarray,
    spatial_shapes: SpatialShapes,
    padding_mask: jnp.ndarray,
    deterministic: bool,
  ) -> jnp.ndarray:
    """query, pos: (B, Q, C) (Q = N dense, K sparse); memory: (B, N, C) values. Returns (B, Q, C)."""
    attn, _, _ = MSDeformAttn(
      self.d_model, self.n_levels, self.n_heads, self.n_points, dtype=self.dtype, name="self_attn"
    )(query + pos, reference_points, memory, spatial_shapes, padding_mask)
    x = layers.layer_norm("norm1", self.dtype)(query + nn.Dropout(self.dropout)(attn, deterministic))
    return _ffn(self, x, "linear1", "linear2", "norm2", deterministic)


def _ffn(mod: nn.Module, x: jnp.ndarray, l1: str, l2: str, norm: str, deterministic: bool) -> jnp.ndarray:
  """Linear -> ReLU -> dropout -> Linear -> dropout -> add & norm (called inside a compact module)."""
  y = nn.relu(layers.Linear(mod.d_ffn, kernel_init=layers.xavier_uniform, dtype=mod.dtype, name=l1)(x))
  y = nn.Dropout(mod.dropout)(y, deterministic)
  y = layers.Linear(mod.d_model, kernel_init=layers.xavier_uniform, dtype=mod.dtype, name=l2)(y)
  return layers.layer_norm(norm, mod.dtype)(x + nn.Dropout(mod.dropout)(y, deterministic))


class MultiheadAttention(nn.Module):
  """torch.nn.MultiheadAttention (packed in-projection), batch first: q = k = tgt + pos, v = tgt."""

  d_model: int
  n_heads: int
  dropout: float
  dtype: Any = None

  @nn.compact
  def __call__(self, qk: jnp.ndarray, v: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    b, q, c = qk.shape
    m, d = self.n_heads, c // self.n_heads
    # One xavier-initialised (C, 3C) matrix, as torch initialises in_proj_weight.
    w = self.param("in_proj_kernel", layers.xavier_uniform, (c, 3 * c), jnp.float32)
    bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * c,), jnp.float32)
    dt = self.dtype or qk.dtype
    w, bias = w.astype(dt), bias.astype(dt)
    split = lambda x: x.reshape(b, q, m, d)
    qh = split(layers.matmul(qk.astype(dt), w[:, :c]) + bias[:c]) / np.sqrt(d).astype(np.float32)
    kh = split(layers.matmul(qk.astype(dt), w[:, c : 2 * c]) + bias[c : 2 * c])
    vh = split(layers.matmul(v.astype(dt), w[:, 2 * c :]) + bias[2 * c :])
    probs = jax.nn.softmax(jnp.einsum("bqmd,bkmd->bmqk", qh, kh).astype(jnp.float32), -1).astype(dt)
    probs = nn.Dropout(self.dropout)(probs, deterministic)
    out = jnp.einsum("bmqk,bkmd->bqmd", probs, vh).reshape(b, q, c)
    return layers.Linear(
      c, kernel_init=layers.xavier_uniform, bias_init=nn.initializers.zeros, dtype=self.dtype, name="out_proj"
    )(out)


class DecoderLayer(_LayerShape):
  """Self-attention -> add & norm -> deformable cross-attention -> add & norm -> FFN -> add & norm."""

  @nn.compact
  def __call__(
    self,
    tgt: jnp.ndarray,
    query_pos: jnp.ndarray,
    reference_points: jnp.ndarray,
    memory: jnp.ndarray,
    spatial_shapes: SpatialShapes,
    padding_mask: jnp.ndarray,
    deterministic: bool,
  ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """tgt, query_pos: (B, Q, C); reference_points: (B, Q, L, 2|4); memory: (B, N, C).

    Returns (B, Q, C), sampling locations (B, Q, M, L, P, 2), attention weights (B, Q, M, L, P).
    """
    sa = MultiheadAttention(self.d_model, self.n_heads, self.dropout, self.dtype, name="self_attn")(
      tgt + query_pos, tgt, deterministic
    )
    tgt = layers.layer_norm("norm2", self.dtype)(tgt + nn.Dropout(self.dropout)(sa, deterministic))
    ca, loc, attw = MSDeformAttn(
      self.d_model, self.n_levels, self.n_heads, self.n_points, dtype=self.dtype, name="cross_attn"
    )(tgt + query_pos, reference_points, memory, spatial_shapes, padding_mask)
    tgt = layers.layer_norm("norm1", self.dtype)(tgt + nn.Dropout(self.dropout)(ca, deterministic))
    return _ffn(self, tgt, "linear1", "linear2", "norm3", deterministic), loc, attw


class TopKQueries(NamedTuple):
  indices: jnp.ndarray  # (B, Q) token index of each query
  boxes_unact: jnp.ndarray  # (B, Q, 4) detached, unsigmoided reference boxes


def select_topk_queries(
  enc_logits: jnp.ndarray, enc_boxes_unact: jnp.ndarray, num_queries: int, specific_head: bool
) -> TopKQueries:
  """Top-k two-stage decoder queries: the num_queries encoder tokens with the best objectness.

  enc_logits: (B, N, num_classes); with the class-specific head objectness is the max over classes,
  else the first logit. The selected boxes carry no gradient (as official).
  """
  objectness = jnp.max(enc_logits, -1) if specific_head else enc_logits[..., 0]  # (B, N)
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(objectness), num_queries)
  boxes = jax.vmap(lambda x, i: x[i])(enc_boxes_unact, idx)
  return TopKQueries(idx.astype(jnp.int32), jax.lax.stop_gradient(boxes))
