"""Sparse DETR's learnable encoder sparsity: the scoring network and top-rho token selection.

Shapes are static: every image of a batch gets K = `num_kept_slots(N, rho)` slots (the most any image
on this canvas can keep); image i keeps (scatters back) only its first `count_i = int(valid_i * rho) + 1`.
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparse_detr_jax import layers


class ScoringNetwork(nn.Module):
  """The scoring network (official `MaskPredictor`): one saliency logit per backbone token.

  LayerNorm -> Linear(h) -> GELU; the second half of the features is averaged over all N tokens
  (padding included) and broadcast (global context); then Linear(h/2) -> GELU -> Linear(h/4) -> GELU
  -> Linear(1). x: (B, N, C) -> (B, N).
  """

  hidden_dim: int = 256
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = self.hidden_dim
    z = layers.layer_norm(name="layer1_norm", dtype=self.dtype)(x)
    z = nn.gelu(
      layers.Linear(h, kernel_init=layers.xavier_uniform, dtype=self.dtype, name="layer1_linear")(z), approximate=False
    )  # (B, N, h)
    z_local, z_global = z[..., : h // 2], z[..., h // 2 :]
    z_global = jnp.broadcast_to(jnp.mean(z_global, axis=1, keepdims=True), z_local.shape)
    z = jnp.concatenate([z_local, z_global], axis=-1)
    for i, width in enumerate((h // 2, h // 4)):
      z = nn.gelu(
        layers.Linear(width, kernel_init=layers.xavier_uniform, dtype=self.dtype, name=f"layer2_linear{i}")(z),
        approximate=False,
      )
    z = layers.Linear(1, kernel_init=layers.xavier_uniform, dtype=self.dtype, name="layer2_linear2")(z)
    return z[..., 0].astype(jnp.float32)  # (B, N)


def num_kept_slots(num_tokens: int, rho: float) -> int:
  """Static slot count K: the largest per-image count any image on an N-token canvas can have."""
  return min(int(np.floor(np.float32(num_tokens) * np.float32(rho))) + 1, num_tokens)


def kept_token_counts(padding_mask: jnp.ndarray, rho: float) -> jnp.ndarray:
  """Per-image kept count `int(valid_tokens * rho) + 1` (in float32, as the official code). (B, N) -> (B,)."""
  valid = jnp.sum(~padding_mask, axis=1).astype(jnp.float32)
  return jnp.floor(valid * jnp.float32(rho)).astype(jnp.int32) + 1


class TopRho(NamedTuple):
  """The result of top-rho selection."""

  indices: jnp.ndarray  # (B, K) int32 token indices, best score first
  counts: jnp.ndarray  # (B,) int32 tokens image b scatters back (its first counts[b] slots)
  slot_mask: jnp.ndarray  # (B, K) bool, slot < counts[b]
  scores: jnp.ndarray  # (B, N) scores with padded tokens set to the batch minimum


def select_top_rho(scores: jnp.ndarray, padding_mask: jnp.ndarray, rho: float) -> TopRho:
  """Top-rho token selection: the K best-scored tokens per image, padded tokens never preferred.

  scores: (B, N) scoring-network logits; padding_mask: (B, N) True on padding. As official, padded
  tokens take the minimum score of the whole (per-device) batch before the top-k.
  """
  k = num_kept_slots(scores.shape[1], rho)
  scores = jnp.where(padding_mask, jnp.min(scores), scores)
  _, indices = jax.lax.top_k(jax.lax.stop_gradient(scores), k)  # (B, K)
  counts = kept_token_counts(padding_mask, rho)
  slot_mask = jnp.arange(k)[None, :] < counts[:, None]
  return TopRho(indices.astype(jnp.int32), counts, slot_mask, scores)


def gather_tokens(x: jnp.ndarray, indices: jnp.ndarray) -> jnp.ndarray:
  """x (B, N, ...) at indices (B, K) -> (B, K, ...)."""
  return jax.vmap(lambda xb, ib: xb[ib])(x, indices)


def scatter_kept(memory: jnp.ndarray, kept: jnp.ndarray, sel: TopRho) -> jnp.ndarray:
  """Write each image's first counts[b] kept-token states back into the full memory.

  memory: (B, N, C); kept: (B, K, C). Slots beyond an image's count are dropped; other tokens pass unchanged.
  """
  n = memory.shape[1]
  target = jnp.where(sel.slot_mask, sel.indices, n)  # (B, K); n = out of range
  return jax.vmap(lambda mb, tb, kb: mb.at[tb].set(kb, mode="drop"))(memory, target, kept)
