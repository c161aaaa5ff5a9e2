"""Trainer and evaluator: optimiser groups, data-parallel step equality, non-finite guard, SIGKILL
resume, two hosts == one host, COCO evaluation against pycocotools run directly."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from sparse_detr_jax import config as config_lib, evaluator, model as model_lib, optim, trainer
from sparse_detr_jax.data import pipeline, shapes, sources

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("shapes")
  shapes.generate(str(root), 24, 8, seed=0)
  return root


def tiny_config(data_dir):
  cfg = config_lib.load_config_file(str(ROOT / "configs" / "shapes_tiny.py"))
  cfg.data.coco_dir = str(data_dir)
  return cfg


def test_optimizer_groups_match_official():
  cfg = config_lib.load_config_file(str(ROOT / "configs" / "r50_sparse_detr_rho_0.1.py"))
  params = model_lib.variable_shapes(model_lib.build_model(cfg.model))["params"]
  labels = jax.tree_util.tree_flatten_with_path(optim.param_labels(params, "resnet50", True))[0]
  by = {jax.tree_util.keystr(k): v for k, v in labels}
  frozen = {k for k, v in by.items() if v == "frozen"}
  assert frozen == {k for k in by if k.startswith(("['backbone']['conv1']", "['backbone']['layer1_"))} and frozen
  assert all(v == "backbone" for k, v in by.items() if "'layer4_" in k)
  assert all(v == "linear_proj" for k, v in by.items() if "sampling_offsets" in k or "reference_points" in k)
  assert by["['class_embed_0']['bias']"] == "base"
  tx, sched = optim.make_optimizer(cfg.train, cfg.model, params, global_batch=32, steps_per_epoch=100)
  np.testing.assert_allclose(float(sched["base"](0)), 2e-4 * 2 ** 0.5, rtol=1e-6)  # sqrt(32 / 16)
  np.testing.assert_allclose(float(sched["backbone"](3999)), 2e-5 * 2 ** 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(sched["linear_proj"](4000)), 2e-6 * 2 ** 0.5, rtol=1e-6)  # epoch 40: x0.1


def run_step(data_dir, devices: int) -> dict:
  env = {**ENV, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  out = subprocess.run([sys.executable, str(ROOT / "tests" / "train_check.py"), str(data_dir)], env=env,
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_four_devices_step_equals_one_device(data_dir):
  one, four = run_step(data_dir, 1), run_step(data_dir, 4)
  assert one["devices"] == 1 and four["devices"] == 4
  for k in one["metrics"]:
    if k in ("class_error", "cardinality_error", "corr_mask_attn_map_dec_0") or k.startswith("corr_"):
      continue  # logged metrics: a mean of per-device values, as official reduce_dict
    np.testing.assert_allclose(four["metrics"][k], one["metrics"][k], rtol=1e-5, atol=1e-6, err_msg=k)
  for k in one["params"]:
    np.testing.assert_allclose(four["params"][k], one["params"][k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_nonfinite_step_leaves_state_unchanged(data_dir):
  cfg = tiny_config(data_dir)
  mesh = trainer.data_mesh()
  model = model_lib.build_model(cfg.model)
  variables = model_lib.init_variables(model, jax.random.PRNGKey(0))
  params = variables.pop("params")
  tx, schedules = optim.make_optimizer(cfg.train, cfg.model, params, 2, 10)
  state = trainer.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(1), variables)
  b = pipeline.train_dataset(sources.build_source(cfg.data, "train"), cfg.data, jax.device_count() * 2, 0, 1)[0]
  b["image"][0, 0, 0, 0] = np.nan
  batch = evaluator.global_batch(mesh, {k: b[k] for k in ("image", "padding_mask", "labels", "boxes", "box_valid")})
  before = jax.tree.map(np.asarray, state.params)
  new, metrics = trainer.make_train_step(model, cfg, tx, mesh, schedules)(state, batch)
  assert int(metrics["nonfinite"]) == 1 and int(new.step) == 1
  for a, b2 in zip(jax.tree.leaves(before), jax.tree.leaves(new.params)):
    np.testing.assert_array_equal(a, np.asarray(b2))


def train_cmd(data_dir, workdir, checkpoint_every: int = 2, steps: int = 6) -> list[str]:
  return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "shapes_tiny.py"),
          "--workdir", str(workdir), f"--config.data.coco_dir={data_dir}", f"--config.train.max_steps={steps}",
          f"--config.train.checkpoint_every={checkpoint_every}"]


def final_params(workdir, step: int = 6) -> list[np.ndarray]:
  path = str(workdir / "checkpoints" / str(step))
  return [np.asarray(x) for x in jax.tree.leaves(trainer.restore_variables(path)["params"])]


def run_until(cmd: list[str], ready, timeout: float = 600) -> None:
  """Start `cmd`, SIGKILL it as soon as `ready()` holds (fails if it ends first)."""
  proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + timeout
  while not ready() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert ready(), "the run ended before the kill point"


def test_sigkill_resume_matches_uninterrupted_run(data_dir, tmp_path):
  """Killed once after a checkpoint and once in the middle of writing one, then rerun: same parameters as an
  uninterrupted run; the half-written checkpoint is never used."""
  subprocess.run(train_cmd(data_dir, tmp_path / "straight"), env=ENV, cwd=ROOT, check=True, capture_output=True,
                 timeout=900)
  ckpt = tmp_path / "killed" / "checkpoints"
  steps = lambda: sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []
  saving = lambda: ckpt.is_dir() and any(not p.name.isdigit() for p in ckpt.iterdir() if p.is_dir())
  run_until(train_cmd(data_dir, tmp_path / "killed"), lambda: 2 in steps())
  assert max(steps()) < 6
  run_until(train_cmd(data_dir, tmp_path / "killed", checkpoint_every=1), lambda: max(steps(), default=0) >= 3 and saving())
  assert max(steps()) < 6
  subprocess.run(train_cmd(data_dir, tmp_path / "killed"), env=ENV, cwd=ROOT, check=True, capture_output=True,
                 timeout=900)
  for a, b in zip(final_params(tmp_path / "straight"), final_params(tmp_path / "killed")):
    np.testing.assert_array_equal(a, b)


def test_overfits_a_few_images(data_dir, tmp_path):
  """8 images, 300 steps: the loss falls and AP on those images rises from ~0."""
  cfg = tiny_config(data_dir)
  cfg.model.update(backbone="small_convnet", num_feature_levels=4)
  cfg.data.update(train_images="val", train_annotations="annotations/instances_val.json", num_workers=0,
                  scales=[48, 56, 64], crop_resize=[48], crop_size=(40, 48), max_size=64, val_size=64,
                  buckets=[(64, 64)])
  cfg.train.update(max_steps=300, lr=1e-3, lr_backbone=1e-3, checkpoint_every=300, log_every=300, eval_at_end=True)
  model = model_lib.build_model(cfg.model)
  source = sources.build_source(cfg.data, "val")
  before = evaluator.evaluate(model, trainer.initial_variables(cfg, model, jax.random.PRNGKey(cfg.train.seed)),
                              source, cfg.data, 2, trainer.data_mesh())
  trainer.train(cfg, str(tmp_path))
  after = json.loads((tmp_path / "eval_step300_metrics.json").read_text())
  loss = [json.loads(line)["total_loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
          if "total_loss" in line]
  assert len(loss) == 2 and loss[1] < 0.5 * loss[0], loss
  assert before["AP50"] < 0.05 and after["AP50"] > 0.5, (before["AP50"], after["AP50"])


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_hosts_train_like_one_host_with_four_devices(data_dir, tmp_path):
  """2 processes x 2 CPU devices (jax.distributed on loopback, gloo collectives) == 1 process x 4 devices."""
  args = ["--config.train.batch_size=1"]
  two = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  address = f"localhost:{free_port()}"
  procs = [subprocess.Popen(train_cmd(data_dir, tmp_path / "two_hosts", steps=2) + args + [
      "--coordinator_address", address, "--num_processes", "2", "--process_id", str(i)],
      env=two, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
  subprocess.run(train_cmd(data_dir, tmp_path / "one_host", steps=2) + args, cwd=ROOT, check=True,
                 capture_output=True, env={**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, timeout=900)
  for a, b in zip(final_params(tmp_path / "one_host", 2), final_params(tmp_path / "two_hosts", 2)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_coco_eval_equals_pycocotools_directly(data_dir):
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  src = sources.build_source(tiny_config(data_dir).data, "val")
  gt_json = src.coco_dataset()
  rng = np.random.default_rng(0)
  results = []
  for a in gt_json["annotations"]:  # jittered true boxes, some with the wrong class, plus false positives
    x, y, w, h = a["bbox"]
    jit = rng.normal(0, 2, 4)
    cat = a["category_id"] if rng.random() < 0.8 else 1 + a["category_id"] % 6
    results.append({"image_id": a["image_id"], "category_id": cat, "bbox": [x + jit[0], y + jit[1], w + jit[2], h + jit[3]],
                    "score": float(rng.random())})
  results += [{"image_id": int(src.image_ids[0]), "category_id": 2, "bbox": [1, 1, 10, 10], "score": 0.9}]
  stats, table = evaluator.coco_eval(evaluator.ground_truth(src), results, list(src.image_ids))
  gt = COCO(str(pathlib.Path(data_dir) / "annotations" / "instances_val.json"))
  ev = COCOeval(gt, gt.loadRes(results), "bbox")
  ev.evaluate(), ev.accumulate(), ev.summarize()
  np.testing.assert_allclose([stats[k] for k in evaluator.STAT_NAMES], ev.stats, rtol=0, atol=1e-12)
  assert 0.2 < stats["AP50"] < 1.0 and "Average Precision" in table
  assert set(k for k in stats if k.startswith("AP_per_class/")) == {f"AP_per_class/{c['name']}" for c in shapes.CATEGORIES}
