"""Where a compiled step's time goes: its XLA ops attributed to the parts of Sparse DETR, and XLA's own TPU
estimate of each op's time, summed through the step's loops.

Ops are attributed by the op_name metadata JAX writes into the compiled program (Flax module paths and the
`matcher`, `losses`, `optimizer` named scopes, through transformation wrappers: `transpose(jvp(...))` is the
backward pass). `benchmarks/profile_step.py` uses the same attribution for measured op times.

XLA:TPU gives every scheduled instruction of a compiled program an `estimated_cycles` figure (its cost model's
time for that op on the target chip); `estimate` sums them, each loop body times its trip count, and converts
cycles to seconds at the chip's clock. That is an estimate, not a measurement, and not of everything: XLA:TPU
prices no custom fusion (`kind=kCustom`: the row gathers and scatter-adds it emits, e.g. a deformable sampling's
corners and their gradient, a sparse encoder's kept tokens) and gives a gather it moves to a SparseCore
(`xla_tpu_offload_gather_to_sparsecore`) the largest int64 as its cycles; `estimate` counts those executions by part
(`Estimate.unpriced`) and leaves them out of the sum, so a step holding any is estimated low.
`compiled.cost_analysis()`'s `optimal_seconds` cannot stand in for it: it counts a loop body once whatever the trip
count, and an op it cannot price (e.g. the `ConcatBitcast` custom call XLA:TPU makes for a 3x3 convolution's
gradient) adds -1 s.
"""

import collections
import dataclasses
import re
from typing import Any

DEFORMABLE_LINEARS = ("value_proj", "sampling_offsets", "attention_weights", "output_proj")
PARTS = (
  "backbone convolutions",
  "backbone, other",
  "deformable sampling",
  "model, other",
  "matcher",
  "losses",
  "optimizer",
  "all-reduce",
  "rest of the step",
  "unattributed",
)
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def part(op_name: str, opcode: str) -> str:
  """The part of the step an op belongs to, from its HLO op_name metadata (and opcode, for convolutions and
  collectives)."""
  if opcode.startswith(_COLLECTIVES):
    return "all-reduce"
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


def direction(op_name: str) -> str:
  """'backward' for ops of a gradient (JAX names them through `transpose(...)`), else 'forward'."""
  return "backward" if "transpose(" in op_name else "forward"


@dataclasses.dataclass(frozen=True)
class Op:
  """One instruction of a compiled module."""

  opcode: str  # a fusion is named by what it holds (its instruction name): convolution / dot / gather ... fusions
  op_name: str  # op_name metadata; a fusion without its own takes the last one in its computation
  computation: str  # the computation the instruction is in
  cycles: int | None  # XLA:TPU's estimated_cycles, where given
  loop: tuple[str, int | None] | None = None  # a while loop's (body computation, trip count or None)
  unpriced: bool = False  # scheduled work without a price: a custom fusion without cycles, or int64-max cycles


