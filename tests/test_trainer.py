"""Trainer and evaluator: optimiser groups, three official optimiser steps, data-parallel step equality,
the device-side non-finite guard, steady steps without device reads, SIGKILL and SIGTERM resume, the
multi-host preemption sync point, two hosts == one host, the workdir's config, host callbacks in the
step, COCO evaluation against pycocotools run directly."""

import contextlib
import json
import logging
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from conftest import ROOT, load_npz, official
from flax import traverse_util

from sparse_detr_jax import checkpoints, convert, evaluator, loop, losses, optim, trainer
from sparse_detr_jax import config as config_lib
from sparse_detr_jax import model as model_lib
from sparse_detr_jax import workdir as workdir_lib
from sparse_detr_jax.data import pipeline, shapes, sources

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
STEPS = 10  # the train.py runs' length


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
  np.testing.assert_allclose(float(sched["base"](0)), 2e-4 * 2**0.5, rtol=1e-6)  # sqrt(32 / 16)
  np.testing.assert_allclose(float(sched["backbone"](3999)), 2e-5 * 2**0.5, rtol=1e-6)
  np.testing.assert_allclose(float(sched["linear_proj"](4000)), 2e-6 * 2**0.5, rtol=1e-6)  # epoch 40: x0.1


def run_step(data_dir, devices: int) -> dict:
  env = {**ENV, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  out = subprocess.run(
    [sys.executable, str(ROOT / "tests" / "train_check.py"), str(data_dir)],
    env=env,
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=900,
  )
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


def fresh_step_parts(cfg):
  """(mesh, model, step-0 state, optimiser, schedules) for `cfg` on every device."""
  model = model_lib.build_model(cfg.model)
  variables = model_lib.init_variables(model, jax.random.PRNGKey(0))
  return (trainer.data_mesh(), model, *trainer.new_state(cfg, variables, 2, 10, jax.random.PRNGKey(1)))


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_step_is_counted_on_device_and_never_applied(data_dir, mode):
  """A NaN batch: no update, counted on the device with its step; after it, 'stop' applies nothing more (the
  loop stops with the last good state), 'skip' goes on training."""
  cfg = tiny_config(data_dir)
  cfg.train.on_nonfinite = mode
  mesh, model, state, tx, schedules = fresh_step_parts(cfg)
  good = pipeline.train_dataset(sources.build_source(cfg.data, "train"), cfg.data, jax.device_count() * 2, 0, 1)[0]
  bad = {k: v.copy() for k, v in good.items()}
  bad["image"][0, 0, 0, 0] = np.nan
  step = trainer.make_train_step(model, cfg, tx, mesh, schedules)
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = step(state, loop.global_batch(mesh, {k: bad[k] for k in trainer.BATCH_KEYS}))
  assert int(metrics["nonfinite"]) == 1 and int(state.step) == 1
  assert int(state.nonfinite_steps) == 1 and int(state.first_nonfinite) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))
  state, metrics = step(state, loop.global_batch(mesh, {k: good[k] for k in trainer.BATCH_KEYS}))
  assert int(metrics["nonfinite"]) == 0 and int(state.nonfinite_steps) == 1 and int(state.first_nonfinite) == 1
  changed = any(
    not np.array_equal(a, np.asarray(b))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params), strict=True)
  )
  assert changed == (mode == "skip")


def train_cmd(
  data_dir, workdir, checkpoint_every: int = 2, steps: int = STEPS, retain_host_memory: bool = False
) -> list[str]:
  """A train.py command line. Runs that others are compared with keep train.py's default host-memory setting
  (hostmem.py); the rest turn it off, as the suite does (it slows compilation), so the comparisons also show that
  the setting changes no result."""
  return [
    sys.executable,
    str(ROOT / "train.py"),
    "--config",
    str(ROOT / "configs" / "shapes_tiny.py"),
    "--workdir",
    str(workdir),
    f"--config.data.coco_dir={data_dir}",
    f"--config.train.max_steps={steps}",
    f"--config.train.checkpoint_every={checkpoint_every}",
  ] + ([] if retain_host_memory else ["--noretain_host_memory"])


def final_params(workdir, step: int = STEPS) -> list[np.ndarray]:
  path = str(workdir / "checkpoints" / str(step))
  return [np.asarray(x) for x in jax.tree.leaves(checkpoints.restore_variables(path)["params"])]


