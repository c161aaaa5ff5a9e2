"""Before renting a pod: compile a config's train step and inference for a TPU slice or GPU machine, here.

    python -m sparse_detr_jax.preflight --config configs/r50_sparse_detr_rho_0.1.py --topology v5e-16 \\
        --per_chip_batch 4 --canvases largest [--json report.json]

No accelerator is needed: the programs are compiled for device descriptions (`jax.experimental.topologies`;
TPUs through `libtpu`, `make preflight` installs it apart from the project's environment; NVIDIA GPUs through
JAX's CUDA plugin). The state and batch are built as train.py builds them on that machine (a `data` mesh over
every chip, the state replicated and donated, the batch split over the chips, the matcher that 'auto' means
there, the config's dtype), as abstract arrays. One row per canvas: compile seconds, per-chip memory against
the chip's, FLOPs and bytes per step, host callbacks, all-reduces, and, on TPU, XLA's cost-model step time,
images/s and model FLOPs utilisation, with the step time by part of the model (`costmodel.py`): estimates, not
measurements. Exit status 1 when a canvas does not fit, naming the largest batch that does.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from sparse_detr_jax import costmodel, xla_flags

GIB = 2.0**30
ANALYSIS_VERSION = "3"  # of what a cached analysis holds: older ones are compiled again


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator kind: memory per chip, peak dense bf16 FLOP/s per chip (the makers' published figures)."""

  platform: str  # 'tpu' | 'cuda'
  hbm_gib: float
  peak_bf16_tflops: float
  cores_per_chip: int = 1  # v4 and v5p slice names count TensorCores, two per chip
  dims: int = 2  # TPU torus dimensions
  # The clock XLA:TPU's per-instruction cycle estimates are converted at (published peak / MXU FLOPs per cycle); None
  # where they were not checked against a plain bf16 matmul (docs/preflight.md): no step-time estimate there.
  clock_ghz: float | None = None


CHIPS = {
  "v4": Chip("tpu", 32, 275, cores_per_chip=2, dims=3),
  "v5e": Chip("tpu", 16, 197, clock_ghz=1.5),
  "v5p": Chip("tpu", 95, 459, cores_per_chip=2, dims=3, clock_ghz=1.75),
  "v6e": Chip("tpu", 32, 918, clock_ghz=1.75),
  "a100": Chip("cuda", 79.2, 312),  # 80 GB cards: the device memory the driver reports
  "h100": Chip("cuda", 79.1, 989),
  "h200": Chip("cuda", 140.4, 989),
  # This machine's CPU as N devices (XLA's host platform): the whole save/load path runs without an accelerator.
  "cpu": Chip("cpu", round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1), 0),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as users write it: v5e-16, v4-8, h100-8
  kind: str
  chips: int
  hbm_gib: float  # memory per chip that a program may use (default: the chip's)

  @property
  def chip(self) -> Chip:
    return CHIPS[self.kind]

  def shape(self) -> tuple[int, ...]:
    """The TPU torus: the smallest slice is 2x2 (x1); each doubling doubles the smallest last dimension."""
    dims = [2, 2] + [1] * (self.chip.dims - 2)
    while math.prod(dims) < self.chips:
      smallest = min(dims)
      i = max(j for j, d in enumerate(dims) if d == smallest)
      dims[i] *= 2
    return tuple(dims)


def parse_topology(name: str) -> Topology:
  """'v5e-16' (16 chips), 'v4-8' / 'v5p-8' (8 TensorCores: 4 chips), 'h100-8' (8 GPUs)."""
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name.strip().lower())
  if not m or m.group(1) not in CHIPS:
    raise ValueError(f"--topology {name!r}: expected KIND-N with KIND one of {sorted(CHIPS)}, e.g. v5e-16 or h100-8")
  kind, n = m.group(1), int(m.group(2))
  chip = CHIPS[kind]
  chips = n // chip.cores_per_chip
  if chip.platform == "tpu":
    smallest = 4 * chip.cores_per_chip
    if n < smallest or n % smallest or chips & (chips - 1):
      raise ValueError(
        f"--topology {name!r}: {kind} slices come in {smallest}, {2 * smallest}, {4 * smallest}, ... "
        f"({'TensorCores, two per chip' if chip.cores_per_chip == 2 else 'chips'})"
      )
  elif n < 1:
    raise ValueError(f"--topology {name!r}: at least one {'device' if kind == 'cpu' else 'GPU'}")
  return Topology(name.strip().lower(), kind, chips, chip.hbm_gib)


# GPU device descriptions (XLA's GpuTargetConfig as text), compute capability and size per card.
_GPU = {
  "a100": dict(sms=108, cc=(8, 0), clock_khz=1410000, mem_bw=2039e9, l2=40 * 2**20, shared=167936),
  "h100": dict(sms=132, cc=(9, 0), clock_khz=1980000, mem_bw=3352e9, l2=50 * 2**20, shared=233472),
  "h200": dict(sms=132, cc=(9, 0), clock_khz=1980000, mem_bw=4800e9, l2=50 * 2**20, shared=233472),
}


