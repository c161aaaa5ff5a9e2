"""Gather-based deformable sampling against a direct numpy bilinear reference and torch grid_sample (in the
peer's Python); the TPU's separable formulation, and the others benchmarks/tpu_sampling.py prices, against the
gather."""

import itertools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, require_peer

from sparse_detr_jax import deformable_attention
from sparse_detr_jax.deformable_attention import MSDeformAttn, deformable_sample

sys.path.insert(0, str(ROOT / "benchmarks"))
import tpu_sampling

SHAPES = ((5, 7), (3, 4), (2, 2), (1, 1))


def numpy_reference(value, shapes, locs, weights):
  """Per point: pixel (loc * size - 0.5), 4 corners, bilinear weights, zero outside the level."""
  b, n, m, d = value.shape
  _, q, _, nl, p, _ = locs.shape
  out = np.zeros((b, q, m, d), np.float64)
  starts = np.cumsum([0] + [h * w for h, w in shapes])
  for bi, qi, mi, li, pi in itertools.product(range(b), range(q), range(m), range(nl), range(p)):
    h, w = shapes[li]
    x = locs[bi, qi, mi, li, pi, 0] * w - 0.5
    y = locs[bi, qi, mi, li, pi, 1] * h - 0.5
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
      if 0 <= xi < w and 0 <= yi < h:
        share = (1 - abs(x - xi)) * (1 - abs(y - yi))
        out[bi, qi, mi] += weights[bi, qi, mi, li, pi] * share * value[bi, starts[li] + yi * w + xi, mi]
  return out.reshape(b, q, m * d)


def _inputs(seed=0, q=6, m=2, d=3, p=3):
  rng = np.random.default_rng(seed)
  n = sum(h * w for h, w in SHAPES)
  value = rng.normal(size=(2, n, m, d)).astype(np.float32)
  # Inside, outside (< 0 and > 1), exactly on borders and on pixel centres.
  locs = rng.uniform(-0.3, 1.3, size=(2, q, m, len(SHAPES), p, 2)).astype(np.float32)
  locs[0, 0, :, :, 0] = 0.0
  locs[0, 1, :, :, 0] = 1.0
  for li, (h, w) in enumerate(SHAPES):
    locs[1, 0, :, li, 0] = [(0 + 0.5) / w, (h - 1 + 0.5) / h]  # a pixel centre: exactly one corner
  weights = rng.uniform(size=(2, q, m, len(SHAPES), p)).astype(np.float32)
  return value, locs, weights


def test_matches_numpy_bilinear_reference():
  value, locs, weights = _inputs()
  got = jax.jit(deformable_sample, static_argnums=1)(value, SHAPES, locs, weights)
  np.testing.assert_allclose(np.asarray(got), numpy_reference(value, SHAPES, locs, weights), atol=1e-5)


def test_points_outside_every_level_read_zero():
  value, locs, weights = _inputs()
  locs = np.full_like(locs, -0.75)  # far outside: no corner inside
  got = deformable_sample(value, SHAPES, locs, weights)
  assert np.all(np.asarray(got) == 0.0)


# PyTorch's grid_sample per level, weighted and summed over points: the official pure-PyTorch sampling.
GRID_SAMPLE = """
import sys, numpy as np, torch
F = torch.nn.functional
d = np.load(sys.argv[1]); value, locs, weights, shapes = d["value"], d["locs"], d["weights"], d["shapes"]
b, n, m, dim = value.shape
q, p = locs.shape[1], locs.shape[4]
starts = np.cumsum([0] + [h * w for h, w in shapes])
expected = 0
for li, (h, w) in enumerate(shapes):
  v = torch.from_numpy(value[:, starts[li] : starts[li + 1]]).permute(0, 2, 3, 1).reshape(b * m, dim, h, w)
  g = torch.from_numpy(2 * locs[:, :, :, li] - 1).permute(0, 2, 1, 3, 4).reshape(b * m, q, p, 2)
  s = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*M, D, Q, P)
  wl = torch.from_numpy(weights[:, :, :, li]).permute(0, 2, 1, 3).reshape(b * m, 1, q, p)
  expected = expected + (s * wl).sum(-1)
np.save(sys.argv[2], expected.reshape(b, m, dim, q).permute(0, 3, 1, 2).reshape(b, q, m * dim).numpy())
"""


def test_matches_torch_grid_sample(tmp_path):
  peer = require_peer()
  value, locs, weights = _inputs(seed=1)
  np.savez(tmp_path / "in.npz", value=value, locs=locs, weights=weights, shapes=np.array(SHAPES))
  subprocess.run([str(peer), "-c", GRID_SAMPLE, str(tmp_path / "in.npz"), str(tmp_path / "out.npy")], check=True)
  got = deformable_sample(value, SHAPES, locs, weights)
  np.testing.assert_allclose(np.asarray(got), np.load(tmp_path / "out.npy"), atol=1e-5)


