"""Hungarian matching of predictions to targets with the official Sparse DETR cost.

cost = 5 * L1(boxes) + 2 * (focal cost of the target class) + 2 * (-GIoU); the assignment is exact,
over the valid targets and the valid prediction slots only. Two interchangeable solvers:
  'scipy': scipy.optimize.linear_sum_assignment on the host via jax.pure_callback;
  'jax':   a JAX-native shortest-augmenting-path Hungarian algorithm (no host round trip, for TPU pods).
'auto' (the config default) picks 'jax' on TPU, where a host round trip per step is expensive, and
'scipy' on CPU and GPU, where the callback is cheap.
`match` returns, for every target slot, the index of its prediction (-1 for padded targets).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from sparse_detr_jax import box_ops

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
MATCH_LOG_EPS = 1e-8  # inside the logs of the official focal matching cost
SOLVERS = ("auto", "scipy", "jax")


def default_solver(platform: str | None = None) -> str:
  """The solver 'auto' means on `platform` (default: this process's backend)."""
  return "jax" if (platform or jax.default_backend()) == "tpu" else "scipy"


def matching_cost(
  logits: jnp.ndarray,
  boxes: jnp.ndarray,
  labels: jnp.ndarray,
  target_boxes: jnp.ndarray,
  cost_class: float,
  cost_bbox: float,
  cost_giou: float,
) -> jnp.ndarray:
  """logits (B, Q, C), boxes (B, Q, 4) cxcywh; labels (B, M), target_boxes (B, M, 4) -> cost (B, Q, M)."""
  prob = jax.nn.sigmoid(logits)
  neg = (1 - FOCAL_ALPHA) * prob**FOCAL_GAMMA * -jnp.log(1 - prob + MATCH_LOG_EPS)
  pos = FOCAL_ALPHA * (1 - prob) ** FOCAL_GAMMA * -jnp.log(prob + MATCH_LOG_EPS)
  cls = jnp.take_along_axis(pos - neg, labels[:, None, :], axis=2)  # (B, Q, M)
  l1 = jnp.sum(jnp.abs(boxes[:, :, None] - target_boxes[:, None]), -1)  # (B, Q, M)
  giou = box_ops.generalized_iou(
    box_ops.cxcywh_to_xyxy(boxes)[:, :, None], box_ops.cxcywh_to_xyxy(target_boxes)[:, None]
  )  # (B, Q, M)
  return cost_bbox * l1 + cost_class * cls - cost_giou * giou


def _scipy_assign(cost: np.ndarray, row_valid: np.ndarray, col_valid: np.ndarray) -> np.ndarray:
  """Host solver: cost (B, Q, M) -> (B, M) query per valid target, -1 elsewhere.

  Runs inside the jitted step (a host callback): numpy only. A JAX operation here (even indexing a
  jax.Array argument) waits for the device that is running this very step, a deadlock.
  """
  row_valid, col_valid = np.asarray(row_valid), np.asarray(col_valid)
  out = np.full(cost.shape[::2], -1, np.int32)
  # A diverged step gives non-finite costs; any assignment will do (its loss is non-finite and the
  # trainer drops the update), but scipy would raise inside the jitted step.
  cost = np.nan_to_num(np.asarray(cost, np.float64), nan=1e30, posinf=1e30, neginf=-1e30)
  for b in range(cost.shape[0]):
    rows, cols = np.flatnonzero(row_valid[b]), np.flatnonzero(col_valid[b])
    if len(rows) and len(cols):
      r, c = linear_sum_assignment(cost[b][np.ix_(rows, cols)])
      out[b, cols[c]] = rows[r]
  return out


def _jax_assign_one(cost: jnp.ndarray, row_valid: jnp.ndarray, col_valid: jnp.ndarray) -> jnp.ndarray:
  """Exact Hungarian algorithm (shortest augmenting paths with potentials) for one image.

  Targets are the rows to assign (M of them, the valid ones), predictions the columns (Q >= valid M).
  cost: (Q, M). Returns (M,) column (prediction) per target, -1 for invalid targets.
  """
  a = cost.T.astype(jnp.float32)  # (M, Q): rows = targets
  m, q = a.shape
  inf = jnp.float32(jnp.inf)
  # 1-based arrays as in the classic formulation; index 0 is the virtual column/row.
  a = jnp.pad(a, ((1, 0), (1, 0)))
  col_ok = jnp.concatenate([jnp.ones((1,), bool), row_valid])  # predictions usable as columns
  # Loop carries start from `zero`, derived from the inputs, so that inside shard_map they carry the
  # inputs' varying-axes type (a constant start would be typed as replicated).
  zero = jnp.sum(col_valid.astype(jnp.int32)) * 0

  def add_row(i, state):
    u, v, p, way = state

    def grow(s):
      u, v, p, way, minv, used, j0, _ = s
      used = used.at[j0].set(True)
      i0 = p[j0]
      cur = a[i0] - u[i0] - v
      better = (~used) & (cur < minv)
      minv = jnp.where(better, cur, minv)
      way = jnp.where(better, j0, way)
      cand = jnp.where(used, inf, minv)
      j1 = jnp.argmin(cand)
      delta = cand[j1]
      u = u.at[p].add(jnp.where(used, delta, 0.0))
      v = jnp.where(used, v - delta, v)
      minv = jnp.where(used, minv, minv - delta)
      return u, v, p, way, minv, used, j1, p[j1] != 0

    p = p.at[0].set(i)
    # A padded target row runs no iteration (starting flag False), so it is never assigned.
    init = (u, v, p, way, jnp.full((q + 1,), inf) + zero, ~col_ok | (zero != 0), zero, col_valid[i - 1] | (zero != 0))
    u, v, p, way, _, _, j0, _ = jax.lax.while_loop(lambda s: s[-1], grow, init)

    def augment(s):
      p, j0 = s
      j1 = way[j0]
      return p.at[j0].set(p[j1]), j1

    p, _ = jax.lax.while_loop(lambda s: s[1] != 0, augment, (p, j0))
    return u, v, p, way

  state = (
    jnp.zeros((m + 1,), jnp.float32) + zero,
    jnp.zeros((q + 1,), jnp.float32) + zero,
    jnp.zeros((q + 1,), jnp.int32) + zero,
    jnp.zeros((q + 1,), jnp.int32) + zero,
  )
  _, _, p, _ = jax.lax.fori_loop(1, m + 1, add_row, state)
  # p[j] = row (1-based) assigned to column j; invert to a column per row.
  cols = jnp.arange(q + 1)
  target_of_col = jnp.where((p > 0) & (cols > 0), p - 1, m)  # m = nowhere
  assign = jnp.full((m + 1,), -1, jnp.int32).at[target_of_col].set(cols.astype(jnp.int32) - 1)
  return jnp.where(col_valid, assign[:m], -1)


def assign(cost: jnp.ndarray, row_valid: jnp.ndarray, col_valid: jnp.ndarray, solver: str = "scipy") -> jnp.ndarray:
  """Optimal assignment: cost (B, Q, M), row_valid (B, Q) usable predictions, col_valid (B, M) real targets.

  Returns (B, M) int32: the prediction matched to each target, -1 for padded targets.
  """
  cost = jax.lax.stop_gradient(cost).astype(jnp.float32)
  if solver == "auto":
    solver = default_solver()
  if solver == "scipy":
    spec = jax.ShapeDtypeStruct(col_valid.shape, jnp.int32)
    return jax.pure_callback(_scipy_assign, spec, cost, row_valid, col_valid, vmap_method="sequential")
  if solver == "jax":
    return jax.vmap(_jax_assign_one)(cost, row_valid, col_valid)
  raise ValueError(f"loss.matcher: expected one of {SOLVERS}, got {solver!r}")


def match(logits: jnp.ndarray, boxes: jnp.ndarray, targets: Any, slot_valid: jnp.ndarray, cfg: Any) -> jnp.ndarray:
  """Hungarian matching of one prediction set: (B, M) prediction index per target (-1 = padded target)."""
  with jax.named_scope("matcher"):  # profiles attribute the cost and the solver here
    cost = matching_cost(
      logits, boxes, targets["labels"], targets["boxes"], cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou
    )
    return assign(cost, slot_valid, targets["valid"], cfg.matcher)
