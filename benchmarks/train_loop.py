"""The real training loop against the bare jitted step, and what compilation costs a run.

    .venv/bin/python benchmarks/train_loop.py [--config configs/shapes_demo.py] [--steps 40] [--workers 0,1,2]

Loop: `trainer.train` (no eval, no pictures, one checkpoint at the end) over `--steps` steps; its
images/s is the one it logs over steps 2..N (steady state: the buckets are precompiled, so no
compilation falls inside). Bare: the same step function (trainer.make_train_step) on the same N global
batches, already on the devices, dispatched back to back. Ratio = loop / bare (goal >= 0.95 where
the host has cores for the loader). Each worker count runs in its own process.

Compilation (`--compile`): time from `train` start to the end of step 1 and the seconds spent compiling
during the first epoch's steps, with `train.precompile` never / always, each with a cold and a warm
persistent compilation cache (a warm cache is what a resumed run sees).

Data: the generated shapes dataset (`--data`, made in a temporary directory if absent). The last line is
`loop_vs_step_w<W>=<ratio> ...`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_case(args: argparse.Namespace, workers: int) -> dict:
  """In this process: bare-step and loop images/s for one loader worker count."""
  import jax

  from sparse_detr_jax import config as config_lib
  from sparse_detr_jax import loop, trainer
  from sparse_detr_jax import model as model_lib
  from sparse_detr_jax.data import pipeline, sources

  cfg = config_lib.load_config_file(args.config)
  cfg.data.update(coco_dir=args.data, num_workers=workers)
  cfg.train.update(
    max_steps=args.steps,
    log_every=args.steps,
    checkpoint_every=10**9,
    eval_at_end=False,
    eval_every_steps=0,
    picture_every_steps=0,
    precompile="always",
  )
  source = sources.build_source(cfg.data, "train")
  sch = trainer.schedule(cfg, source)
  mesh = trainer.data_mesh()
  model = model_lib.build_model(cfg.model)
  variables = trainer.initial_variables(cfg, model, jax.random.PRNGKey(0))
  state, tx, schedules = trainer.new_state(cfg, variables, sch.global_batch, sch.steps_per_epoch, jax.random.PRNGKey(1))
  state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  ds = pipeline.train_dataset(source, cfg.data, sch.global_batch, cfg.train.seed, args.steps)
  batches = [loop.global_batch(mesh, {k: ds[i][k] for k in trainer.BATCH_KEYS}) for i in range(args.steps)]
  step = loop.StepExecutables(trainer.make_train_step(model, cfg, tx, mesh, schedules))
  step.compile_all(state, batches[0], pipeline.data_spec(cfg.data).buckets)
  state, _ = step(state, batches[0])
  jax.block_until_ready(state)
  start = time.perf_counter()
  for b in batches[1:]:
    state, _ = step(state, b)
  jax.block_until_ready(state)
  bare = (args.steps - 1) * sch.global_batch / (time.perf_counter() - start)
  with tempfile.TemporaryDirectory() as workdir:
    trainer.train(cfg, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      logged = [json.loads(line) for line in f]
  looped = logged[-1]["images_per_second"]
  return {
    "workers": workers,
    "bare": bare,
    "loop": looped,
    "ratio": looped / bare,
    "devices": jax.device_count(),
    "backend": jax.default_backend(),
  }


def compile_case(args: argparse.Namespace, precompile: str) -> dict:
  """In this process: time to step 1 and compile seconds inside the first `--steps` steps."""
  import jax

  from sparse_detr_jax import config as config_lib
  from sparse_detr_jax import loop, trainer

  cfg = config_lib.load_config_file(args.config)
  cfg.data.update(coco_dir=args.data, num_workers=0)
  cfg.train.update(
    max_steps=args.steps,
    log_every=10**9,
    checkpoint_every=10**9,
    eval_at_end=False,
    eval_every_steps=0,
    picture_every_steps=0,
    precompile=precompile,
  )
  marks = {}
  real_call, real_compile = loop.StepExecutables.__call__, loop.StepExecutables.compile

  def timed_call(self, state, batch):
    out = real_call(self, state, batch)
    if "first_step" not in marks:
      jax.block_until_ready(out)
      marks["first_step"] = time.perf_counter()
    return out

  def timed_compile(self, state, batch):
    key, before = self._key(batch), dict(self.seconds)
    out = real_compile(self, state, batch)
    if key not in before and "first_step" in marks:
      marks["stalls"] = marks.get("stalls", 0.0) + self.seconds[key]
    return out

  loop.StepExecutables.__call__, loop.StepExecutables.compile = timed_call, timed_compile
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    trainer.train(cfg, workdir)
    total = time.perf_counter() - start
  return {
    "precompile": precompile,
    "to_first_step": marks["first_step"] - start,
    "stalls": marks.get("stalls", 0.0),
    "total": total,
  }


def in_subprocess(args: argparse.Namespace, kind: str, value: str, cache_dir: str | None) -> dict:
  env = {**os.environ, "PYTHONPATH": ROOT}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  cmd = [
    sys.executable,
    __file__,
    "--config",
    args.config,
    "--steps",
    str(args.steps),
    "--data",
    args.data,
    f"--_{kind}",
    value,
  ]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
  if out.returncode:
    raise RuntimeError(f"{kind}={value} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "shapes_demo.py"))
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--workers", default="0,1,2")
  p.add_argument("--data", default="")
  p.add_argument("--compile", action="store_true", help="also measure precompile never/always, cold/warm cache")
  p.add_argument("--_case", default=None, help=argparse.SUPPRESS)
  p.add_argument("--_compile_case", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args._case is not None:
    print(json.dumps(run_case(args, int(args._case))))
    return
  if args._compile_case is not None:
    print(json.dumps(compile_case(args, args._compile_case)))
    return
  with tempfile.TemporaryDirectory() as tmp:
    if not args.data:
      from sparse_detr_jax.data import shapes

      args.data = os.path.join(tmp, "shapes")
      shapes.generate(args.data, 400, 16, seed=0)
    rows = [in_subprocess(args, "case", w, None) for w in args.workers.split(",")]
    print(f"{os.path.basename(args.config)}, {args.steps} steps, {rows[0]['devices']} {rows[0]['backend']} device(s)")
    print("| loader workers | bare step img/s | train loop img/s | loop / step |\n|---|---|---|---|")
    for r in rows:
      print(f"| {r['workers']} | {r['bare']:.1f} | {r['loop']:.1f} | {r['ratio']:.3f} |")
    if args.compile:
      print("| precompile | cache | to first step s | compile stalls in the run s | run s |\n|---|---|---|---|---|")
      for mode in ("never", "always"):
        cache = os.path.join(tmp, f"cache_{mode}")
        for state in ("cold", "warm"):
          r = in_subprocess(args, "compile_case", mode, cache)
          print(f"| {mode} | {state} | {r['to_first_step']:.1f} | {r['stalls']:.1f} | {r['total']:.1f} |")
    print(" ".join(f"loop_vs_step_w{r['workers']}={r['ratio']:.3f}" for r in rows))


if __name__ == "__main__":
  main()