def run_until(cmd: list[str], ready, timeout: float = 600) -> None:
  """Start `cmd`, SIGKILL it as soon as `ready()` holds (fails if it ends first)."""
  proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + timeout
  while not ready() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert ready(), "the run ended before the kill point"


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
  """The workdir of an uninterrupted train.py run of STEPS steps (checkpoints every 2)."""
  workdir = tmp_path_factory.mktemp("straight")
  cmd = train_cmd(data_dir, workdir, retain_host_memory=True)
  run = subprocess.run(cmd, env=ENV, cwd=ROOT, check=True, capture_output=True, text=True, timeout=900)
  (workdir / "train.log").write_text(run.stderr)
  return workdir


def test_sigkill_resume_matches_uninterrupted_run(data_dir, tmp_path, straight_run):
  """Killed once after a checkpoint and once while an asynchronous save is in flight (its directory not yet
  final), then rerun: same parameters as an uninterrupted run; the half-written checkpoint is never used."""
  ckpt = tmp_path / "killed" / "checkpoints"
  steps = lambda: sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []
  saving = lambda: ckpt.is_dir() and any(not p.name.isdigit() for p in ckpt.iterdir() if p.is_dir())
  run_until(train_cmd(data_dir, tmp_path / "killed"), lambda: 2 in steps())
  assert max(steps()) < STEPS
  run_until(
    train_cmd(data_dir, tmp_path / "killed", checkpoint_every=1), lambda: max(steps(), default=0) >= 3 and saving()
  )
  assert max(steps()) < STEPS
  subprocess.run(
    train_cmd(data_dir, tmp_path / "killed"), env=ENV, cwd=ROOT, check=True, capture_output=True, timeout=900
  )
  for a, b in zip(final_params(straight_run), final_params(tmp_path / "killed"), strict=True):
    np.testing.assert_array_equal(a, b)


def test_overfits_a_few_images(data_dir, tmp_path):
  """8 images, 300 steps: the loss falls and AP on those images rises from ~0."""
  cfg = tiny_config(data_dir)
  cfg.model.update(backbone="small_convnet", num_feature_levels=4)
  cfg.data.update(
    train_images="val",
    train_annotations="annotations/instances_val.json",
    num_workers=0,
    scales=[48, 56, 64],
    crop_resize=[48],
    crop_size=(40, 48),
    max_size=64,
    val_size=64,
    buckets=[(64, 64)],
  )
  cfg.train.update(max_steps=300, lr=1e-3, lr_backbone=1e-3, checkpoint_every=300, log_every=300, eval_at_end=True)
  model = model_lib.build_model(cfg.model)
  source = sources.build_source(cfg.data, "val")
  before = evaluator.evaluate(
    model,
    trainer.initial_variables(cfg, model, jax.random.PRNGKey(cfg.train.seed)),
    source,
    cfg.data,
    2,
    trainer.data_mesh(),
  )
  trainer.train(cfg, str(tmp_path))
  after = json.loads((tmp_path / "eval_step300_metrics.json").read_text())
  loss = [
    json.loads(line)["total_loss"]
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    if "total_loss" in line
  ]
  assert len(loss) == 2 and loss[1] < 0.5 * loss[0], loss
  assert before["AP50"] < 0.05 and after["AP50"] > 0.5, (before["AP50"], after["AP50"])


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def wait_for_logged_steps(workdir: pathlib.Path, n: int, procs: list[subprocess.Popen]) -> None:
  """Until the run in `workdir` has logged n steps (shapes_tiny logs every step); fails if a process ends first."""
  jsonl, deadline = workdir / "metrics.jsonl", time.time() + 600
  while not (jsonl.exists() and len(jsonl.read_text().splitlines()) >= n):
    assert all(p.poll() is None for p in procs) and time.time() < deadline, "the run ended before the signal"
    time.sleep(0.005)


