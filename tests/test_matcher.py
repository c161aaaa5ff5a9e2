"""Both Hungarian solvers give optimal assignments: equal total cost to scipy, ties, masks, jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from sparse_detr_jax import matcher


def _total(cost, assign):
  return sum(cost[q, m] for m, q in enumerate(assign) if q >= 0)


def _optimal(cost, row_valid, col_valid):
  rows, cols = np.flatnonzero(row_valid), np.flatnonzero(col_valid)
  if not len(cols):
    return 0.0
  r, c = linear_sum_assignment(cost[np.ix_(rows, cols)])
  return cost[np.ix_(rows, cols)][r, c].sum()


def _check(cost, row_valid, col_valid, solver):
  got = np.asarray(jax.jit(matcher.assign, static_argnums=3)(cost, row_valid, col_valid, solver))
  for b in range(cost.shape[0]):
    a = got[b]
    assert np.all(a[~col_valid[b]] == -1)
    used = a[col_valid[b]]
    assert len(set(used)) == len(used) and np.all(used >= 0) and np.all(row_valid[b][used])
    np.testing.assert_allclose(_total(cost[b], a), _optimal(cost[b], row_valid[b], col_valid[b]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solver", matcher.SOLVERS)
def test_random_costs_with_masks(solver):
  rng = np.random.default_rng(0)
  cost = rng.normal(size=(6, 30, 12)).astype(np.float32) * 3
  row_valid = np.ones((6, 30), bool)
  row_valid[1, 20:] = False  # masked prediction slots (encoder aux quirk)
  col_valid = rng.uniform(size=(6, 12)) < 0.6
  col_valid[2] = False  # an image with no targets
  col_valid[3] = True  # every target slot used (max_boxes targets)
  _check(cost, row_valid, col_valid, solver)


@pytest.mark.parametrize("solver", matcher.SOLVERS)
def test_ties_and_greedy_traps(solver):
  # Ties everywhere.
  _check(np.zeros((1, 5, 5), np.float32), np.ones((1, 5), bool), np.ones((1, 5), bool), solver)
  _check(np.ones((1, 8, 3), np.float32), np.ones((1, 8), bool), np.ones((1, 3), bool), solver)
  # Greedy takes (0, 0) = 0 and is forced into 100; optimal is 1 + 1.
  trap = np.array([[[0.0, 1.0], [1.0, 100.0]]], np.float32)
  _check(trap, np.ones((1, 2), bool), np.ones((1, 2), bool), solver)
  # Square and as many targets as predictions, integer costs with many ties.
  rng = np.random.default_rng(1)
  _check(
    rng.integers(0, 3, size=(4, 10, 10)).astype(np.float32), np.ones((4, 10), bool), np.ones((4, 10), bool), solver
  )


def test_jax_solver_under_vmap():
  rng = np.random.default_rng(2)
  cost = jnp.asarray(rng.normal(size=(3, 2, 9, 4)), jnp.float32)
  rv, cv = jnp.ones((3, 2, 9), bool), jnp.ones((3, 2, 4), bool)
  out = jax.jit(jax.vmap(lambda c, r, v: matcher.assign(c, r, v, "jax")))(cost, rv, cv)
  ref = jax.vmap(lambda c, r, v: matcher.assign(c, r, v, "scipy"))(cost, rv, cv)
  for i in range(3):
    for b in range(2):
      np.testing.assert_allclose(
        _total(np.asarray(cost[i, b]), np.asarray(out[i, b])),
        _total(np.asarray(cost[i, b]), np.asarray(ref[i, b])),
        rtol=1e-5,
      )


def test_unknown_solver_is_a_clear_error():
  with pytest.raises(ValueError, match="loss.matcher"):
    matcher.assign(jnp.zeros((1, 2, 2)), jnp.ones((1, 2), bool), jnp.ones((1, 2), bool), "greedy")


def test_host_solver_runs_no_jax_operation(monkeypatch):
  """The scipy solver runs inside the jitted step (a host callback), where a JAX operation on its jax.Array
  arguments waits for the devices running that step: it must use numpy only (a suite run hung on this)."""
  rng = np.random.default_rng(0)
  cost, rows, cols = jnp.asarray(rng.random((2, 6, 3), np.float32)), jnp.ones((2, 6), bool), jnp.ones((2, 3), bool)
  array_type = type(cost)

  def refuse(*args, **kwargs):
    raise AssertionError("a JAX operation inside the host callback")

  for name in ("__getitem__", "__mul__", "__add__", "sum", "astype", "reshape"):
    monkeypatch.setattr(array_type, name, refuse)
  out = matcher._scipy_assign(cost, rows, cols)
  assert out.shape == (2, 3) and sorted(out[0]) == sorted(set(out[0])) and (out >= 0).all()
