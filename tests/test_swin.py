"""Swin backbone pieces: window partition round trip, shifted-window mask, relative index, drop-path."""

import jax
import jax.numpy as jnp
import numpy as np

from sparse_detr_jax import swin


def test_window_partition_round_trip():
  x = jnp.arange(2 * 14 * 21 * 3, dtype=jnp.float32).reshape(2, 14, 21, 3)
  w = swin.window_partition(x, 7)
  assert w.shape == (2 * 2 * 3, 49, 3)
  np.testing.assert_array_equal(np.asarray(w[1].reshape(7, 7, 3)), np.asarray(x[0, :7, 7:14]))
  np.testing.assert_array_equal(np.asarray(swin.window_reverse(w, 7, 14, 21)), np.asarray(x))


def test_shifted_window_mask_separates_regions():
  m = swin.shifted_window_mask(14, 14, 7, 3)
  assert m.shape == (4, 49, 49)
  assert np.all(m[0] == 0)  # the top-left window holds one region only
  last = m[3]  # the bottom-right window holds 4 regions
  assert last[0, 0] == 0 and last[0, 6] == swin.SHIFT_MASK_VALUE and np.all(np.diag(last) == 0)


def test_relative_position_index_is_symmetric_in_offsets():
  idx = swin.relative_position_index(3)
  assert idx.shape == (9, 9) and idx.max() == 24 and np.all(np.diag(idx) == 12)  # zero offset at the centre


def test_backbone_shapes_and_drop_path_only_in_training():
  net = swin.SwinTransformer(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window=7, drop_path_rate=0.5)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 150, 230, 3)), jnp.float32)
  v = jax.jit(net.init)(jax.random.PRNGKey(0), x)
  outs = jax.jit(net.apply)(v, x)
  assert [o.shape for o in outs] == [(2, 19, 29, 32), (2, 10, 15, 64), (2, 5, 8, 128)]
  assert net.num_channels == [32, 64, 128]
  again = jax.jit(net.apply)(v, x)
  np.testing.assert_array_equal(np.asarray(outs[-1]), np.asarray(again[-1]))
  train = jax.jit(lambda v, x, k: net.apply(v, x, train=True, rngs={"dropout": k}))
  a, b = train(v, x, jax.random.PRNGKey(1)), train(v, x, jax.random.PRNGKey(2))
  assert not np.allclose(np.asarray(a[-1]), np.asarray(b[-1]))
