"""Pre-flight: topology names, the HLO accounting, and the tiny config's train step and inference compiled for a
TPU slice (libtpu, outside the project's environment): no host callback, per-chip memory as measured, and a
batch too large for the chip named with the batch that fits."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import ROOT

from sparse_detr_jax import preflight

LIBTPU = pathlib.Path(os.environ.get("SPARSE_DETR_LIBTPU", ROOT / ".libtpu" / "libtpu" / "libtpu.so"))
REQUIRE_LIBTPU = os.environ.get("SPARSE_DETR_REQUIRE_LIBTPU", "") == "1"
CACHE = os.environ.get("SPARSE_DETR_PREFLIGHT_CACHE", str(ROOT / ".jax_cache" / "preflight"))


def require_libtpu() -> None:
  if not LIBTPU.exists():
    msg = f"{LIBTPU} not found: run 'make install-libtpu' (or set SPARSE_DETR_LIBTPU to a libtpu.so)"
    if REQUIRE_LIBTPU:
      pytest.fail(msg)
    pytest.skip(msg)


@pytest.mark.parametrize(
  "name, chips, shape",
  [("v5e-4", 4, (2, 2)), ("v5e-16", 16, (4, 4)), ("v6e-256", 256, (16, 16)), ("v4-8", 4, (2, 2, 1)),
   ("v5p-128", 64, (4, 4, 4)), ("v4-4096", 2048, (8, 16, 16))],
)  # fmt: skip
def test_topology_names_count_chips(name, chips, shape):
  t = preflight.parse_topology(name)
  assert (t.chips, t.shape(), t.hbm_gib) == (chips, shape, preflight.CHIPS[t.kind].hbm_gib)


@pytest.mark.parametrize("name", ["v5e-2", "v4-6", "v5e-12", "tpu-8", "h100", "v5e-0"])
def test_bad_topology_names_say_what_is_expected(name):
  with pytest.raises(ValueError, match="--topology"):
    preflight.parse_topology(name)


def test_collectives_and_callbacks_are_read_off_hlo():
  hlo = "\n".join([
    "  %all-reduce.1 = (f32[256]{0}, bf16[4,8]{1,0}) all-reduce(%a, %b), replica_groups={}, to_apply=%add",
    "  %ars = f32[10]{0} all-reduce-start(%c), to_apply=%add",
    "  %ard = f32[10]{0} all-reduce-done(%ars)",
    '  %cc = s32[2,6]{1,0} custom-call(%x), custom_call_target="xla_ffi_python_cpu_callback"',
    "  %s = (f32[2], u32[], token[]) send(%y, %t), channel_id=3, is_host_transfer=true",
  ])  # fmt: skip
  assert preflight.collectives(hlo) == (2, 256 * 4 + 32 * 2 + 10 * 4)
  assert preflight.host_callbacks(hlo) == 2


def _preflight(tmp_path, *flags):
  require_libtpu()
  env = dict(os.environ, TPU_LIBRARY_PATH=str(LIBTPU), **preflight.LIBTPU_ENVIRONMENT)
  cmd = [sys.executable, "-m", "sparse_detr_jax.preflight", "--config=configs/shapes_tiny.py", "--topology=v5e-8"]
  return subprocess.run(
    cmd + [f"--cache_dir={CACHE}", *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
  )


def test_tiny_config_compiles_for_a_v5e_slice(tmp_path):
  run = _preflight(tmp_path, "--per_chip_batch=2", f"--json={tmp_path / 'r.json'}")
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  last = dict(kv.split("=") for kv in run.stdout.strip().splitlines()[-1].split())
  assert (last["topology"], last["chips"], last["canvas"], last["fits"], last["host_callbacks"]) == (
    "v5e-8", "8", "40x64", "1", "0"
  )  # fmt: skip
  rows = {r["function"]: r for r in json.loads((tmp_path / "r.json").read_text())["rows"]}
  train, predict = rows["train"], rows["predict"]
  assert train["host_callbacks"] == predict["host_callbacks"] == 0  # the on-device matcher, as 'auto' on TPU
  assert train["all_reduces"] >= 1 and predict["all_reduces"] == 0  # the gradient mean; inference is per chip
  # Per-chip memory, measured once (libtpu 0.0.42.1): train 0.19 GiB, inference 0.017 GiB.
  assert 0.15 < train["hbm_gib"] < 0.25 and 0.01 < predict["hbm_gib"] < 0.03, (train["hbm_gib"], predict["hbm_gib"])
  assert predict["flops"] > 0
  # XLA:TPU's estimate, by part of the model: every part's time adds up to the step's; the sampling is there in
  # both directions of the train step, the matcher's loops are data-dependent.
  for r in (train, predict):
    assert r["est_step_s"] > 0 and 0 < r["est_mfu"] < 1 and r["matmul_flops"] > 0
    assert abs(sum(r["est_parts_s"].values()) - r["est_step_s"]) < 1e-9
  assert {"deformable sampling/forward", "deformable sampling/backward", "matcher/forward"} <= set(train["est_parts_s"])
  assert train["est_unknown_trip_loops"] > 0 and predict["est_unknown_trip_loops"] == 0
  # The sampling's row gathers and their scatter-add are custom fusions XLA:TPU does not price: counted, said.
  assert train["est_unpriced"]["deformable sampling/forward"] > 0, train["est_unpriced"]
  assert train["est_unpriced"]["deformable sampling/backward"] > 0, train["est_unpriced"]
  assert "estimated time by part" in run.stdout and "not in the estimate: gathers and scatters" in run.stdout


def test_a_batch_too_large_exits_1_naming_the_batch_that_fits(tmp_path):
  run = _preflight(tmp_path, "--per_chip_batch=2", "--functions=train", "--hbm_gib=0.15")
  assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
  assert "does not fit: train 40x64 at 2 images per chip" in run.stdout
  assert "the largest per-chip batch that fits: 1" in run.stdout, run.stdout[-2000:]
  assert "fits=0" in run.stdout.strip().splitlines()[-1]


CALLBACK = """
import jax, jax.numpy as jnp, numpy as np
from sparse_detr_jax import preflight
mesh = jax.sharding.Mesh(np.array(preflight.devices(preflight.parse_topology("v5e-4"))), ("data",))
x = jax.ShapeDtypeStruct((8,), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
f = lambda x: jax.pure_callback(np.sin, jax.ShapeDtypeStruct((8,), jnp.float32), x) + 1
print(preflight.host_callbacks(jax.jit(f).lower(x).compile().as_text()))
"""


def test_a_host_callback_compiled_for_tpu_is_counted():
  require_libtpu()
  env = dict(os.environ, TPU_LIBRARY_PATH=str(LIBTPU), **preflight.LIBTPU_ENVIRONMENT)
  run = subprocess.run([sys.executable, "-c", CALLBACK], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
  assert run.returncode == 0, run.stderr[-3000:]
  assert int(run.stdout.split()[-1]) >= 1, run.stdout


SAMPLING = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from sparse_detr_jax import deformable_attention as da, preflight
mesh = jax.sharding.Mesh(np.array(preflight.devices(preflight.parse_topology("v5e-4"))), ("data",))
shapes = ((16, 24), (8, 12), (4, 6), (2, 3))
n = sum(h * w for h, w in shapes)
def lowered(q, dtype):
  a = lambda *s, dt=jnp.float32: jax.ShapeDtypeStruct(s, dt, sharding=NamedSharding(mesh, P()))
  args = (a(2, n, 8, 32, dt=dtype), a(2, q, 8, 4, 4, 2), a(2, q, 8, 4, 4, dt=dtype))
  return jax.jit(da.deformable_sample, static_argnums=1).lower(args[0], shapes, *args[1:]).as_text()
many = da.SEPARABLE_MIN_QUERIES
for q, dtype in ((many, jnp.bfloat16), (300, jnp.bfloat16), (many, jnp.float32)):
  print(q, jnp.dtype(dtype).name, "gather" in lowered(q, dtype))
"""


def test_tpu_programs_sample_without_a_gather_in_bfloat16():
  """On TPU, bfloat16 sampling with many queries is the separable formulation (no gather); few queries or float32
  keep the gather (deformable_attention.SEPARABLE_MIN_QUERIES)."""
  require_libtpu()
  env = dict(os.environ, TPU_LIBRARY_PATH=str(LIBTPU), **preflight.LIBTPU_ENVIRONMENT)
  run = subprocess.run([sys.executable, "-c", SAMPLING], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.split("\n")[-4:-1] == ["1024 bfloat16 False", "300 bfloat16 True", "1024 float32 True"], run.stdout


def test_a_program_xla_refuses_for_memory_does_not_fit():
  error = RuntimeError(
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (89.24G) exceeds "
    "available HBM (15.75G)."
  )
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  args = ({"x": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=one)},)
  p = preflight._refused(error, "train", (800, 1333), 64, args, 1.0)
  assert (p.temp_bytes, p.argument_bytes) == (int(89.24 * 2**30), 128)
  assert not preflight.fits(p, 16.0)
  with pytest.raises(ValueError, match="other"):
    preflight._refused(ValueError("other"), "train", (800, 1333), 64, args, 1.0)
