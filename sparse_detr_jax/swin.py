"""Swin Transformer backbone as the official Sparse DETR ships it (Swin-for-detection variant).

Patch embedding (image padded to a multiple of the patch size), stages of shifted-window attention
with relative position bias (feature maps padded to window multiples, -100 attention mask across
shifted-window borders), patch merging (odd sizes padded), a LayerNorm on each returned stage.
Returns stages 2-4 (strides 8, 16, 32), NHWC.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparse_detr_jax import layers

PATCH_SIZE = 4
MLP_RATIO = 4.0
SHIFT_MASK_VALUE = -100.0
OUT_STAGES = (1, 2, 3)
_linear_init = nn.initializers.normal(0.02)  # timm trunc_normal_(std=.02) (its +-2 bounds never bind)


def relative_position_index(window: int) -> np.ndarray:
  """(window**2, window**2) index into the (2w-1)**2 bias table, as the official buffer."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
  return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(hp: int, wp: int, window: int, shift: int) -> np.ndarray:
  """(num_windows, w*w, w*w) additive mask: -100 between tokens from different regions after the roll."""
  img = np.zeros((hp, wp), np.float32)
  cnt = 0
  for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
    for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
      img[hs, ws] = cnt
      cnt += 1
  win = img.reshape(hp // window, window, wp // window, window).transpose(0, 2, 1, 3).reshape(-1, window * window)
  diff = win[:, None, :] - win[:, :, None]
  return np.where(diff != 0, SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def window_partition(x: jnp.ndarray, window: int) -> jnp.ndarray:
  """(B, H, W, C) -> (B * num_windows, window**2, C)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window * window, c)


def window_reverse(x: jnp.ndarray, window: int, h: int, w: int) -> jnp.ndarray:
  """(B * num_windows, window**2, C) -> (B, H, W, C)."""
  c = x.shape[-1]
  x = x.reshape(-1, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, h, w, c)


class DropPath(nn.Module):
  """Stochastic depth: drop the whole residual branch per sample (rng 'dropout')."""

  rate: float

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    if deterministic or self.rate == 0.0:
      return x
    keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - self.rate), 0.0)


class WindowAttention(nn.Module):
  """Multi-head self-attention inside windows with a learned relative position bias."""

  dim: int
  num_heads: int
  window: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask) -> jnp.ndarray:
    """x (B * nW, N, C); mask (nW, N, N) or None."""
    bw, n, c = x.shape
    d = c // self.num_heads
    table = self.param("relative_position_bias_table", _linear_init, ((2 * self.window - 1) ** 2, self.num_heads))
    qkv = (
      layers.Linear(3 * c, kernel_init=_linear_init, bias_init=nn.initializers.zeros, dtype=self.dtype, name="qkv")(x)
      .reshape(bw, n, 3, self.num_heads, d)
      .transpose(2, 0, 3, 1, 4)
    )
    q, k, v = qkv[0] * d**-0.5, qkv[1], qkv[2]  # (B*nW, heads, N, d)
    attn = q @ jnp.swapaxes(k, -1, -2)
    bias = table[relative_position_index(self.window).reshape(-1)].reshape(n, n, -1).transpose(2, 0, 1)
    attn = attn + bias[None].astype(attn.dtype)
    if mask is not None:
      nw = mask.shape[0]
      attn = (attn.reshape(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]).reshape(bw, self.num_heads, n, n)
    attn = jax.nn.softmax(attn.astype(jnp.float32), -1).astype(v.dtype)
    out = (attn @ v).transpose(0, 2, 1, 3).reshape(bw, n, c)
    return layers.Linear(c, kernel_init=_linear_init, bias_init=nn.initializers.zeros, dtype=self.dtype, name="proj")(
      out
    )


class SwinBlock(nn.Module):
  dim: int
  num_heads: int
  window: int
  shift: int
  drop_path: float
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    """x (B, H, W, C) -> (B, H, W, C)."""
    b, h, w, c = x.shape
    ws = self.window
    y = layers.layer_norm("norm1", self.dtype)(x)
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    y = jnp.pad(y, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))  # pad after the norm, as official
    mask = None
    if self.shift:
      y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
      mask = jnp.asarray(shifted_window_mask(hp, wp, ws, self.shift))
    y = WindowAttention(self.dim, self.num_heads, ws, self.dtype, name="attn")(window_partition(y, ws), mask)
    y = window_reverse(y, ws, hp, wp)
    if self.shift:
      y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
    x = x + DropPath(self.drop_path)(y[:, :h, :w], deterministic)
    y = layers.layer_norm("norm2", self.dtype)(x)
    y = nn.gelu(
      layers.Linear(
        int(c * MLP_RATIO), kernel_init=_linear_init, bias_init=nn.initializers.zeros, dtype=self.dtype, name="mlp_fc1"
      )(y),
      approximate=False,
    )
    y = layers.Linear(c, kernel_init=_linear_init, bias_init=nn.initializers.zeros, dtype=self.dtype, name="mlp_fc2")(y)
    return x + DropPath(self.drop_path)(y, deterministic)


class PatchMerging(nn.Module):
  """2x2 neighbourhood concat (odd sizes zero-padded), LayerNorm(4C), Linear(2C, no bias)."""

  dtype: Any = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    x = layers.layer_norm("norm", self.dtype)(x)
    kernel = self.param("reduction_kernel", _linear_init, (4 * c, 2 * c), jnp.float32)
    return layers.matmul(x, kernel.astype(x.dtype))


class SwinTransformer(nn.Module):
  """Swin backbone returning stages 2-4 (strides 8, 16, 32) with their output norms, NHWC."""

  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window: int = 7
  drop_path_rate: float = 0.2
  dtype: Any = None

  @property
  def num_channels(self) -> list[int]:
    return [self.embed_dim * 2**i for i in OUT_STAGES]

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> list[jnp.ndarray]:
    b, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (0, -h % PATCH_SIZE), (0, -w % PATCH_SIZE), (0, 0)))
    x = nn.Conv(
      self.embed_dim,
      (PATCH_SIZE, PATCH_SIZE),
      strides=(PATCH_SIZE, PATCH_SIZE),
      padding="VALID",
      dtype=self.dtype,
      name="patch_embed_proj",
    )(x)  # (B, H/4, W/4, C)
    x = layers.layer_norm("patch_embed_norm", self.dtype)(x)
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
    outs, block = [], 0
    for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads, strict=True)):
      dim = self.embed_dim * 2**i
      for j in range(depth):
        x = SwinBlock(
          dim,
          heads,
          self.window,
          0 if j % 2 == 0 else self.window // 2,
          float(rates[block]),
          self.dtype,
          name=f"layers_{i}_blocks_{j}",
        )(x, not train)
        block += 1
      if i in OUT_STAGES:
        outs.append(layers.layer_norm(f"norm{i}", self.dtype)(x))
      if i < len(self.depths) - 1:
        x = PatchMerging(self.dtype, name=f"layers_{i}_downsample")(x)
    return outs
