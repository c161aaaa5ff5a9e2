"""Where a training step's time goes: a jax.profiler trace of the warm, jitted train step (trainer.make_train_step
on a random batch, as benchmarks/train_step.py), every executed XLA op attributed, through the op_name metadata
JAX writes into the compiled program, to a part of the step, forward and backward apart.

    .venv/bin/python benchmarks/profile_step.py [--config configs/r50_sparse_detr_rho_0.1.py]
        [--height 384 --width 512] [--batch 2] [--steps 2] [--top 0] [--forward]

`--forward` profiles the jitted inference forward (model.apply on random images) instead of the train step.

Parts: backbone convolutions, the rest of the backbone (frozen BatchNorm, ReLU, pooling), deformable sampling
(MSDeformAttn between its linear layers: corner indices and weights, the gather, the weighted sum; its backward
is the scatter-add), the rest of the model (linear layers, norms, heads, top-rho / top-k), matcher (cost and
solver, `jax.named_scope("matcher")`), losses (`"losses"`, the DAM target included), optimiser (`"optimizer"`),
what is left (gradient clipping, the non-finite guard, metrics), and ops XLA left without op_name metadata
(some of its fusions: "unattributed"). Ops of one program may run concurrently
(XLA:CPU runs independent thunks on its thread pool), so the op times add up to more than the step: the table
gives each part's share of the op time, and the wall time of the step beside it. A host callback's time (the
scipy matcher) is its custom-call's. On a GPU the device kernels are attributed through the HLO op named in the
trace's device timelines (untested here: no GPU in this project's CI). `--top N` also lists the N longest ops.
"""

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

import jax
import train_step

from sparse_detr_jax import benchmark
from sparse_detr_jax import config as config_lib
from sparse_detr_jax import model as model_lib

DEFORMABLE_LINEARS = ("value_proj", "sampling_offsets", "attention_weights", "output_proj")
PARTS = (
  "backbone convolutions",
  "backbone, other",
  "deformable sampling",
  "model, other",
  "matcher",
  "losses",
  "optimizer",
  "rest of the step",
  "unattributed",
)


def part(op_name: str, opcode: str) -> str:
  """The part of the step an op belongs to, from its HLO op_name metadata (and opcode, for convolutions)."""
  if not op_name:
    return "unattributed"
  # A scope inside a JAX transformation is named through it: "jvp(losses)", "transpose(jvp(SparseDETR))".
  path = [re.sub(r"^(?:\w+\()*([^()]*)\)*$", r"\1", p) for p in op_name.split("/")]
  if "matcher" in path or "callback" in opcode:
    return "matcher"
  if "losses" in path:
    return "losses"
  if "optimizer" in path:
    return "optimizer"
  if "backbone" in path:
    conv = any(x.startswith(("conv", "downsample_conv")) for x in path)  # 3x3 and 7x7 convs, pointwise matmuls
    return "backbone convolutions" if conv else "backbone, other"
  for i, p in enumerate(path):
    deformable = (p.startswith("encoder_layers") and path[i + 1 : i + 2] == ["self_attn"]) or (
      p.startswith("decoder_layers") and path[i + 1 : i + 2] == ["cross_attn"]
    )
    if deformable:
      return "model, other" if any(x in path for x in DEFORMABLE_LINEARS) else "deformable sampling"
  return "model, other" if "SparseDETR" in path else "rest of the step"


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (opcode, op_name metadata) for every instruction of a compiled module's text; a
  fusion without metadata of its own takes that of the last instruction in its computation that has one."""
  ops, calls, last_meta, computation = {}, {}, {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"(?:ENTRY )?%([\w.\-]+) ", line)
    if head and line.rstrip().endswith("{"):
      computation = head.group(1)
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", line)
    if m:
      name, opcode = m.groups()
      meta = re.search(r'op_name="([^"]+)"', line)
      target = re.search(r'custom_call_target="([^"]+)"', line)
      called = re.search(r"calls=%([\w.\-]+)", line)
      opcode = f"{opcode}:{target.group(1)}" if target else opcode
      if opcode == "fusion":  # a fusion is named by what it holds: convolution / dot / gather ... fusions
        opcode = name
      if called:
        calls[name] = called.group(1)
      if meta:
        last_meta[computation] = meta.group(1)
      ops[name] = (opcode, meta.group(1) if meta else "")
  return {n: (op, meta or last_meta.get(calls.get(n), "")) for n, (op, meta) in ops.items()}


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
    table[part(op_name, opcode), "backward" if "transpose(" in op_name else "forward"] += us / a.steps / 1e3
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
