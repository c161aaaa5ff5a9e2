"""Training-step time and peak memory: the CPU demo config, and Sparse DETR rho 0.1 against its dense
baseline (Deformable DETR + top-k & BBR, rho 0) at 800x1333, batch 2.

    .venv/bin/python benchmarks/train_step.py [--cases demo,r50_rho0,r50_rho0.1] [--steps 3] [--dtype bfloat16]

Each case runs in a fresh process (so peak memory is its own): the jitted, donated train step of
trainer.make_train_step on a random batch with 10 boxes per image (the demo: 8, its max_boxes), timed warm
over `--steps` steps.
Memory: peak resident set size of the process (CPU; includes compilation) and, on an accelerator,
the device's peak bytes in use. Ratios are against the dense rho 0 case of the same run.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

from sparse_detr_jax import hostmem

CASES = {  # name: (config file, canvas (h, w), per-device batch)
  "demo": ("configs/shapes_demo.py", (96, 128), 8),
  "r50_rho0": ("configs/r50_efficient_detr.py", (800, 1333), 2),
  "r50_rho0.1": ("configs/r50_sparse_detr_rho_0.1.py", (800, 1333), 2),
}


def random_step(config, hw: tuple[int, int], per_device: int):
  """(jitted train step, step-0 state, batch) of a config (file or ConfigDict) on a random batch of canvas hw with
  10 boxes per image (fewer if data.max_boxes is smaller)."""
  import jax
  import numpy as np

  from sparse_detr_jax import config as config_lib
  from sparse_detr_jax import loop, trainer
  from sparse_detr_jax import model as model_lib

  (h, w) = hw
  cfg = config_lib.load_config_file(config) if isinstance(config, str) else config.copy_and_resolve_references()
  cfg.train.batch_size = per_device
  n = per_device * jax.device_count()
  mesh = trainer.data_mesh()
  model = model_lib.build_model(cfg.model)
  variables = model_lib.init_variables(model, jax.random.PRNGKey(0))
  state, tx, schedules = trainer.new_state(cfg, variables, n, 1000, jax.random.PRNGKey(1))
  state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  rng = np.random.default_rng(0)
  m = cfg.data.max_boxes
  k = min(10, m)
  boxes = np.zeros((n, m, 4), np.float32)
  boxes[:, :k] = np.concatenate([rng.uniform(0.2, 0.8, (n, k, 2)), rng.uniform(0.05, 0.3, (n, k, 2))], -1)
  batch = loop.global_batch(
    mesh,
    {
      "image": rng.normal(size=(n, h, w, 3)).astype(np.float32),
      "padding_mask": np.zeros((n, h, w), bool),
      "labels": rng.integers(1, cfg.model.num_classes, (n, m)).astype(np.int32),
      "boxes": boxes,
      "box_valid": np.arange(m)[None].repeat(n, 0) < k,
    },
  )
  return trainer.make_train_step(model, cfg, tx, mesh, schedules), state, batch


def step_seconds(config, hw: tuple[int, int], per_device: int, steps: int) -> tuple[float, float]:
  """(first step incl. compilation, warm step) seconds of a config's (file or ConfigDict) train step on a random
  batch."""
  import jax

  step, state, batch = random_step(config, hw, per_device)
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  return first, (time.perf_counter() - start) / steps


def measure(name: str, steps: int, dtype: str | None = None) -> dict:
  import jax

  from sparse_detr_jax import config as config_lib

  path, (h, w), per_device = CASES[name]
  cfg = config_lib.load_config_file(path)
  cfg.model.dtype = dtype or cfg.model.dtype
  first, sec = step_seconds(cfg, (h, w), per_device, steps)
  n = per_device * jax.device_count()
  stats = jax.devices()[0].memory_stats() or {}
  return {
    "case": name,
    "device": jax.devices()[0].device_kind,
    "dtype": cfg.model.dtype,
    "canvas": f"{h}x{w}",
    "batch": n,
    "first_step_s": first,
    "step_s": sec,
    "images_per_s": n / sec,
    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "device_peak_gib": stats.get("peak_bytes_in_use", float("nan")) / 2**30,
  }


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--cases", default=",".join(CASES))
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--dtype", default=None, help="compute dtype override, e.g. bfloat16 (parameters stay float32)")
  p.add_argument("--case", help=argparse.SUPPRESS)  # child process: measure one case, print JSON
  a = p.parse_args()
  if a.case:
    hostmem.retain_freed_memory()  # as train.py
    print(json.dumps(measure(a.case, a.steps, a.dtype)))
    return
  rows = []
  for name in a.cases.split(","):
    out = subprocess.run(
      [sys.executable, __file__, "--case", name, "--steps", str(a.steps), *(["--dtype", a.dtype] if a.dtype else [])],
      capture_output=True,
      text=True,
    )
    if out.returncode:  # e.g. out of memory: reported as a row, the other cases still run
      error = [line for line in out.stderr.splitlines() if "Error" in line or "error" in line]
      print(f"case {name} failed: {(error or [f'exit {out.returncode}'])[-1][:300]}", file=sys.stderr)
      rows.append({"case": name, "failed": (error or ["?"])[-1][:120]})
      continue
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  base = next((r for r in rows if r["case"] == "r50_rho0" and "failed" not in r), None)
  print(
    "| case | device | dtype | canvas | batch | first step s | step s | images/s | peak RSS GiB | device peak GiB "
    "| time vs rho 0 | RSS vs rho 0 |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
  )
  for r in rows:
    if "failed" in r:
      print(f"| {r['case']} | failed: {r['failed']} |")
      continue
    ratio = (
      f"{r['step_s'] / base['step_s']:.2f} | {r['peak_rss_gib'] / base['peak_rss_gib']:.2f}"
      if base and r["case"].startswith("r50")
      else "- | -"
    )
    print(
      f"| {r['case']} | {r['device']} | {r['dtype']} | {r['canvas']} | {r['batch']} | {r['first_step_s']:.1f} | "
      f"{r['step_s']:.2f} | {r['images_per_s']:.2f} | {r['peak_rss_gib']:.2f} | {r['device_peak_gib']:.2f} | "
      f"{ratio} |"
    )


if __name__ == "__main__":
  main()
