"""The training objective against the official criterion: every loss term, the total, and gradients."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import load_npz, official

from sparse_detr_jax import convert, losses
from sparse_detr_jax import model as model_lib

FIXTURES = ["tiny_sparse", "tiny_deformable", "r50_sparse", "swin_sparse"]
MAX_BOXES = 5


def fixture_targets(d, max_boxes=MAX_BOXES):
  b = d["images"].shape[0]
  labels = np.zeros((b, max_boxes), np.int32)
  boxes = np.zeros((b, max_boxes, 4), np.float32)
  valid = np.zeros((b, max_boxes), bool)
  for i in range(b):
    n = len(d[f"target_labels_{i}"])
    labels[i, :n], boxes[i, :n], valid[i, :n] = d[f"target_labels_{i}"], d[f"target_boxes_{i}"], True
  return {"labels": jnp.asarray(labels), "boxes": jnp.asarray(boxes), "valid": jnp.asarray(valid)}


@functools.cache
def _official_losses_and_grads(name, solver, scan_layers="unroll"):
  _, variables, mc = convert.load_official(str(official(name + ".pth")))
  mc.scan_layers = scan_layers
  model = model_lib.build_model(mc)
  d = load_npz(name)
  cfg = ml_collections.ConfigDict({"model": mc, "loss": losses.loss_config(matcher=solver)})
  images, mask, targets = jnp.asarray(d["images"].transpose(0, 2, 3, 1)), jnp.asarray(d["mask"]), fixture_targets(d)

  def loss_fn(params):
    out = model.apply({**variables, "params": params}, images, mask)
    loss_dict = losses.compute(out, targets, cfg)
    return losses.total(loss_dict, cfg), loss_dict

  if (name, solver, scan_layers) in GRAD_CASES:  # gradients once per case that checks them
    (tot, loss_dict), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    grads = jax.tree_util.tree_map(np.asarray, grads)
  else:
    (tot, loss_dict), grads = jax.jit(loss_fn)(variables["params"]), None
  return float(tot), {k: float(v) for k, v in loss_dict.items()}, grads, d, cfg


# As the CPU runs (unrolled layers) with either matcher, and as accelerators run (scanned layers, vmapped losses,
# the on-device matcher) on the tiny fixtures.
LOSS_CASES = [(n, s, "unroll") for n in FIXTURES for s in ("scipy", "jax")] + [
  (n, "jax", "scan") for n in ("tiny_sparse", "tiny_deformable")
]
GRAD_CASES = [(n, "scipy", "unroll") for n in FIXTURES] + [("tiny_sparse", "jax", "scan")]


@pytest.mark.parametrize("name, solver, scan_layers", LOSS_CASES)
def test_every_loss_term_matches_official(name, solver, scan_layers):
  tot, loss_dict, _, d, cfg = _official_losses_and_grads(name, solver, scan_layers)
  official_keys = {k[len("loss/") :] for k in d if k.startswith("loss/")}
  assert set(loss_dict) == official_keys
  for key in sorted(official_keys):
    want = float(d["loss/" + key])
    assert abs(loss_dict[key] - want) <= max(1e-4 * abs(want), 1e-6), (key, loss_dict[key], want)
  assert abs(tot - float(d["total_loss"])) <= 1e-5 * abs(float(d["total_loss"]))
  official_weights = {k[len("weight/") :]: float(d[k]) for k in d if k.startswith("weight/")}
  assert losses.weight_dict(cfg) == official_weights


@pytest.mark.parametrize("name, solver, scan_layers", GRAD_CASES)
def test_gradients_match_official(name, solver, scan_layers):
  _, _, grads, d, cfg = _official_losses_and_grads(name, solver, scan_layers)
  state, _ = convert.read_checkpoint(str(official(name + ".pth")))
  mapper = convert.KeyMapper(cfg.model)

  def ours(key):
    coll, path, transform = mapper(key, state[key].ndim)
    assert coll == "params", key
    x = grads
    for p in path:
      x = x[p]
    return x, transform

  norms = [k for k in d if k.startswith("gradnorm/")]
  assert norms
  for k in norms:
    key = k[len("gradnorm/") :]
    got, want = float(np.linalg.norm(ours(key)[0])), float(d[k])
    assert abs(got - want) <= 1e-3 * want, (key, got, want)
  for k in [k for k in d if k.startswith("grad/")]:
    key = k[len("grad/") :]
    got, transform = ours(key)
    want = transform(d[k])
    assert np.max(np.abs(got - want)) <= 1e-3 * np.max(np.abs(want)), key


def test_scoring_network_learns_only_from_mask_prediction_loss():
  """The DAM target and the kept indices carry no gradient: the scoring net's gradient is that of
  loss_mask_prediction."""
  model, variables, mc = convert.load_official(str(official("tiny_sparse.pth")))
  d = load_npz("tiny_sparse")
  cfg = ml_collections.ConfigDict({"model": mc, "loss": losses.loss_config()})
  images, mask, targets = jnp.asarray(d["images"].transpose(0, 2, 3, 1)), jnp.asarray(d["mask"]), fixture_targets(d)

  def grad_of(select):
    def f(params):
      ld = losses.compute(model.apply({**variables, "params": params}, images, mask), targets, cfg)
      return select(ld, cfg)

    return jax.jit(jax.grad(f))(variables["params"])["mask_predictor"]

  full = grad_of(losses.total)
  only = grad_of(lambda ld, c: ld["loss_mask_prediction"] * c.loss.mask_prediction_coef)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), full, only)


def test_images_without_boxes_and_bad_targets():
  model, variables, mc = convert.load_official(str(official("tiny_deformable.pth")))
  d = load_npz("tiny_deformable")
  cfg = ml_collections.ConfigDict({"model": mc, "loss": losses.loss_config()})
  out = jax.jit(model.apply)(variables, jnp.asarray(d["images"].transpose(0, 2, 3, 1)), jnp.asarray(d["mask"]))
  empty = {"labels": jnp.zeros((2, 4), jnp.int32), "boxes": jnp.zeros((2, 4, 4)), "valid": jnp.zeros((2, 4), bool)}
  ld = losses.compute(out, empty, cfg)
  assert all(np.isfinite(float(v)) for v in ld.values())
  assert float(ld["loss_bbox"]) == 0.0 and float(ld["loss_ce"]) > 0  # all predictions are negatives
  assert float(ld["class_error"]) == 100.0
  with pytest.raises(ValueError, match="targets: missing 'valid'"):
    losses.compute(out, {"labels": empty["labels"], "boxes": empty["boxes"]}, cfg)
  with pytest.raises(ValueError, match="boxes"):
    losses.compute(out, dict(empty, boxes=jnp.zeros((2, 4, 5))), cfg)
