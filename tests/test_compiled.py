"""Compiled programs saved by preflight and loaded by train.py and evaluate.py (sparse_detr_jax/compiled.py), on this
machine's CPU as 4 devices (`--topology cpu-4`): the loaded run compiles nothing and computes what a compiling run
computes, bit for bit; a run the programs do not match names the fields and compiles."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from sparse_detr_jax import compiled
from sparse_detr_jax.data import shapes

DEVICES = 4
ONE_CANVAS = "--config.data.buckets=((64, 64),)"  # holds every shapes_tiny image: one program


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  root = tmp_path_factory.mktemp("compiled")
  shapes.generate(str(root / "data"), 32, 4, seed=0)
  cmd = [
    sys.executable, "-m", "sparse_detr_jax.preflight", f"--config={ROOT / 'configs' / 'shapes_tiny.py'}",
    f"--topology=cpu-{DEVICES}", "--per_chip_batch=2", "--canvases=all", "--cache_dir=",
    f"--save_compiled={root / 'programs'}", f"--config.data.coco_dir={root / 'data'}", ONE_CANVAS,
  ]  # fmt: skip
  run = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"saved 2 compiled programs and manifest.json to {root / 'programs'}" in run.stdout  # train, predict
  return root


def program(root, script: str, *args: str) -> subprocess.CompletedProcess:
  """train.py or evaluate.py on this machine's CPU as DEVICES devices."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}", "JAX_PLATFORMS": "cpu"}
  run = subprocess.run(
    [sys.executable, str(ROOT / script), *args, "--noretain_host_memory"],
    cwd=root, env=env, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert run.returncode == 0, run.stderr[-3000:]
  return run


def train(root, workdir: str, *extra: str) -> tuple[list[float], str]:
  config = [f"--config={ROOT / 'configs' / 'shapes_tiny.py'}", f"--config.data.coco_dir={root / 'data'}", ONE_CANVAS]
  run = program(root, "train.py", *config, f"--workdir={workdir}", *extra)
  logged = [json.loads(line) for line in (root / workdir / "metrics.jsonl").read_text().splitlines()]
  return [m["total_loss"] for m in logged if "total_loss" in m], run.stderr


def test_a_loaded_run_compiles_nothing_and_equals_a_compiled_run(saved):
  losses, log = train(saved, "loaded", f"--compiled_dir={saved / 'programs'}")
  assert f"--compiled_dir {saved / 'programs'}: 1 train steps loaded, 0 compiled" in log, log[-3000:]
  assert "compiled in" not in log and "(loaded and ran)" in log
  reference, log = train(saved, "compiled")
  assert "compiled in" in log
  assert losses == reference and len(losses) == 4  # bit for bit
  run = program(saved, "evaluate.py", f"--workdir={saved / 'loaded'}", f"--compiled_dir={saved / 'programs'}")
  assert f"predict 64x64: loaded from {saved / 'programs' / 'predict_64x64.xla'}" in run.stderr, run.stderr[-3000:]
  assert "Average Precision" in run.stdout


def test_a_run_the_programs_do_not_match_names_each_field_and_loads_nothing(saved, caplog):
  manifest = json.loads((saved / "programs" / compiled.MANIFEST).read_text())
  assert (manifest["platform"], manifest["per_chip_batch"], len(manifest["devices"])) == ("cpu", 2, DEVICES)
  # 32 images, 8 a batch, less the 7 the one canvas may leave out (pipeline.Planner): 3 batches an epoch
  assert manifest["steps_per_epoch"] == 3 and manifest["config"]["model.rho"] == 0.1
  assert "train.seed" not in manifest["config"] and "data.coco_dir" not in manifest["config"]
  want = {k: v for k, v in manifest.items() if k != "programs"}
  assert compiled.Loader(str(saved / "programs"), want, None).mismatches == []
  other = {
    **want,
    "per_chip_batch": 1,
    "devices": want["devices"][::-1],
    "config": {**want["config"], "model.rho": 0.2},
  }
  loader = compiled.Loader(str(saved / "programs"), other, None)  # no mesh: nothing may be loaded
  assert loader.load("train", (64, 64)) is None
  assert "per_chip_batch: 2 saved, 1 in this run" in caplog.text
  assert "model.rho: 0.1 saved, 0.2 in this run" in caplog.text and "devices: " in caplog.text
