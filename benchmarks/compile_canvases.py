"""Compiling every canvas of a config's train step: one after another against several at once, in one run.

    .venv/bin/python benchmarks/compile_canvases.py [--config configs/shapes_demo.py] [--rounds 2] [--threads 0]

Each case is a fresh process (no persistent compilation cache, so every canvas compiles) that builds the state and
a batch as train.py does and calls `loop.StepExecutables.compile_all` for every `data.buckets` canvas with
`train.compile_threads` 1 (the baseline) or `--threads` (0: one per canvas, at most the machine's cores); the
cases alternate over `--rounds`, so a shared machine's drift meets both. Reports the wall seconds of
compile_all and the process's peak resident memory. The last line is `sequential_s=<x> parallel_s=<x>
speedup=<x> peak_gib_sequential=<x> peak_gib_parallel=<x>` (medians).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def case(config: str, threads: int) -> dict:
  """In this process: compile_all over every canvas with `threads`."""
  import jax
  import numpy as np

  from sparse_detr_jax import config as config_lib
  from sparse_detr_jax import loop, trainer
  from sparse_detr_jax import model as model_lib

  jax.config.update("jax_enable_compilation_cache", False)
  cfg = config_lib.load_config_file(config)
  mesh = trainer.data_mesh()
  model = model_lib.build_model(cfg.model)
  variables = model_lib.init_variables(model, jax.random.PRNGKey(0))
  g = cfg.train.batch_size * jax.device_count()
  state, tx, schedules = trainer.new_state(cfg, variables, g, 1000, jax.random.PRNGKey(1))
  state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  (h, w), m = cfg.data.buckets[0], cfg.data.max_boxes
  host = {
    "image": np.zeros((g, h, w, 3), np.float32),
    "padding_mask": np.zeros((g, h, w), bool),
    "labels": np.zeros((g, m), np.int32),
    "boxes": np.zeros((g, m, 4), np.float32),
    "box_valid": np.zeros((g, m), bool),
  }
  batch = loop.global_batch(mesh, host)
  step = loop.StepExecutables(trainer.make_train_step(model, cfg, tx, mesh, schedules))
  start = time.perf_counter()
  step.compile_all(state, batch, [tuple(b) for b in cfg.data.buckets], threads)
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
  return {"threads": loop.compile_threads(threads, len(cfg.data.buckets)), "seconds": seconds, "peak": peak}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "shapes_demo.py"))
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--threads", type=int, default=0, help="the parallel case's threads (0: one per canvas)")
  p.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
  a = p.parse_args()
  if a.case is not None:
    print(json.dumps(case(a.config, a.case)))
    return
  env = {**os.environ, "PYTHONPATH": ROOT}
  results: dict[str, list[dict]] = {"sequential": [], "parallel": []}
  for r in range(a.rounds):
    for name, threads in (("sequential", 1), ("parallel", a.threads)):
      run = subprocess.run(
        [sys.executable, __file__, "--config", a.config, "--case", str(threads)],
        env=env, capture_output=True, text=True, check=True,
      )  # fmt: skip
      got = json.loads(run.stdout.strip().splitlines()[-1])
      results[name].append(got)
      print(
        f"round {r + 1} {name:<10} threads {got['threads']}: {got['seconds']:.1f} s, peak {got['peak'] / 2**30:.2f} GiB"
      )
  seq, par = (statistics.median(x["seconds"] for x in results[k]) for k in ("sequential", "parallel"))
  peak = {k: statistics.median(x["peak"] for x in v) / 2**30 for k, v in results.items()}
  print(
    f"sequential_s={seq:.1f} parallel_s={par:.1f} speedup={seq / par:.2f} "
    f"peak_gib_sequential={peak['sequential']:.2f} peak_gib_parallel={peak['parallel']:.2f}"
  )


if __name__ == "__main__":
  main()
