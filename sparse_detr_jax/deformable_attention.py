"""Multi-scale deformable attention (Zhu et al.), by gather-based bilinear sampling.

`deformable_sample` equals the official `ms_deform_attn_core_pytorch` (grid_sample with
align_corners=False, zero padding): every sampling point reads its 4 neighbouring value tokens; the
bilinear weights and the attention weight are folded into one weight per corner, and all levels are
read with one packed gather from the flat (all-level) value tensor (`gather_sample`). Queries go in blocks,
rematerialised for the backward pass, so memory stays bounded at full COCO resolution. On TPUs the same sum
is computed without a gather, as matrix products (`separable_sample`).
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparse_detr_jax import layers

SpatialShapes = Sequence[tuple[int, int]]
# Queries per block in deformable_sample: 4096 x 8 heads x 64 corners x 32 channels x 4 B = 268 MB of
# gathered corners per image.
QUERY_CHUNK = 4096
# Where separable_sample replaces the gather on TPUs (bfloat16 only). By XLA:TPU's cost model on v5e at 800x1333,
# 4 images, a layer's forward, output and gradients (benchmarks/tpu_sampling.py): a rho 0.1 encoder layer (2223
# queries) 38.0 ms, against the gather's 57.3 ms plus its row gather and scatter-add, which XLA does not price; a
# decoder layer (300 queries) 13.3 against 5.3 plus those; in float32, whose products must then run at full
# precision, 91.0 against 66.4 plus those.
SEPARABLE_MIN_QUERIES = 1024


def level_start_index(spatial_shapes: SpatialShapes) -> np.ndarray:
  """Offset of each level in the flat token axis: (L,) int."""
  sizes = [h * w for h, w in spatial_shapes]
  return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)


def corner_indices_and_weights(
  spatial_shapes: SpatialShapes, locations: jnp.ndarray, weights: jnp.ndarray, pixel_offset: float = 0.5
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Flat token index and folded weight of each bilinear corner of each sampling point.

  locations: (..., L, P, 2) normalised (x, y) in the padded canvas; weights: (..., L, P).
  pixel coordinate = loc * size - pixel_offset: 0.5 is grid_sample(align_corners=False); the
  official DAM uses 0 (no half-pixel shift).
  Returns idx (..., L, P, 4) int32 into the all-level token axis, and w (..., L, P, 4) with
  w = weight * bilinear share, 0 for corners outside their level.
  """
  hw = np.asarray(spatial_shapes, np.float32)  # (L, 2)
  h = jnp.asarray(hw[:, 0])[:, None]  # (L, 1)
  w = jnp.asarray(hw[:, 1])[:, None]
  start = jnp.asarray(level_start_index(spatial_shapes))[:, None]  # (L, 1)
  x = locations[..., 0] * w - pixel_offset  # (..., L, P)
  y = locations[..., 1] * h - pixel_offset
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx = x - x0
  fy = y - y0
  idx, wts = [], []
  for dy, dx, share in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
    xi = x0 + dx
    yi = y0 + dy
    inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
    flat = (
      start + jnp.clip(yi, 0, h - 1).astype(jnp.int32) * w.astype(jnp.int32) + jnp.clip(xi, 0, w - 1).astype(jnp.int32)
    )
    idx.append(flat)
    wts.append(jnp.where(inside, share * weights, 0.0))
  return jnp.stack(idx, -1), jnp.stack(wts, -1)


def _sample_block(value_rows: jnp.ndarray, rows: jnp.ndarray, wts: jnp.ndarray) -> jnp.ndarray:
  """The gather and weighted sum for one block of queries: value_rows (B * N * M, D), the row of each corner in
  it and the corner's weight (B, Q, M, K) with K = L * P * 4 -> (B, Q, M * D)."""
  b, q, m, _ = rows.shape
  d = value_rows.shape[1]
  dims = jax.lax.GatherDimensionNumbers(offset_dims=(4,), collapsed_slice_dims=(0,), start_index_map=(0,))
  corners = jax.lax.gather(  # (B, Q, M, K, D); rows are clipped into their level, so always in bounds
    value_rows, rows[..., None], dims, (1, d), mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS
  )
  out = jnp.einsum("bqmk,bqmkd->bqmd", wts.astype(value_rows.dtype), corners)  # (B, Q, M, D)
  return out.reshape(b, q, m * d)