_HEAD = re.compile(r"(?:ENTRY )?%([\w.\-]+) ")
_NO_PRICE = 2**63 - 1  # XLA:TPU's cycles for an op it cannot price (a gather offloaded to a SparseCore)
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (?:\(.*?\)|\S+) ([\w\-]+)\(")  # types may be tuples


def parse(hlo_text: str) -> dict[str, Op]:
  """Every instruction of a compiled module's text (`compiled.as_text()`), by name. A while loop's trip count is
  N where its condition is `i < N` with N a constant (the counter starting at 0, as in JAX's scan, map and
  fori_loop from 0), else unknown (a data-dependent loop)."""
  ops, calls, last_meta, computation = {}, {}, {}, ""
  constants, limits = {}, {}  # scalar int constants; a loop condition's `i < N` bound
  for line in hlo_text.splitlines():
    head = _HEAD.match(line)
    if head and line.rstrip().endswith("{"):
      computation = head.group(1)
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, opcode = m.groups()
    meta = re.search(r'op_name="([^"]+)"', line)
    target = re.search(r'custom_call_target="([^"]+)"', line)
    called = re.search(r"calls=%([\w.\-]+)", line)
    cycles = re.search(r'"estimated_cycles":"(-?\d+)"', line)
    loop = None
    if opcode == "while":
      cond = re.search(r"condition=%([\w.\-]+)", line).group(1)
      loop = (re.search(r"body=%([\w.\-]+)", line).group(1), limits.get(cond))
    constant = re.search(r"= [su]32\[\]\S* constant\((\d+)\)", line)
    if constant:
      constants[computation, name] = int(constant.group(1))
    bound = re.search(r"compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT", line)
    if bound and (computation, bound.group(1)) in constants:
      limits[computation] = constants[computation, bound.group(1)]
    opcode = f"{opcode}:{target.group(1)}" if target else opcode
    if opcode == "fusion":
      opcode = name
    if called:
      calls[name] = called.group(1)
    if meta:
      last_meta[computation] = meta.group(1)
    cycles = int(cycles.group(1)) if cycles else None
    unpriced = cycles == _NO_PRICE or (cycles is None and "kind=kCustom" in line)
    ops[name] = Op(opcode, meta.group(1) if meta else "", computation, None if unpriced else cycles, loop, unpriced)
  ops = {
    n: op if op.op_name else dataclasses.replace(op, op_name=last_meta.get(calls.get(n), "")) for n, op in ops.items()
  }
  # Instructions XLA adds inside a loop it made (e.g. a layout change done in steps) have no metadata: they belong
  # to what the loop's own computation does, named by the loop (or that computation's loop, outwards).
  context: dict[str, str] = {}
  loops = [(op.loop[0], op.op_name, op.computation) for op in ops.values() if op.loop]
  for _ in range(len(loops)):
    for body, name, outer in loops:
      context[body] = name or context.get(outer, "")
  return {
    n: op if op.op_name else dataclasses.replace(op, op_name=context.get(op.computation, "")) for n, op in ops.items()
  }


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (opcode, op_name metadata), as `parse` gives them."""
  return {n: (op.opcode, op.op_name) for n, op in parse(hlo_text).items()}


def executions(ops: dict[str, Op]) -> tuple[dict[str, int], int]:
  """How many times each computation runs per step (a loop body: its trip count times its loop's computation's),
  and how many loops have no known trip count (data-dependent: their bodies are counted once per entry)."""
  runs: dict[str, int] = collections.defaultdict(lambda: 1)
  loops = [op.loop + (op.computation,) for op in ops.values() if op.loop]
  for _ in range(len(loops)):  # nested loops settle in at most as many rounds as there are loops
    for body, trips, outer in loops:
      runs[body] = runs[outer] * (trips or 1)
  return dict(runs), sum(trips is None for _, trips, _ in loops)


@dataclasses.dataclass(frozen=True)
class Estimate:
  """XLA:TPU's cost-model time of one step, by (part, direction), in seconds: an estimate, not a measurement."""

  seconds: dict[tuple[str, str], float]
  instructions: dict[tuple[str, str], int]  # scheduled instructions (each compiled once, however often it runs)
  unknown_trip_loops: int  # loops whose bodies are counted once per entry: the estimate is a lower bound there
  unpriced: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)  # executions XLA gives no cycles

  @property
  def total_s(self) -> float:
    return sum(self.seconds.values())

  def by_part(self) -> dict[str, float]:
    out = collections.Counter()
    for (p, _), s in self.seconds.items():
      out[p] += s
    return dict(out)


def estimate(hlo_text: str, clock_ghz: float) -> Estimate:
  """Sum of XLA:TPU's per-instruction cycle estimates of a compiled module, each times the executions of its
  computation, at `clock_ghz`, by part of the step and direction; what it leaves unpriced, counted."""
  ops = parse(hlo_text)
  runs, unknown = executions(ops)
  seconds, count, unpriced = collections.Counter(), collections.Counter(), collections.Counter()
  for op in ops.values():
    if op.unpriced:
      unpriced[part(op.op_name, op.opcode), direction(op.op_name)] += runs.get(op.computation, 1)
    if op.cycles is not None:
      key = part(op.op_name, op.opcode), direction(op.op_name)
      seconds[key] += op.cycles * runs.get(op.computation, 1) / (clock_ghz * 1e9)
      count[key] += 1
  return Estimate(dict(seconds), dict(count), unknown, dict(unpriced))


def matmul_flops(jaxpr: Any) -> float:
  """FLOPs of the matrix products and convolutions of a (closed) jaxpr, e.g. `jax.jit(f).trace(*args).jaxpr`, per
  call (2 per multiply-add), every scanned body times its length, a conditional's cheapest branch (where code is
  chosen by platform, the formulation with the fewest FLOPs: the model's work, not that of a dense stand-in for a
  gather): the numerator of model FLOPs utilisation. Inside `shard_map` the count is per device."""
  import jax.extend  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  def count(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name == "dot_general":
        (contracting, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contracting])
      elif name == "conv_general_dilated":
        out = eqn.outvars[0].aval.shape
        rhs = eqn.invars[1].aval.shape
        spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
        window = np.prod([rhs[d] for d in spec[2:]]) * rhs[spec[1]]
        total += 2.0 * np.prod(out) * window
      subs = [count(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params)]
      if name == "cond":  # one branch runs; for code chosen by platform, the fewest FLOPs: not a dense stand-in
        total += min(subs, default=0.0)
      else:
        total += (eqn.params.get("length", 1) if name == "scan" else 1) * sum(subs)
    return total

  return count(getattr(jaxpr, "jaxpr", jaxpr))
