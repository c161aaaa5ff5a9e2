"""Where a training step's time goes: a jax.profiler trace of the warm, jitted train step (trainer.make_train_step
on a random batch, as benchmarks/train_step.py), every executed XLA op attributed, through the op_name metadata
JAX writes into the compiled program, to a part of the step, forward and backward apart.

    .venv/bin/python benchmarks/profile_step.py [--config configs/r50_sparse_detr_rho_0.1.py]
        [--height 384 --width 512] [--batch 2] [--steps 2] [--top 0] [--forward]

`--forward` profiles the jitted inference forward (model.apply on random images) instead of the train step.

Parts (`sparse_detr_jax/costmodel.py`, which also gives XLA:TPU's estimate of each): backbone convolutions, the
rest of the backbone (frozen BatchNorm, ReLU, pooling), deformable sampling (MSDeformAttn between its linear
layers: corner indices and weights, the gather, the weighted sum; its backward is the scatter-add), the rest of the
model (linear layers, norms, heads, top-rho / top-k), matcher (cost and solver, `jax.named_scope("matcher")`),
losses (`"losses"`, the DAM target included), optimiser (`"optimizer"`, with the non-finite guard XLA fuses into
it), collectives (the gradient all-reduce), what is left (gradient clipping, metrics), and ops XLA left without
op_name metadata (some of its fusions: "unattributed"). Ops of one program may run concurrently (XLA:CPU runs
independent thunks on its thread pool), so the op times add up to more than the step: the table gives each part's
share of the op time, and the wall time of the step beside it. A host callback's time (the scipy matcher) is its
custom-call's. On a GPU the device kernels are attributed through the HLO op named in the trace's device timelines
(untested here: no GPU in this project's CI). `--top N` also lists the N longest ops.
"""

import argparse
import collections
import gzip
import json
import pathlib
import sys
import tempfile
import time

import jax
import train_step

from sparse_detr_jax import benchmark
from sparse_detr_jax import config as config_lib
from sparse_detr_jax import model as model_lib
from sparse_detr_jax.costmodel import PARTS, direction, hlo_ops, part


def traced_op_times(step, state, batch, steps: int, ops: dict) -> tuple[collections.Counter, float]:
  """(microseconds per op name over `steps` traced steps, mean wall seconds of those steps)."""
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
    wall = (time.perf_counter() - start) / steps
    jax.profiler.stop_trace()
    trace = next(pathlib.Path(d).rglob("*perfetto_trace.json.gz"))
    events = json.loads(gzip.decompress(trace.read_bytes()))
  events = events["traceEvents"] if isinstance(events, dict) else events
  # On an accelerator only the device's own timelines count: the host's launch events carry the same op names.
  processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  accelerator = jax.default_backend() != "cpu"
  devices = {pid for pid, name in processes.items() if accelerator and name.startswith("/device:")}
  times = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or (devices and e.get("pid") not in devices):
      continue
    name = e.get("args", {}).get("hlo_op", e["name"])
    if name in ops:
      times[name] += e["dur"]
  return times, wall


def random_forward(config: str, hw: tuple[int, int], batch: int):
  """(jitted step, variables, inputs) with step(variables, inputs) = (variables, the config's inference forward on
  random images of canvas hw), the train step's calling convention; the variables are donated, so returning
  them costs no copy (without donation XLA copies every parameter into the output, ~80 ms at 800x1066)."""
  cfg = config_lib.load_config_file(config)
  model = model_lib.build_model(cfg.model)
  variables = model_lib.init_variables(model, jax.random.PRNGKey(0))
  step = jax.jit(lambda v, x: (v, model.apply(v, *x)), donate_argnums=0)
  return step, variables, benchmark.random_inputs(batch, *hw)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/r50_sparse_detr_rho_0.1.py")
  p.add_argument("--height", type=int, default=384)
  p.add_argument("--width", type=int, default=512)
  p.add_argument("--batch", type=int, default=2, help="per device")
  p.add_argument("--steps", type=int, default=2, help="traced steps (after one warm-up step)")
  p.add_argument("--top", type=int, default=0, help="also list the N longest ops")
  p.add_argument("--forward", action="store_true", help="the inference forward instead of the train step")
  a = p.parse_args()
  make = random_forward if a.forward else train_step.random_step
  step, state, batch = make(a.config, (a.height, a.width), a.batch)
  ops = hlo_ops(step.lower(state, batch).compile().as_text())
  state, metrics = step(state, batch)  # compile and warm up
  jax.block_until_ready(metrics)
  times, wall = traced_op_times(step, state, batch, a.steps, ops)
  table = collections.defaultdict(float)
  for name, us in times.items():
    opcode, op_name = ops[name]
    table[part(op_name, opcode), direction(op_name)] += us / a.steps / 1e3
  total = sum(table.values())
  print(
    f"{a.config} {'forward' if a.forward else 'train step'}, {a.height}x{a.width}, "
    f"batch {a.batch} x {jax.device_count()} device(s) on "
    f"{jax.devices()[0].device_kind} ({jax.default_backend()}): {wall:.3f} s a step (traced), {total:.0f} ms of ops"
  )
  print("| part | forward ms | backward ms | share of op time |\n|---|---|---|---|")
  for name in PARTS:
    f, b = table.get((name, "forward"), 0.0), table.get((name, "backward"), 0.0)
    print(f"| {name} | {f:.1f} | {b:.1f} | {100 * (f + b) / total:.1f}% |")
  for name, us in times.most_common(a.top):
    opcode, op_name = ops[name]
    print(f"{us / a.steps / 1e3:9.1f} ms  {name}  [{part(op_name, opcode)}]  {op_name[-100:]}")


if __name__ == "__main__":
  sys.exit(main())