def preempted_step(proc: subprocess.Popen, signalled_at: float) -> int:
  """The step a SIGTERM'd train.py stopped at; it must exit 0 within 60 s, saying how to resume."""
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0 and time.time() - signalled_at < 60, err[-3000:]
  stopped = re.search(
    r"preempted: stopped after step (\d+) of \d+ with a checkpoint at (\S+); rerun the same "
    r"command to resume",
    err,
  )
  assert stopped, err[-3000:]
  assert pathlib.Path(stopped.group(2)).is_dir()
  return int(stopped.group(1))


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_sigterm_saves_exits_zero_and_resumes_bit_identically(data_dir, tmp_path, straight_run):
  """SIGTERM mid-run (how schedulers preempt): exit 0 within 60 s with a checkpoint at the step it reached;
  the rerun of the same command ends with the parameters of an uninterrupted run, bit for bit."""
  workdir = tmp_path / "preempted"
  cmd = train_cmd(data_dir, workdir, checkpoint_every=1000)
  with processes(
    [subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)]
  ) as (proc,):
    wait_for_logged_steps(workdir, 2, [proc])
    proc.send_signal(signal.SIGTERM)
    step = preempted_step(proc, time.time())
  assert 2 <= step < STEPS and checkpoint_steps(workdir) == [step]
  subprocess.run(cmd, env=ENV, cwd=ROOT, check=True, capture_output=True, timeout=900)
  for a, b in zip(final_params(straight_run), final_params(workdir), strict=True):
    np.testing.assert_array_equal(a, b)


@contextlib.contextmanager
def processes(procs: list[subprocess.Popen]):
  """The processes; on leaving (a failed assertion too), any still running is killed and its pipe closed."""
  try:
    yield procs
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
      if p.stderr:
        p.stderr.close()