def test_gradients_match_numpy_finite_differences():
  value, locs, weights = _inputs(seed=2, q=2, p=2)
  f = lambda v, w: jnp.sum(deformable_sample(v, SHAPES, locs, w) ** 2)
  gv, gw = jax.grad(f, argnums=(0, 1))(value, weights)
  ref = lambda v, w: np.sum(numpy_reference(v, SHAPES, locs, w) ** 2)
  eps = 1e-3
  for idx in [(0, 3, 1, 2), (1, 40, 0, 0), (0, 0, 0, 1)]:
    vp, vm = value.astype(np.float64).copy(), value.astype(np.float64).copy()
    vp[idx] += eps
    vm[idx] -= eps
    np.testing.assert_allclose(gv[idx], (ref(vp, weights) - ref(vm, weights)) / (2 * eps), rtol=1e-3, atol=1e-4)
  for idx in [(0, 1, 1, 2, 1), (1, 0, 0, 0, 0)]:
    wp, wm = weights.astype(np.float64).copy(), weights.astype(np.float64).copy()
    wp[idx] += eps
    wm[idx] -= eps
    np.testing.assert_allclose(gw[idx], (ref(value, wp) - ref(value, wm)) / (2 * eps), rtol=1e-3, atol=1e-4)


def test_padded_value_tokens_are_never_read():
  """MSDeformAttn zeroes padded value tokens: changing them changes nothing."""
  rng = np.random.default_rng(3)
  n = sum(h * w for h, w in SHAPES)
  mod = MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=2)
  query = jnp.asarray(rng.normal(size=(1, 5, 32)), jnp.float32)
  ref = jnp.asarray(rng.uniform(size=(1, 5, 4, 2)), jnp.float32)
  value = rng.normal(size=(1, n, 32)).astype(np.float32)
  pad = np.zeros((1, n), bool)
  pad[0, ::3] = True
  params = mod.init(jax.random.PRNGKey(0), query, ref, value, SHAPES, pad)
  # Random offsets so the points spread over the maps.
  params = jax.tree_util.tree_map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(1), x.shape), params)
  out1 = mod.apply(params, query, ref, value, SHAPES, pad)[0]
  value2 = np.where(pad[..., None], 1e3, value).astype(np.float32)
  out2 = mod.apply(params, query, ref, value2, SHAPES, pad)[0]
  np.testing.assert_array_equal(np.asarray(out1), np.asarray(out2))
  out3 = mod.apply(params, query, ref, value2, SHAPES, np.zeros_like(pad))[0]
  assert not np.allclose(np.asarray(out1), np.asarray(out3))


def test_box_reference_points_scale_offsets_by_box_size():
  """4-d references: location = centre + offset / n_points * size / 2."""
  mod = MSDeformAttn(d_model=16, n_levels=1, n_heads=2, n_points=2)
  shapes = ((4, 4),)
  query = jnp.zeros((1, 1, 16))
  ref = jnp.asarray([[[[0.5, 0.25, 0.2, 0.4]]]], jnp.float32)  # (B, Q, L, 4)
  value = jnp.ones((1, 16, 16))
  params = mod.init(jax.random.PRNGKey(0), query, ref, value, shapes, jnp.zeros((1, 16), bool))
  _, locs, _ = mod.apply(params, query, ref, value, shapes, jnp.zeros((1, 16), bool))
  bias = np.asarray(params["params"]["sampling_offsets"]["bias"]).reshape(2, 1, 2, 2)
  expected = np.array([0.5, 0.25]) + bias / 2 * np.array([0.2, 0.4]) * 0.5
  np.testing.assert_allclose(np.asarray(locs)[0, 0], expected, atol=1e-6)


def test_query_blocks_change_nothing():
  """Blocks of 4 queries (with a padded last block) == one block, to float rounding (forward and gradients)."""
  value, locs, weights = _inputs(seed=3, q=10)
  one = lambda v, l, w: deformable_sample(v, SHAPES, l, w, query_chunk=10)
  blocks = lambda v, l, w: deformable_sample(v, SHAPES, l, w, query_chunk=4)
  np.testing.assert_allclose(
    np.asarray(blocks(value, locs, weights)), np.asarray(one(value, locs, weights)), rtol=1e-6, atol=1e-6
  )
  grad = lambda f: jax.grad(lambda v, l, w: jnp.sum(f(v, l, w) ** 2), argnums=(0, 1, 2))(value, locs, weights)
  for a, b in zip(grad(blocks), grad(one), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["separable", "gather/3", "level0-gather"])
def test_sampling_formulations_equal_the_gather(name):
  """separable_sample (TPUs, bfloat16) and the other formulations benchmarks/tpu_sampling.py prices == gather_sample
  within 1e-5, forward and gradients, with points outside the levels, on borders and on pixel centres, in padded
  query blocks."""
  value, locs, weights = _inputs(seed=4, q=10, m=3, d=4, p=4)
  gather = lambda v, l, w: deformable_attention.gather_sample(v, SHAPES, l, w, query_chunk=4)
  other = tpu_sampling.formulations(list(SHAPES), query_chunk=4, small_block=3)[name]
  np.testing.assert_allclose(
    np.asarray(other(value, locs, weights)), np.asarray(gather(value, locs, weights)), rtol=1e-5, atol=1e-5
  )
  cot = np.random.default_rng(5).normal(size=(2, 10, 3 * 4)).astype(np.float32)
  grad = lambda f: jax.grad(lambda v, l, w: jnp.sum(f(v, l, w) * cot), argnums=(0, 1, 2))(value, locs, weights)
  for a, b in zip(grad(other), grad(gather), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_off_tpu_sampling_is_the_gather_in_every_dtype():
  """On CPU (and GPU) deformable_sample compiles the gather whatever the dtype and number of queries."""
  value, locs, weights = _inputs(q=deformable_attention.SEPARABLE_MIN_QUERIES)
  value = jnp.asarray(value, jnp.bfloat16)
  hlo = jax.jit(deformable_sample, static_argnums=1).lower(value, SHAPES, locs, weights).as_text()
  assert "gather" in hlo and "dot_general" in hlo