def deformable_sample(
  value: jnp.ndarray,
  spatial_shapes: SpatialShapes,
  locations: jnp.ndarray,
  attention_weights: jnp.ndarray,
  query_chunk: int = QUERY_CHUNK,
) -> jnp.ndarray:
  """Attention-weighted bilinear sampling of a multi-level value map.

  value: (B, N, M, D) with N = sum(h_l * w_l); locations: (B, Q, M, L, P, 2); attention_weights:
  (B, Q, M, L, P). Returns (B, Q, M * D).

  `gather_sample`, except in bfloat16 with at least SEPARABLE_MIN_QUERIES queries on a TPU, where the program
  compiled there is `separable_sample` (the same sum: equal within float rounding, forward and gradients).
  """
  gather = lambda v, loc, w: gather_sample(v, spatial_shapes, loc, w, query_chunk)
  if value.dtype != jnp.bfloat16 or locations.shape[1] < SEPARABLE_MIN_QUERIES:
    return gather(value, locations, attention_weights)
  separable = lambda v, loc, w: separable_sample(v, spatial_shapes, loc, w, query_chunk)
  return jax.lax.platform_dependent(value, locations, attention_weights, tpu=separable, default=gather)


def gather_sample(
  value: jnp.ndarray,
  spatial_shapes: SpatialShapes,
  locations: jnp.ndarray,
  attention_weights: jnp.ndarray,
  query_chunk: int = QUERY_CHUNK,
) -> jnp.ndarray:
  """`deformable_sample` by gathering each sampling point's 4 corners: (B, N, M, D) -> (B, Q, M * D).

  The value tensor is read as rows (B * N * M, D) (a free reshape) and each corner's row index
  ((b * N + token) * M + head) is computed first, for all queries, in the queries' own layout, so neither the
  value nor the corners are ever transposed. The gather and the weighted sum then run over blocks of queries in a
  loop (lax.map), at least two: the loop boundary keeps XLA from fusing the index arithmetic into the gather,
  where it would be redone for each of the D channels of every corner. Each block is rematerialised in the
  backward pass (jax.checkpoint): the gathered corners (B, Q, M, L * P * 4, D), the op's one large intermediate
  (11.6 GB for a dense 800x1333 encoder layer at batch 2), are never kept for it, which costs a second gather
  but saves writing them to and reading them back from the loop's residual buffers (XLA:CPU, fwd + bwd of a dense
  384x512 encoder layer at batch 2, rows and remat together against transposed corners kept for the backward:
  1.6x, of which remat alone 1.14x; a decoder layer 2.5x). `query_chunk` bounds a block, so no pass holds more
  than one block's corners.
  """
  b, n, m, _ = value.shape
  q = locations.shape[1]
  idx, wts = corner_indices_and_weights(spatial_shapes, locations, attention_weights)  # (B, Q, M, L, P, 4)
  batch = jnp.arange(b, dtype=jnp.int32)[:, None, None, None, None, None]
  head = jnp.arange(m, dtype=jnp.int32)[None, None, :, None, None, None]
  rows = ((batch * n + idx) * m + head).reshape(b, q, m, -1)  # (B, Q, M, K)
  wts = wts.reshape(b, q, m, -1)
  value_rows = value.reshape(b * n * m, -1)  # (B * N * M, D)
  block = jax.checkpoint(_sample_block)
  return _map_query_blocks(lambda r, w: block(value_rows, r, w), (rows, wts), query_chunk)  # (B, Q, M * D)


