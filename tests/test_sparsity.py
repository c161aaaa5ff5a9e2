"""Top-rho selection with static shapes: per-image counts, padding, scatter-back, the scoring network."""

import jax
import jax.numpy as jnp
import numpy as np

from sparse_detr_jax.sparsity import (
  ScoringNetwork,
  gather_tokens,
  kept_token_counts,
  num_kept_slots,
  scatter_kept,
  select_top_rho,
)


def _batch():
  """Three images of different valid sizes on one 100-token canvas (True = padding)."""
  n = 100
  pad = np.zeros((3, n), bool)
  pad[1, 60:] = True  # 60 valid tokens
  pad[2, 10:] = True  # 10 valid tokens
  scores = np.random.default_rng(0).normal(size=(3, n)).astype(np.float32)
  return jnp.asarray(scores), jnp.asarray(pad)


def test_counts_follow_official_rule_and_slots_are_static():
  scores, pad = _batch()
  sel = jax.jit(select_top_rho, static_argnums=2)(scores, pad, 0.3)
  assert num_kept_slots(100, 0.3) == 31
  assert sel.indices.shape == (3, 31) and sel.slot_mask.shape == (3, 31)
  np.testing.assert_array_equal(sel.counts, [31, 19, 4])  # int(valid * 0.3) + 1
  np.testing.assert_array_equal(sel.slot_mask.sum(1), [31, 19, 4])
  # The rule is evaluated in float32 as official: 4080 * 0.2 -> 816 -> 817.
  np.testing.assert_array_equal(kept_token_counts(jnp.zeros((1, 4080), bool), 0.2), [817])


def test_kept_tokens_are_the_best_valid_tokens_of_each_image():
  scores, pad = _batch()
  sel = select_top_rho(scores, pad, 0.3)
  s, p = np.asarray(scores), np.asarray(pad)
  for b in range(3):
    count = int(sel.counts[b])
    kept = np.asarray(sel.indices[b, :count])
    valid_order = [i for i in np.argsort(-s[b]) if not p[b, i]]
    assert set(kept) == set(valid_order[:count])
    assert not p[b, kept].any()
  # Padded tokens take the batch minimum score.
  assert np.all(np.asarray(sel.scores)[p] == s.min())


def test_scatter_writes_back_only_each_images_own_count():
  scores, pad = _batch()
  sel = select_top_rho(scores, pad, 0.3)
  memory = jnp.asarray(np.random.default_rng(1).normal(size=(3, 100, 4)), jnp.float32)
  kept = gather_tokens(memory, sel.indices) + 100.0
  new = np.asarray(jax.jit(scatter_kept)(memory, kept, sel))
  old = np.asarray(memory)
  for b in range(3):
    count = int(sel.counts[b])
    written = np.asarray(sel.indices[b, :count])
    np.testing.assert_allclose(new[b, written], old[b, written] + 100.0)
    untouched = np.setdiff1d(np.arange(100), written)
    np.testing.assert_array_equal(new[b, untouched], old[b, untouched])  # includes slots past the count


def test_scoring_network_global_half_sees_every_token():
  net = ScoringNetwork(hidden_dim=16)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 30, 16)), jnp.float32)
  params = net.init(jax.random.PRNGKey(0), x)
  y = net.apply(params, x)
  assert y.shape == (2, 30)
  noise = jnp.asarray(np.random.default_rng(3).normal(size=(2, 16)), jnp.float32)
  x2 = x.at[:, -1].add(3.0 * noise)  # changing one token moves every token's score (global mean) ...
  y2 = net.apply(params, x2)
  assert np.all(np.abs(np.asarray(y2[:, :5]) - np.asarray(y[:, :5])) > 1e-5)
  x3 = x.at[1].add(3.0 * noise[1])  # ... but never another image's
  np.testing.assert_array_equal(np.asarray(net.apply(params, x3)[0]), np.asarray(y[0]))
