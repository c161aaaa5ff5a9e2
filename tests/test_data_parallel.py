"""The loss inside a shard_map data-parallel step on 4 CPU devices equals one device on the same batch."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, official


@pytest.mark.parametrize("solver", ["scipy", "jax"])
def test_shard_map_losses_equal_single_device(solver):
  # Deformable DETR (rho 0): Sparse DETR's per-device quirks (batch-minimum padding score, K = per-device
  # max count) make its per-device numbers depend on how the batch is split, exactly as the official code.
  ckpt, npz = official("tiny_deformable.pth"), official("tiny_deformable.npz")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, str(ROOT / "tests" / "dp_losses_check.py"), str(ckpt), str(npz), solver],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(res["dp"]) == set(res["one"])
  for k, v in res["one"].items():
    assert abs(res["dp"][k] - v) <= 1e-5 * max(abs(v), 1e-3), (k, res["dp"][k], v)
  assert abs(res["dp_total"] - res["one_total"]) <= 1e-5 * abs(res["one_total"])