def gpu_target_config(kind: str) -> str:
  """The text proto JAX's CUDA plugin compiles against in place of a present GPU."""
  g, mem = _GPU[kind], int(round(CHIPS[kind].hbm_gib * 10) * GIB / 10)
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {g["shared"]} threads_per_core_limit: 2048 core_count: {g["sms"]}
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(g["mem_bw"])} l2_cache_size: {g["l2"]} clock_rate_ghz: {g["clock_khz"] / 1e6}
  device_memory_size: {mem} shared_memory_per_block_optin: {g["shared"] - 1024} registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {g["cc"][0]} minor: {g["cc"][1]} }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 13 minor: 0 }}
device_description_str: "NVIDIA {kind.upper()}"
"""


def devices(topology: Topology) -> list:
  """Device descriptions of the whole slice / machine (no accelerator needed)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  if topology.chip.platform == "cpu":
    import jax  # pylint: disable=import-outside-toplevel

    found = jax.devices("cpu")
    if len(found) < topology.chips:
      flag = f"--xla_force_host_platform_device_count={topology.chips}"
      raise RuntimeError(f"{len(found)} host devices; XLA_FLAGS={flag} is needed")
    return found[: topology.chips]
  if topology.chip.platform == "tpu":
    name = f"{topology.kind}:{'x'.join(map(str, topology.shape()))}"
    desc = topologies.get_topology_desc(topology_name=name, platform="tpu")
  else:
    desc = topologies.get_topology_desc(
      platform="cuda", target_config=gpu_target_config(topology.kind), topology=f"1x1x{topology.chips}"
    )
  return list(desc.devices)


@dataclasses.dataclass
class Program:
  """One compiled function and what XLA says of it (per chip)."""

  function: str  # 'train' | 'predict'
  canvas: tuple[int, int]
  per_chip_batch: int
  compile_s: float
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  flops: float | None
  bytes_accessed: float | None
  est_step_s: float | None  # XLA:TPU's cost model, summed over the step's instructions: an estimate
  host_callbacks: int
  all_reduces: int
  all_reduce_bytes: int
  matmul_flops: float | None = None  # matrix products and convolutions, loops counted in full (costmodel.matmul_flops)
  est_parts: dict[str, float] | None = None  # the estimate by 'part/direction' (costmodel.PARTS)
  unknown_trip_loops: int = 0  # data-dependent loops (the matcher's): counted once per entry, the estimate a bound
  unpriced: dict[str, int] | None = None  # executions XLA gives no cycles, by 'part/direction': not in est_step_s
  cached: bool = False  # read from the preflight cache: compile_s is that of the original compile

  @property
  def hbm_bytes(self) -> int:
    """Peak per-chip memory of the program: arguments, temporaries and outputs that do not reuse an argument."""
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8}  # fmt: skip
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def collectives(hlo: str) -> tuple[int, int]:
  """(all-reduce ops, bytes they reduce) in an optimised HLO module's text (each op counted once)."""
  count = nbytes = 0
  for line in hlo.splitlines():
    m = re.search(r"=\s*(.*?)\s+all-reduce(-start)?\(", line)
    if not m:
      continue
    count += 1
    for dtype, dims in _SHAPE.findall(m.group(1)):
      nbytes += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return count, nbytes


def host_callbacks(hlo: str) -> int:
  """Host round trips in an optimised HLO module: Python callbacks (custom calls) and host transfers."""
  calls = re.findall(r'custom_call_target="[^"]*callback[^"]*"', hlo)
  transfers = re.findall(r"\bsend\(.*is_host_transfer=true", hlo)
  return len(calls) + len(transfers)