def _map_query_blocks(fn: Callable[..., jnp.ndarray], xs: Sequence[jnp.ndarray], query_chunk: int) -> jnp.ndarray:
  """`fn` over blocks of the query axis (1) of the (B, Q, ...) arrays `xs`, in a loop (lax.map) of at least two
  blocks of at most `query_chunk`; the last block is padded with zeros (those queries sample with weight 0) and
  cut off: fn's (B, q, ...) per block -> (B, Q, ...)."""
  b, q = xs[0].shape[:2]
  n_chunks = max(2, -(-q // query_chunk))
  size = -(-q // n_chunks)
  pad = n_chunks * size - q

  def blocks(x: jnp.ndarray) -> jnp.ndarray:  # (B, Q, ...) -> (n_chunks, B, size, ...)
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((b, n_chunks, size) + x.shape[2:]), 1, 0)

  out = jnp.moveaxis(jax.lax.map(lambda c: fn(*c), tuple(blocks(x) for x in xs)), 0, 1)  # (B, n_chunks, size, ...)
  return out.reshape((b, n_chunks * size) + out.shape[3:])[:, :q]


def _linear_weights(grid: int, coordinate: jnp.ndarray) -> jnp.ndarray:
  """1-d linear interpolation weight of every pixel index 0..grid-1 for coordinates (...,) -> (..., grid): 1 - f at
  floor(c), f at floor(c) + 1 (f = c - floor(c)), zero elsewhere and beyond the level's edge (grid_sample's zero
  padding). Built from the floor as `corner_indices_and_weights` is, so that the gradient at a pixel centre is the
  gather's one-sided one."""
  x0 = jnp.floor(coordinate)[..., None]
  f = coordinate[..., None] - x0
  i = jnp.arange(grid, dtype=jnp.float32)
  return jnp.where(i == x0, 1.0 - f, 0.0) + jnp.where(i == x0 + 1.0, f, 0.0)


def _separable_block(
  levels: Sequence[jnp.ndarray], spatial_shapes: SpatialShapes, locations: jnp.ndarray, weights: jnp.ndarray
) -> jnp.ndarray:
  """levels: per level (B, H, W, M, D); locations (B, q, M, L, P, 2); weights (B, q, M, L, P) -> (B, q, M, D) f32."""
  precision = jax.lax.Precision.HIGHEST if levels[0].dtype == jnp.float32 else None  # f32 stays f32 on the MXU
  out = 0.0
  for l, ((h, w), v) in enumerate(zip(spatial_shapes, levels, strict=True)):
    kx = _linear_weights(w, locations[:, :, :, l, :, 0] * w - 0.5)  # (B, q, M, P, W)
    ky = _linear_weights(h, locations[:, :, :, l, :, 1] * h - 0.5) * weights[:, :, :, l, :, None].astype(jnp.float32)
    rows = jnp.einsum(  # (B, q, M, P, H, D): each point's x-interpolation of every row, one product per (b, m)
      "bqmpx,bhxmd->bqmphd", kx.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32
    )
    out = out + jnp.einsum("bqmph,bqmphd->bqmd", ky, rows, precision=precision)  # (B, q, M, D)
  return out


def separable_sample(
  value: jnp.ndarray,
  spatial_shapes: SpatialShapes,
  locations: jnp.ndarray,
  attention_weights: jnp.ndarray,
  query_chunk: int = QUERY_CHUNK,
) -> jnp.ndarray:
  """`deformable_sample` as matrix products, without a gather: (B, N, M, D) -> (B, Q, M * D).

  Bilinear interpolation is separable: a point at pixel coordinates (px, py) weighs pixel (y, x) by kx(x) * ky(y),
  with kx, ky the 1-d interpolation weights (`_linear_weights`), zero outside the level. Per level, every point's x
  weights (B, Q, M, P, W) times the level's value map (B, H, W, M, D) is one matrix product per image and head, on
  the matrix units; the y weights, times the attention weight, then sum over the rows. The dense product costs
  2 * Q * P * H * W * D FLOPs per level, image and head, against 4 * Q * P corners read by `gather_sample`; it pays
  where a gather of D = 32-channel rows is slow: XLA:TPU writes such rows channel-major and then lays them out again
  one channel at a time, on top of the gather itself (figures at SEPARABLE_MIN_QUERIES). Queries go in blocks,
  rematerialised for the backward pass, as in `gather_sample`.
  """
  b, _, m, d = value.shape
  q = locations.shape[1]
  starts = level_start_index(spatial_shapes)
  levels = [value[:, s : s + h * w].reshape(b, h, w, m, d) for s, (h, w) in zip(starts, spatial_shapes, strict=True)]
  block = jax.checkpoint(functools.partial(_separable_block, spatial_shapes=spatial_shapes))
  out = _map_query_blocks(
    lambda loc, w: block(levels, locations=loc, weights=w), (locations, attention_weights), query_chunk
  )
  return out.reshape(b, q, m * d).astype(value.dtype)  # (B, Q, M * D)


def sampling_offset_bias_init(n_heads: int, n_levels: int, n_points: int):
  """The official offset init: head h points along angle 2*pi*h/M, point p at distance p + 1."""

  def init(key, shape, dtype=jnp.float32):
    del key
    thetas = np.arange(n_heads, dtype=np.float32) * (2.0 * math.pi / n_heads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, n_levels, n_points, 1))
    grid = grid * np.arange(1, n_points + 1, dtype=np.float32)[None, None, :, None]
    return jnp.asarray(grid.reshape(shape), dtype)

  return init


class MSDeformAttn(nn.Module):
  """Multi-scale deformable attention with 2-d (point) or 4-d (box) reference points."""

  d_model: int = 256
  n_levels: int = 4
  n_heads: int = 8
  n_points: int = 4
  dtype: Any = None

  @nn.compact
  def __call__(
    self,
    query: jnp.ndarray,
    reference_points: jnp.ndarray,
    value_in: jnp.ndarray,
    spatial_shapes: SpatialShapes,
    value_padding_mask: jnp.ndarray,
  ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """query (B, Q, C); reference_points (B, Q, L, 2 or 4) in [0, 1] of the padded canvas;
    value_in (B, N, C); value_padding_mask (B, N) True on padding.

    Returns output (B, Q, C), sampling locations (B, Q, M, L, P, 2), attention weights (B, Q, M, L, P).
    """
    b, q, _ = query.shape
    n = value_in.shape[1]
    m, l, p = self.n_heads, self.n_levels, self.n_points
    value = layers.Linear(
      self.d_model,
      kernel_init=layers.xavier_uniform,
      bias_init=nn.initializers.zeros,
      dtype=self.dtype,
      name="value_proj",
    )(value_in)
    value = jnp.where(value_padding_mask[..., None], 0.0, value).reshape(b, n, m, self.d_model // m)
    offsets = layers.Linear(
      m * l * p * 2,
      kernel_init=nn.initializers.zeros,
      bias_init=sampling_offset_bias_init(m, l, p),
      dtype=self.dtype,
      name="sampling_offsets",
    )(query)
    offsets = offsets.astype(jnp.float32).reshape(b, q, m, l, p, 2)
    logits = layers.Linear(
      m * l * p,
      kernel_init=nn.initializers.zeros,
      bias_init=nn.initializers.zeros,
      dtype=self.dtype,
      name="attention_weights",
    )(query)
    weights = jax.nn.softmax(logits.astype(jnp.float32).reshape(b, q, m, l * p), -1).reshape(b, q, m, l, p)
    ref = reference_points[:, :, None, :, None, :]  # (B, Q, 1, L, 1, 2|4)
    if reference_points.shape[-1] == 2:
      hw = np.asarray(spatial_shapes, np.float32)
      normalizer = jnp.asarray(np.stack([hw[:, 1], hw[:, 0]], -1))[None, None, None, :, None, :]
      locations = ref + offsets / normalizer
    elif reference_points.shape[-1] == 4:
      locations = ref[..., :2] + offsets / p * ref[..., 2:] * 0.5
    else:
      raise ValueError(f"reference_points: last dim must be 2 or 4, got {reference_points.shape[-1]}")
    out = deformable_sample(value, spatial_shapes, locations, weights.astype(value.dtype))  # (B, Q, C)
    out = layers.Linear(
      self.d_model,
      kernel_init=layers.xavier_uniform,
      bias_init=nn.initializers.zeros,
      dtype=self.dtype,
      name="output_proj",
    )(out)
    return out, locations, weights