def test_two_hosts_preempted_and_resumed_train_like_one_host(data_dir, tmp_path):
  """2 processes x 2 CPU devices (jax.distributed on loopback, gloo collectives). SIGTERM to process 1 mid-run:
  JAX's preemption sync point stops both at the same step, both save it and exit 0. Rerun: the result equals
  1 process x 4 devices run straight through."""
  args = ["--config.train.batch_size=1", "--config.data.buckets=((64, 64),)"]  # one canvas: one compilation
  # No persistent compilation cache: only process 0 writes it, so process 1 would compile while process 0
  # loads, and gloo gives a process 30 s to join a collective.
  two = {k: v for k, v in ENV.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  two["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  workdir = tmp_path / "two_hosts"

  def start() -> list[subprocess.Popen]:
    address = f"localhost:{free_port()}"
    cmd = train_cmd(data_dir, workdir, checkpoint_every=1000) + args + ["--compilation_cache_dir="]
    return [
      subprocess.Popen(
        cmd + ["--coordinator_address", address, "--num_processes", "2", "--process_id", str(i)],
        env=two,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
      )
      for i in range(2)
    ]

  with processes(start()) as procs:
    wait_for_logged_steps(workdir, 2, procs)
    procs[1].send_signal(signal.SIGTERM)
    signalled_at = time.time()
    stopped = [preempted_step(p, signalled_at) for p in procs]
  assert stopped[0] == stopped[1] < STEPS and checkpoint_steps(workdir) == [stopped[0]], stopped
  with processes(start()) as procs:
    errs = [p.communicate(timeout=900)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n--- process 1:\n".join(e[-2500:] for e in errs)
  subprocess.run(
    train_cmd(data_dir, tmp_path / "one_host", checkpoint_every=1000, retain_host_memory=True) + args,
    cwd=ROOT,
    check=True,
    capture_output=True,
    env={**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    timeout=900,
  )
  for a, b in zip(final_params(tmp_path / "one_host"), final_params(workdir), strict=True):
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
    results.append(
      {
        "image_id": a["image_id"],
        "category_id": cat,
        "bbox": [x + jit[0], y + jit[1], w + jit[2], h + jit[3]],
        "score": float(rng.random()),
      }
    )
  results += [{"image_id": int(src.image_ids[0]), "category_id": 2, "bbox": [1, 1, 10, 10], "score": 0.9}]
  stats, table = evaluator.coco_eval(evaluator.ground_truth(src), results, list(src.image_ids))
  gt = COCO(str(pathlib.Path(data_dir) / "annotations" / "instances_val.json"))
  ev = COCOeval(gt, gt.loadRes(results), "bbox")
  ev.evaluate(), ev.accumulate(), ev.summarize()
  np.testing.assert_allclose([stats[k] for k in evaluator.STAT_NAMES], ev.stats, rtol=0, atol=1e-12)
  assert 0.2 < stats["AP50"] < 1.0 and "Average Precision" in table
  assert set(k for k in stats if k.startswith("AP_per_class/")) == {
    f"AP_per_class/{c['name']}" for c in shapes.CATEGORIES
  }


def test_three_steps_match_the_official_optimiser():
  """`train_tiny`: three official AdamW steps (three lr groups, clipping 0.1) from official weights on one
  batch. Losses per step within 1e-4 rel; each tensor's total update within 5e-3 of the official update
  (relative to its norm, the fixture README's measure); no element more than half a step (0.5 lr) away."""
  d = load_npz("train_tiny")
  model, variables, mc = convert.load_official(str(official("train_tiny.pth")))
  cfg = ml_collections.ConfigDict({"model": mc, "loss": losses.loss_config(), "train": config_lib.train_config()})
  state, tx, schedules = trainer.new_state(cfg, variables, 2, 1000, jax.random.PRNGKey(0))
  params = variables["params"]
  np.testing.assert_allclose([float(schedules[k](0)) for k in ("base", "backbone", "linear_proj")], d["lr"], rtol=1e-6)
  boxes = [d[f"target_boxes_{b}"] for b in range(2)]
  m = max(len(b) for b in boxes)
  batch = {
    "image": d["images"].transpose(0, 2, 3, 1),
    "padding_mask": d["mask"],
    "labels": np.zeros((2, m), np.int32),
    "boxes": np.tile(np.float32([0.5, 0.5, 1, 1]), (2, m, 1)),
    "box_valid": np.zeros((2, m), bool),
  }
  for b, bx in enumerate(boxes):
    batch["labels"][b, : len(bx)], batch["boxes"][b, : len(bx)], batch["box_valid"][b, : len(bx)] = (
      d[f"target_labels_{b}"],
      bx,
      True,
    )
  mesh = trainer.data_mesh()
  batch = loop.global_batch(mesh, batch)
  initial = traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
  step = trainer.make_train_step(model, cfg, tx, mesh, schedules)
  for i in range(3):
    state, metrics = step(state, batch)
    np.testing.assert_allclose(float(metrics["total_loss"]), d["losses"][i], rtol=1e-4, err_msg=f"step {i}")
    np.testing.assert_allclose(float(metrics["grad_norm"]), d["grad_norms"][i], rtol=1e-4, err_msg=f"step {i}")
  final_sd, _ = convert.read_checkpoint(str(official("train_tiny_final.pth")))
  official_final = traverse_util.flatten_dict(convert.convert_state_dict(final_sd, mc)["params"])
  ours = traverse_util.flatten_dict(jax.tree.map(np.asarray, state.params))
  lr = dict(zip(("base", "backbone", "linear_proj"), d["lr"], strict=True))
  group = traverse_util.flatten_dict(optim.param_labels(params, mc.backbone, True))
  assert set(ours) == set(official_final) == set(initial)
  for k, off in official_final.items():
    name = "/".join(k)
    update = np.linalg.norm(off - initial[k])
    assert update > 0, name
    assert np.linalg.norm(ours[k] - off) <= 5e-3 * update, (name, np.linalg.norm(ours[k] - off) / update)
    assert np.abs(ours[k] - off).max() <= 0.5 * lr[group[k]], name


def test_steady_state_steps_do_not_read_the_device(data_dir, tmp_path, monkeypatch, caplog):
  """The loop reads the device only at log / checkpoint / eval steps. Every device-to-host read of a jax.Array
  (float(), np.asarray, device_get, Orbax's copy) goes through ArrayImpl._value: counted per step. (JAX's
  transfer guard would say the same on an accelerator; on the CPU it has no transfer to guard.) Precompile
  compiles every bucket before step 1."""
  cfg = tiny_config(data_dir)
  cfg.train.update(max_steps=6, log_every=4, checkpoint_every=5, precompile="always")
  array_type = type(jax.numpy.zeros(()))
  real_value, real_call = array_type._value, loop.StepExecutables.__call__
  steps, reads = [0], []

  def counting_call(self, state, batch):
    steps[0] += 1
    return real_call(self, state, batch)

  monkeypatch.setattr(array_type, "_value", property(lambda self: reads.append(steps[0]) or real_value.fget(self)))
  float(jax.numpy.ones(()) + 1)
  assert reads == [0]  # the instrument sees a read
  monkeypatch.setattr(loop.StepExecutables, "__call__", counting_call)
  with caplog.at_level(logging.INFO):
    trainer.train(cfg, str(tmp_path))
  assert steps[0] == 6 and {1, 4, 5, 6} <= set(reads), sorted(set(reads))
  assert set(reads) <= {0, 1, 4, 5, 6}, f"device reads at steady steps: {sorted(set(reads) - {0, 1, 4, 5, 6})}"
  compiled = [r.getMessage() for r in caplog.records if "compiled in" in r.getMessage()]
  assert len(compiled) == len(cfg.data.buckets), compiled


def test_a_workdir_refuses_a_different_run(data_dir, straight_run, caplog):
  """A rerun in a workdir whose config.json differs in a field that matters stops before building anything,
  naming the field; harmless changes (log interval, max_steps) resume."""
  cfg = tiny_config(data_dir)
  cfg.train.update(max_steps=STEPS, checkpoint_every=2)
  cfg.model.dim_feedforward = 128
  with pytest.raises(ValueError, match=r"model\.dim_feedforward: 64 in the workdir, 128 now") as e:
    trainer.train(cfg, str(straight_run))
  assert "new --workdir" in str(e.value)
  cfg.model.dim_feedforward = 64
  cfg.train.log_every = 3
  with caplog.at_level(logging.INFO):
    workdir_lib.check(cfg, str(straight_run))
  assert any("train.log_every" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("solver", ["jax", "scipy"])
def test_train_step_host_callbacks(data_dir, solver):
  """TPU readiness: with the on-device matcher the compiled step holds no host callback (the scipy one does)."""
  cfg = tiny_config(data_dir)
  cfg.loss.matcher = solver
  mesh, model, state, tx, schedules = fresh_step_parts(cfg)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  g, (h, w), m = 2 * jax.device_count(), cfg.data.buckets[0], cfg.data.max_boxes
  batch = {
    k: jax.ShapeDtypeStruct(s, t, sharding=sharding)
    for k, (s, t) in {
      "image": ((g, h, w, 3), np.float32),
      "padding_mask": ((g, h, w), bool),
      "labels": ((g, m), np.int32),
      "boxes": ((g, m, 4), np.float32),
      "box_valid": ((g, m), bool),
    }.items()
  }
  text = trainer.make_train_step(model, cfg, tx, mesh, schedules).lower(state, batch).as_text()
  assert ("callback" in text) == (solver == "scipy")


def test_eval_metrics_are_strict_json(tmp_path):
  evaluator.write_metrics(tmp_path / "m.json", {"AP": 0.5, "AP_per_class/none": float("nan"), "skipped_images": 0})
  assert json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == {
    "AP": 0.5, "AP_per_class/none": None, "skipped_images": 0
  }  # fmt: skip


def test_evaluate_uses_the_workdirs_config(straight_run):
  """evaluate.py --workdir W without --config: W's config.json (data paths, overrides) and latest checkpoint."""
  run = subprocess.run(
    [sys.executable, str(ROOT / "evaluate.py"), f"--workdir={straight_run}", "--noretain_host_memory"],
    env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert run.returncode == 0, run.stderr[-3000:]
  assert "Average Precision" in run.stdout
  assert "AP50" in json.loads((straight_run / "eval_metrics.json").read_text())
  run = subprocess.run([sys.executable, str(ROOT / "evaluate.py")], cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 2 and run.stderr.strip() == "evaluate.py: give --workdir or --checkpoint"


def test_the_log_says_when_checkpoints_are_written_and_the_run_ends(straight_run):
  log = (straight_run / "train.log").read_text()
  assert f"step 2: checkpoint {straight_run / 'checkpoints' / '2'} (written in the background)" in log
  assert f"finished: {STEPS} steps; the final checkpoint is {straight_run / 'checkpoints' / str(STEPS)}" in log
  first = next(line for line in log.splitlines() if f"step 1/{STEPS}" in line)
  assert "(compiled and ran)" in first and "ETA" not in first  # no rate from a step that was mostly compiling
  assert "ETA" in next(line for line in log.splitlines() if f"step 2/{STEPS}" in line)
  logged = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()]
  counts = [(m["skipped_images"], m["dropped_boxes"]) for m in logged if "total_loss" in m]
  assert counts and set(counts) == {(0, 0)}, counts  # shapes images have 1-4 boxes, max_boxes is 6


def test_imagenet_resnet_weights_for_a_swin_model_are_refused_before_anything_is_built():
  cfg = config_lib.load_config_file(str(ROOT / "configs" / "swint_sparse_detr_rho_0.1.py"))
  cfg.train.backbone_checkpoint = "resnet50-0676ba61.pth"
  with pytest.raises(ValueError, match="this config's backbone is swin-t: start from an official Sparse DETR"):
    trainer.initial_variables(cfg, None, None)