def analyse(
  function: str, canvas, per_chip_batch: int, compiled: Any, compile_s: float, clock_ghz: float | None, jaxpr: Any
) -> Program:
  """What XLA says of a compiled program; with `clock_ghz` (TPU), its cost model's step time by part."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, list) else cost
  hlo = compiled.as_text()
  n, nbytes = collectives(hlo)
  est = costmodel.estimate(hlo, clock_ghz) if clock_ghz else None
  return Program(
    function, tuple(canvas), per_chip_batch, compile_s,
    mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes, mem.temp_size_in_bytes,
    cost.get("flops"), cost.get("bytes accessed"), est.total_s if est else None, host_callbacks(hlo), n, nbytes,
    costmodel.matmul_flops(jaxpr), {f"{p}/{d}": t for (p, d), t in est.seconds.items()} if est else None,
    est.unknown_trip_loops if est else 0, {f"{p}/{d}": n for (p, d), n in est.unpriced.items()} if est else None,
  )  # fmt: skip


_OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED: .*?memory required for HLO temporaries \(([\d.]+)([KMGT]?)\)")


def _refused(error: Exception, function: str, canvas, per_chip_batch: int, args, seconds: float) -> Program:
  """The Program of a compile XLA refused for lack of memory: the temporaries it says it needed, the arguments'
  per-chip bytes; any other error is raised."""
  m = _OUT_OF_MEMORY.search(str(error))
  if not m:
    raise error
  import jax  # pylint: disable=import-outside-toplevel

  temps = float(m.group(1)) * 1024.0 ** " KMGT".index(m.group(2) or " ")
  shard = lambda a: math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
  arguments = sum(shard(a) for a in jax.tree.leaves(args))
  return Program(function, tuple(canvas), per_chip_batch, seconds, arguments, 0, 0, int(temps),
                 None, None, None, 0, 0, 0)  # fmt: skip


@dataclasses.dataclass
class Lowered:
  """A function lowered for the target devices, ready to compile."""

  function: str
  per_chip_batch: int
  canvas: tuple[int, int]
  args: tuple
  jaxpr: Any
  lowered: Any
  cache_path: str | None
  compiled: Any = None  # the executable, when the Builder keeps it (--save_compiled)


class Builder:
  """A config's train step and inference function, lowered for a mesh of device descriptions."""

  def __init__(
    self,
    cfg,
    devices_: Sequence[Any],
    platform: str,
    cache_dir: str | None = None,
    clock_ghz: float | None = None,
    steps_per_epoch: int = 1000,
    keep_compiled: bool = False,
  ):
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    from sparse_detr_jax import matcher  # pylint: disable=import-outside-toplevel
    from sparse_detr_jax import model as model_lib  # pylint: disable=import-outside-toplevel

    self.cfg = cfg.copy_and_resolve_references()
    if self.cfg.loss.matcher == "auto":
      self.cfg.loss.matcher = matcher.default_solver(platform)
    if self.cfg.model.get("scan_layers", "auto") == "auto":  # what 'auto' means there (model.scans_layers)
      self.cfg.model.scan_layers = "unroll" if platform == "cpu" else "scan"
    self.note = ""
    if platform == "cuda" and self.cfg.loss.matcher == "scipy":
      # A host callback can only be lowered with its platform's runtime present: the on-device solver (the same
      # assignment, no host round trip) stands in; memory and compile time are those of the step without it.
      self.cfg.loss.matcher = "jax"
      self.note = "train.py's matcher here is scipy's, a host callback, which compiles only on a GPU: jax stands in"
    self.mesh = jax.sharding.Mesh(np.array(devices_), ("data",))
    self.model = model_lib.build_model(self.cfg.model)
    self.cache_dir = cache_dir
    self.clock_ghz = clock_ghz
    self.steps_per_epoch = steps_per_epoch  # the learning-rate schedule's (a saved program holds it)
    self.keep_compiled = keep_compiled  # compile even what the analysis cache knows: the executables are saved

  def _state(self, global_batch: int):
    import jax  # pylint: disable=import-outside-toplevel
    from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
    from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

    from sparse_detr_jax import model as model_lib  # pylint: disable=import-outside-toplevel
    from sparse_detr_jax import trainer  # pylint: disable=import-outside-toplevel

    made = {}

    def init():
      variables = model_lib.init_variables(self.model, jax.random.PRNGKey(0))
      state, made["tx"], made["schedules"] = trainer.new_state(
        self.cfg, variables, global_batch, self.steps_per_epoch, jax.random.PRNGKey(1)
      )
      return state

    shapes = jax.eval_shape(init)
    replicated = NamedSharding(self.mesh, P())
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)
    return state, made["tx"], made["schedules"]

  def _batch(self, per_chip_batch: int, canvas: tuple[int, int], keys: Sequence[str]) -> dict[str, Any]:
    """Abstract global batch of `keys` with the dtypes the input pipeline produces, split over the chips."""
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
    from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

    from sparse_detr_jax.data import batching  # pylint: disable=import-outside-toplevel

    m = self.cfg.data.max_boxes
    one = batching.pad_batch(
      [np.zeros((1, 1, 3), np.float32)], [np.zeros((0, 4), np.float32)], [np.zeros(0, np.int32)], canvas, m
    )
    one["orig_size"] = np.zeros((1, 2), np.int32)
    n = per_chip_batch * self.mesh.size
    split = NamedSharding(self.mesh, P("data"))
    return {k: jax.ShapeDtypeStruct((n,) + one[k].shape[1:], one[k].dtype, sharding=split) for k in keys}

  def train_step(self, per_chip_batch: int, canvas: tuple[int, int]) -> tuple[Callable, tuple]:
    """(jitted step, abstract arguments) exactly as train.py builds them: trainer.make_train_step."""
    from sparse_detr_jax import trainer  # pylint: disable=import-outside-toplevel

    state, tx, schedules = self._state(per_chip_batch * self.mesh.size)
    step = trainer.make_train_step(self.model, self.cfg, tx, self.mesh, schedules)
    return step, (state, self._batch(per_chip_batch, canvas, trainer.BATCH_KEYS))

  def predict(self, per_chip_batch: int, canvas: tuple[int, int]) -> tuple[Callable, tuple]:
    """(jitted inference, abstract arguments) as evaluate.py builds them: evaluator.make_predict."""
    from sparse_detr_jax import evaluator  # pylint: disable=import-outside-toplevel

    state, _, _ = self._state(per_chip_batch * self.mesh.size)
    b = self._batch(per_chip_batch, canvas, ("image", "padding_mask", "orig_size"))
    variables = {"params": state.params, **state.constants}
    return evaluator.make_predict(self.model, self.mesh), (variables, b["image"], b["padding_mask"], b["orig_size"])

  def lower(self, function: str, per_chip_batch: int, canvas: tuple[int, int]) -> "Lowered":
    """Trace and lower `function` (holds Python's lock: one at a time)."""
    fn, args = (self.train_step if function == "train" else self.predict)(per_chip_batch, canvas)
    traced = fn.trace(*args)
    lowered = traced.lower()
    return Lowered(function, per_chip_batch, tuple(canvas), args, traced.jaxpr, lowered, self._cache_path(lowered))

  def finish(self, low: "Lowered") -> Program:
    """Compile a lowered function and say what XLA says of it (threads may run several at once: XLA compiles
    without Python's lock); with a cache directory, a program lowered before is not compiled again (the
    compiler's own cache cannot load programs compiled for absent devices): its recorded analysis is returned."""
    if low.cache_path and os.path.exists(low.cache_path) and not self.keep_compiled:
      with open(low.cache_path) as f:
        return Program(**{**json.load(f), "canvas": low.canvas, "cached": True})
    start = time.perf_counter()
    try:
      compiled = low.lowered.compile()
      seconds = time.perf_counter() - start
      low.compiled = compiled if self.keep_compiled else None
      program = analyse(low.function, low.canvas, low.per_chip_batch, compiled, seconds, self.clock_ghz, low.jaxpr)
    except Exception as e:  # XLA:TPU refuses a program larger than the chip's memory
      program = _refused(e, low.function, low.canvas, low.per_chip_batch, low.args, time.perf_counter() - start)
    if low.cache_path:
      os.makedirs(os.path.dirname(low.cache_path), exist_ok=True)
      with open(low.cache_path + ".tmp", "w") as f:
        json.dump(dataclasses.asdict(program), f)
      os.replace(low.cache_path + ".tmp", low.cache_path)
    return program

  def compile(self, function: str, per_chip_batch: int, canvas: tuple[int, int]) -> Program:
    """Lower and compile `function` (`lower`, then `finish`)."""
    return self.finish(self.lower(function, per_chip_batch, canvas))

  def _cache_path(self, lowered: Any) -> str | None:
    """Key: the lowered program, the devices it is compiled for, the compiler's version and flags."""
    import jax  # pylint: disable=import-outside-toplevel

    if not self.cache_dir:
      return None
    d = self.mesh.devices.flat[0]
    libtpu = os.environ.get("TPU_LIBRARY_PATH", "")
    compiler = [jax.__version__, libtpu, str(os.path.getsize(libtpu)) if os.path.isfile(libtpu) else ""]
    flags = [os.environ.get("LIBTPU_INIT_ARGS", ""), os.environ.get("XLA_FLAGS", "")]
    key = "\n".join(
      [ANALYSIS_VERSION, lowered.as_text(), repr(list(self.mesh.devices.flat)), d.device_kind, *compiler, *flags]
    )
    return os.path.join(self.cache_dir, hashlib.sha256(key.encode()).hexdigest() + ".json")


def parse_canvases(spec: str, buckets: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
  """'largest' (the config's largest canvas by area), 'all' (every bucket) or 'HxW,HxW'."""
  buckets = [tuple(int(v) for v in b) for b in buckets]
  if spec == "largest":
    return [max(buckets, key=lambda b: b[0] * b[1])]  # the first of equal areas (800x1333 before 1333x800)
  if spec == "all":
    return buckets
  out = []
  for item in spec.split(","):
    m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", item)
    if not m or min(int(m.group(1)), int(m.group(2))) < 1:
      raise ValueError(f"--canvases {spec!r}: expected 'largest', 'all' or HxW[,HxW...] (e.g. 800x1333)")
    out.append((int(m.group(1)), int(m.group(2))))
  return out


def fits(program: Program, capacity_gib: float) -> bool:
  return program.hbm_bytes <= capacity_gib * GIB


def largest_batch(
  builder: Builder, function: str, canvas, capacity_gib: float, a: Program, log=print, max_compiles: int = 6
) -> int:
  """The largest per-chip batch whose `function` fits the chip (0: not even 1). Memory is close to linear in the
  batch: `a` and one more compile (twice or half its batch) give a first guess, then bisection between the largest
  batch known to fit and the smallest known not to, at most `max_compiles` compiles in all."""
  known = {a.per_chip_batch: fits(a, capacity_gib)}

  def check(batch: int) -> Program:
    p = builder.compile(function, batch, canvas)
    known[batch] = fits(p, capacity_gib)
    log(
      f"  {function} {canvas[0]}x{canvas[1]} batch {batch}: {_gib(p.hbm_bytes)} GiB per chip, fits={int(known[batch])}"
    )
    return p

  b = a.per_chip_batch
  other = check(2 * b if known[b] else max(1, b // 2)) if b > 1 or known[b] else a
  guess = b
  if other.per_chip_batch != b:
    per_image = (a.hbm_bytes - other.hbm_bytes) / (b - other.per_chip_batch)
    if per_image > 0:
      guess = int((capacity_gib * GIB - (a.hbm_bytes - per_image * b)) // per_image)
  for _ in range(max_compiles - 1):
    lo = max([k for k, ok in known.items() if ok], default=0)
    hi = min([k for k, ok in known.items() if not ok], default=None)
    if hi is not None and hi - lo <= 1:
      break
    if guess in known or guess <= lo or (hi is not None and guess >= hi):
      guess = (lo + hi) // 2 if hi is not None else 2 * max(lo, 1)
    check(guess)
  return max([k for k, ok in known.items() if ok], default=0)


def _gib(x: float) -> str:
  return f"{x / GIB:.2f}"


def report_row(p: Program, topology: Topology) -> dict[str, Any]:
  est = p.est_step_s
  return {
    "function": p.function,
    "canvas": f"{p.canvas[0]}x{p.canvas[1]}",
    "per_chip_batch": p.per_chip_batch,
    "compile_s": round(p.compile_s, 1),
    "argument_gib": p.argument_bytes / GIB,
    "temp_gib": p.temp_bytes / GIB,
    "output_gib": (p.output_bytes - p.alias_bytes) / GIB,
    "hbm_gib": p.hbm_bytes / GIB,
    "capacity_gib": topology.hbm_gib,
    "fits": fits(p, topology.hbm_gib),
    "cached": p.cached,
    "flops": p.flops,
    "bytes_accessed": p.bytes_accessed,
    "host_callbacks": p.host_callbacks,
    "all_reduces": p.all_reduces,
    "all_reduce_bytes": p.all_reduce_bytes,
    "matmul_flops": p.matmul_flops,
    "est_step_s": est,  # XLA's TPU cost model: an estimate, not a measurement
    "est_images_per_s_per_chip": p.per_chip_batch / est if est else None,
    "est_images_per_s": p.per_chip_batch * topology.chips / est if est else None,
    # Model FLOPs utilisation by the estimate: matrix-product FLOPs over the chip's peak bf16 rate for est_step_s.
    "est_mfu": p.matmul_flops / (est * topology.chip.peak_bf16_tflops * 1e12) if est and p.matmul_flops else None,
    "est_parts_s": p.est_parts,
    "est_unknown_trip_loops": p.unknown_trip_loops,
    "est_unpriced": p.unpriced,  # custom fusions (gathers, scatters) XLA:TPU gives no cycles: not in est_step_s
  }


def format_row(r: dict[str, Any]) -> str:
  est = f"{r['est_step_s']:.4f}" if r["est_step_s"] else "n/a"
  rate = f"{r['est_images_per_s_per_chip']:.1f}" if r["est_images_per_s_per_chip"] else "n/a"
  mfu = f"{100 * r['est_mfu']:.1f}%" if r["est_mfu"] else "n/a"
  flops = f"{r['flops'] / 1e12:.2f}" if r["flops"] else "n/a"
  return (
    f"{r['function']:<8}{r['canvas']:>10}{r['per_chip_batch']:>6}{r['compile_s']:>9.1f}{'c' if r['cached'] else ' '}"
    f"{r['argument_gib']:>8.2f}{r['temp_gib']:>8.2f}{r['output_gib']:>8.2f}"
    f"{r['hbm_gib']:>8.2f}/{r['capacity_gib']:<6g}{'yes' if r['fits'] else 'no':>5}{flops:>9}{r['host_callbacks']:>5}"
    f"{r['all_reduces']:>5}{r['all_reduce_bytes'] / 2**20:>9.1f}{est:>10}{rate:>9}{mfu:>7}"
  )


def format_parts(r: dict[str, Any]) -> list[str]:
  """Where the estimated step time goes: one line per part of the model, forward and backward ms, share."""
  parts, total = r["est_parts_s"], r["est_step_s"]
  lines = [f"  {r['function']} {r['canvas']}: estimated time by part (ms forward, backward, share)"]
  for name in costmodel.PARTS:
    f, b = parts.get(f"{name}/forward", 0.0), parts.get(f"{name}/backward", 0.0)
    if f + b > 0:
      lines.append(f"    {name:<24}{1e3 * f:>9.1f}{1e3 * b:>9.1f}{100 * (f + b) / total:>7.1f}%")
  if r["est_unknown_trip_loops"]:
    lines.append(f"    ({r['est_unknown_trip_loops']} data-dependent loops, the matcher's, counted once per entry)")
  if r["est_unpriced"]:
    named = "; ".join(f"{k.split('/')[0]} ({k.split('/')[1]}) {n}" for k, n in sorted(r["est_unpriced"].items()))
    lines.append(f"    (not in the estimate: gathers and scatters XLA:TPU does not price; executions a step: {named})")
  return lines


HEADER = (
  f"{'function':<8}{'canvas':>10}{'batch':>6}{'compile_s':>10}{'args':>8}{'temps':>8}{'outs':>8}"
  f"{'HBM GiB/chip':>15}{'fits':>5}{'TFLOP':>9}{'cb':>5}{'ar':>5}{'ar MiB':>9}{'est_s':>10}{'img/s':>9}{'MFU':>7}"
)
LEGEND = (
  "batch: images per chip; compile_s: seconds (c: from preflight's cache); args, temps, outs, HBM: GiB per chip "
  "(arguments, temporaries, outputs not aliased to arguments; their sum of the chip's); TFLOP: per chip and step "
  "(XLA's count, a loop body once); cb: host callbacks in the program (0 on TPU); ar: all-reduces per step, ar MiB: "
  "their bytes; est_s: estimated step seconds, img/s: estimated images per second per chip, MFU: estimated model "
  "FLOPs utilisation"
)


def run(
  cfg,
  topology: Topology,
  devices_: Sequence[Any],
  per_chip_batch: int,
  canvases,
  functions: Sequence[str],
  cache_dir: str | None,
  log=print,
  threads: int = 0,
  steps_per_epoch: int = 1000,
  save_compiled: str | None = None,
) -> dict:
  """Compile every function for every canvas, `threads` at once (0: one per program, at most the host's cores);
  the report (rows, the largest batch of what does not fit). save_compiled: a directory to write the executables
  to, for train.py --compiled_dir (sparse_detr_jax/compiled.py), with the epoch length the run's learning-rate
  schedule has (`steps_per_epoch`)."""
  from sparse_detr_jax import compiled as compiled_lib  # pylint: disable=import-outside-toplevel
  from sparse_detr_jax import loop  # pylint: disable=import-outside-toplevel

  platform = topology.chip.platform
  builder = Builder(
    cfg, devices_, platform, cache_dir, topology.chip.clock_ghz, steps_per_epoch, keep_compiled=bool(save_compiled)
  )
  writer = None
  if save_compiled:
    import jax  # pylint: disable=import-outside-toplevel

    # Every program compiled afresh: an executable JAX's persistent cache hands back may not serialize whole (seen on
    # the CPU: it loads, then misses its functions when run).
    jax.config.update("jax_enable_compilation_cache", False)
    writer = compiled_lib.Writer(
      save_compiled, compiled_lib.expected(cfg, builder.mesh, per_chip_batch, steps_per_epoch, platform)
    )
  log(
    f"{topology.name}: {topology.chips} x {topology.kind} ({topology.hbm_gib:g} GiB each), mesh 'data' over "
    f"every chip, global batch {per_chip_batch * topology.chips} ({per_chip_batch} per chip); backbone "
    f"{cfg.model.backbone}, rho {cfg.model.rho}, {cfg.model.dtype}, matcher {builder.cfg.loss.matcher}"
  )
  if builder.note:
    log(builder.note)
  log(HEADER)
  rows, short, parts = [], [], []
  lowered = [builder.lower(function, per_chip_batch, canvas) for canvas in canvases for function in functions]
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(loop.compile_threads(threads, len(lowered))) as pool:
    for low, p in zip(lowered, pool.map(builder.finish, lowered), strict=True):
      row = report_row(p, topology)
      rows.append(row)
      log(format_row(row))
      if row["est_parts_s"]:
        parts.append(row)
      if not row["fits"]:
        short.append((row, low, p))
      if writer and low.compiled is not None:
        if p.host_callbacks:
          log(f"not saved: {low.function} {row['canvas']} calls back to Python (loss.matcher=scipy); use 'jax'")
        else:
          writer.add(low.function, low.canvas, low.compiled)
        low.compiled = None
  if len(lowered) > 1:
    log(f"{len(lowered)} programs compiled in {time.perf_counter() - start:.1f} s, "
        f"{loop.compile_threads(threads, len(lowered))} at a time")  # fmt: skip
  for row, low, p in short:
    row["largest_fitting_batch"] = largest_batch(builder, low.function, low.canvas, topology.hbm_gib, p, log)
  short = [row for row, _, _ in short]
  if writer:
    writer.close()
    log(f"saved {len(writer.manifest['programs'])} compiled programs and {compiled_lib.MANIFEST} to {save_compiled}")
  log(LEGEND)
  for row in parts:
    for line in format_parts(row):
      log(line)
  return {
    "topology": topology.name, "chips": topology.chips, "kind": topology.kind, "platform": topology.chip.platform,
    "capacity_gib": topology.hbm_gib, "rows": rows, "does_not_fit": short,
  }  # fmt: skip


def summary_line(report: dict) -> str:
  """The machine-readable last line, for the train step of the largest canvas."""
  train = [r for r in report["rows"] if r["function"] == "train"] or report["rows"]
  r = max(train, key=lambda r: math.prod(map(int, r["canvas"].split("x"))))  # the first of equal areas
  fmt = lambda x: "na" if x is None else f"{x:.4g}"
  return (
    f"topology={report['topology']} chips={report['chips']} canvas={r['canvas']} per_chip_batch={r['per_chip_batch']} "
    f"hbm_gib={r['hbm_gib']:.2f}/{r['capacity_gib']:g} fits={int(r['fits'])} compile_s={r['compile_s']:.1f} "
    f"global_batch={r['per_chip_batch'] * report['chips']} est_step_s={fmt(r['est_step_s'])} "
    f"est_images_per_s_per_chip={fmt(r['est_images_per_s_per_chip'])} est_images_per_s_all_chips="
    f"{fmt(r['est_images_per_s'])} "
    f"host_callbacks={r['host_callbacks']}"
  )


def epoch_length(cfg, global_batch: int) -> int:
  """The run's batches per epoch (its learning-rate schedule's unit), from the config's training annotations."""
  from sparse_detr_jax.data import pipeline, sources  # pylint: disable=import-outside-toplevel

  try:
    source = sources.build_source(cfg.data, "train")
  except FileNotFoundError as e:
    raise FileNotFoundError(
      f"--save_compiled: the learning-rate schedule needs the epoch length, and the training data is not here "
      f"({e}): give --steps_per_epoch (train.py logs it: batches per epoch at the global batch)"
    ) from None
  spec = pipeline.data_spec(cfg.data)
  return pipeline.Planner(source.sizes, spec, global_batch, cfg.train.seed, True).batches_per_epoch


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel

  from sparse_detr_jax import logs  # pylint: disable=import-outside-toplevel

  del argv
  f = flags.FLAGS
  logs.quiet_library_logs()
  try:
    topology = parse_topology(f.topology)
    if f.hbm_gib:
      topology = dataclasses.replace(topology, hbm_gib=f.hbm_gib)
    cfg = f.config
    if f.dtype:
      cfg.model.dtype = f.dtype
    per_chip = f.per_chip_batch or cfg.train.batch_size
    canvases = parse_canvases(f.canvases, cfg.data.buckets)
    functions = [x.strip() for x in f.functions.split(",")]
    if not set(functions) <= {"train", "predict"} or not functions:
      raise ValueError(f"--functions {f.functions!r}: expected train, predict or both")
    if per_chip < 1:
      raise ValueError(f"--per_chip_batch {per_chip}: expected at least 1")
    steps_per_epoch = f.steps_per_epoch or (epoch_length(cfg, per_chip * topology.chips) if f.save_compiled else 1000)
  except (ValueError, FileNotFoundError) as e:
    sys.stderr.write(f"preflight: {e}\n")
    sys.exit(2)
  try:
    devs = devices(topology)
  except Exception as e:  # no libtpu / CUDA plugin: say how to get them
    sys.stderr.write(f"preflight: no compiler for {topology.name}: {str(e).splitlines()[0]}\n{INSTALL_HINT}\n")
    sys.exit(2)
  report = run(
    cfg, topology, devs, per_chip, canvases, functions, os.path.expanduser(f.cache_dir) or None,
    threads=f.compile_threads, steps_per_epoch=steps_per_epoch, save_compiled=f.save_compiled or None,
  )  # fmt: skip
  for r in report["does_not_fit"]:
    print(
      f"does not fit: {r['function']} {r['canvas']} at {r['per_chip_batch']} images per chip needs "
      f"{r['hbm_gib']:.2f} GiB of {r['capacity_gib']:g}; the largest per-chip batch that fits: "
      f"{r['largest_fitting_batch']}"
    )
  if f.json:
    with open(f.json, "w") as out:
      json.dump(report, out, indent=1)
  if topology.chip.platform == "tpu":
    print(
      "est_s, img/s, MFU: XLA:TPU's cost model, estimates, not measurements"
      + ("" if topology.chip.clock_ghz else f" (n/a: not checked on {topology.kind})")
    )
  print(summary_line(report))
  sys.exit(1 if report["does_not_fit"] else 0)


INSTALL_HINT = (
  "TPU topologies need libtpu: `make install-libtpu` puts it in .libtpu (found there from the repository's root, or "
  "through TPU_LIBRARY_PATH); GPU ones need JAX's CUDA plugin: `make install-jax-cuda` puts it in .jax-cuda (or "
  "set SPARSE_DETR_JAX_CUDA to where it is). `make preflight` installs what its TOPOLOGY needs."
)


def define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flags.DEFINE_config_file("config", None, "a config file from configs/", lock_config=True)
  flags.DEFINE_string(
    "topology",
    None,
    "a TPU slice (v4-8 .. v4-4096, v5e-4 .. v5e-256, v5p-8 .., v6e-4 .. v6e-256), a GPU machine (a100-N, "
    "h100-N, h200-N) or this machine's CPU as N devices (cpu-N)",
  )
  flags.DEFINE_integer("per_chip_batch", 0, "images per chip (default: the config's train.batch_size)")
  flags.DEFINE_integer(
    "compile_threads", 0, "programs compiled at once (0: one per program, at most this machine's cores)", lower_bound=0
  )
  flags.DEFINE_string("canvases", "largest", "'largest', 'all' (every data.buckets canvas) or HxW[,HxW...]")
  flags.DEFINE_string(
    "save_compiled",
    "",
    "write the compiled programs and a manifest here, for train.py --compiled_dir (a saved program is as trusted as"
    " code: loading it unpickles it)",
  )
  flags.DEFINE_integer(
    "steps_per_epoch", 0, "with --save_compiled: the run's batches per epoch (default: from the training data)"
  )
  flags.DEFINE_string("dtype", "", "model.dtype to compile with (default: the config's)")
  flags.DEFINE_string("functions", "train,predict", "train, predict or both")
  flags.DEFINE_string("json", "", "write the report here too")
  flags.DEFINE_float("hbm_gib", 0, "memory per chip a program may use (default: the chip's; less leaves a margin)")
  flags.DEFINE_string(
    "cache_dir",
    os.path.join("~", ".cache", "sparse_detr_jax", "preflight"),
    "analyses of compiled programs, by lowered program and compiler ('' = off): a rerun compiles only what changed",
  )
  flags.mark_flags_as_required(["config", "topology"])


# libtpu on a machine without TPUs: several processes at once, and none of its TPU-VM start-up chatter (these only
# quieten its start: programs are compiled for --topology); the CUDA plugin starts without a driver.
LIBTPU_ENVIRONMENT = {
  "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
  "TPU_SKIP_MDS_QUERY": "1",
  "TPU_ACCELERATOR_TYPE": "v5litepod-8",
  "TPU_WORKER_ID": "0",
  "TPU_WORKER_HOSTNAMES": "localhost",
  "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",
}


def _topology_argument(argv: Sequence[str]) -> str:
  for i, a in enumerate(argv):
    if a.startswith("--topology="):
      return a.split("=", 1)[1].lower()
    if a == "--topology" and i + 1 < len(argv):
      return argv[i + 1].lower()
  return ""


def _environment() -> None:
  """Before JAX starts: libtpu from `.libtpu` and, for GPU topologies, JAX's CUDA plugin from `.jax-cuda`
  ($SPARSE_DETR_JAX_CUDA), where `make preflight` puts them, unless installed otherwise; LIBTPU_ENVIRONMENT."""
  here = os.path.abspath(".libtpu/libtpu/libtpu.so")
  if "TPU_LIBRARY_PATH" not in os.environ and os.path.exists(here):
    os.environ["TPU_LIBRARY_PATH"] = here
  kind, _, count = _topology_argument(sys.argv).partition("-")
  if kind == "cpu" and count.isdigit():  # N host devices, as train.py sees them with the same flag
    os.environ["JAX_PLATFORMS"] = "cpu"
    flag = f"--xla_force_host_platform_device_count={count}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
  cuda = os.environ.get("SPARSE_DETR_JAX_CUDA", ".jax-cuda")
  if _topology_argument(sys.argv).split("-")[0] in _GPU:
    xla_flags.set_gpu_flags(force=True)  # as train.py sets them on a GPU machine
    if os.path.isdir(cuda):
      sys.path.insert(0, os.path.abspath(cuda))
  for k, v in LIBTPU_ENVIRONMENT.items():
    os.environ.setdefault(k, v)


if __name__ == "__main__":
  from sparse_detr_jax import cli

  _environment()
  define_flags()
  cli.run(main)
