"""This project against the official Sparse DETR (Kakao Brain's PyTorch code, the paper's numbers), in one run on
one machine: the same weights on the same images.

    make install-peer      # .peer-venv: torch 2.14.1 + torchvision 0.29.1, what the official code imports
    .venv/bin/python benchmarks/peer_official.py --official ../shared/official-src/sparse-detr

Rows: rho 0 (configs/r50_efficient_detr.py: Deformable DETR + top-k queries + box refinement) and rho 0.1
(configs/r50_sparse_detr_rho_0.1.py); `--rows NAME=CONFIG,...` picks others. For each row the official model
is built from the official argparse defaults plus the config's architecture (benchmarks/official_side.py, in
the peer's Python), saved as an official .pth and converted (sparse_detr_jax.convert); the two forwards on one
random image give `max_abs_diff` (final logits and boxes; if a top-k selection differs on a near-tie, the
tensors before it: see `agreement`). Timed warm: the forward in inference mode at batch 1 and 4 (--height x
--width) and the training step at --train-batch (official: its criterion, backward, clip, AdamW; ours: the
jitted, donated trainer.make_train_step of the config; 10 boxes per image both), each in `--iters` rounds of one
official call and one of ours, in turn (the official side is a subprocess serving one call per request), so that
a shared machine's drift, which moves single timings by 25-50% here, meets both sides alike; the table gives each
side's median, their ratio, the range of the per-round ratios, and each side's fastest round and their ratio
(what the code costs when the machine is quiet). On a GPU the official model uses its CUDA
kernel (compiled from the copy, below); on a CPU its pure-PyTorch path, both with every core (torch threads =
JAX's = cpu count), both processes keeping freed memory for reuse on a CPU (sparse_detr_jax/hostmem.py).

The official source is run from a temporary copy with the fixes today's PyTorch needs (printed; the code
itself is never copied into this project). Speed-up = official time / ours (> 1: ours is faster).
With --onnx (the default), the forwards also run exported to ONNX (sparse_detr_jax.onnx_export, at each batch's
static shape) in ONNX Runtime's CPU provider, as a third side of the same rounds; `ours vs ORT` = ORT time / ours.
After its timed rounds, each row's model trained here is written as an official checkpoint (to_official.py), and the
official side builds the model from that file's args, loads it with strict=True and runs it on the first image:
`trained_max_abs_diff` is its agreement with ours.
Last line: device=<cpu|gpu> fwd_b4_speedup_<row>=<x> ... train_speedup_<row>=<x> ... [fwd_b4_ours_vs_onnx_<row>=<x>
...] max_abs_diff=<x> trained_max_abs_diff=<x>.
"""

import argparse
import ast
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

# On a GPU both sides share the device: JAX takes half its memory up front (not its default 75%), PyTorch's caching
# allocator the rest as it needs.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
import jax
import numpy as np
import train_step

from sparse_detr_jax import config as config_lib
from sparse_detr_jax import convert, hostmem, to_official

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What the ONNX forward returns: what a deployment reads, and the queries' token indices (to compare in one order).
ONNX_OUTPUTS = ("pred_logits", "pred_boxes", "query_indices")
ROWS = "rho0=configs/r50_efficient_detr.py,rho0.1=configs/r50_sparse_detr_rho_0.1.py"
PEER_VENV_PYTHON = ROOT / ".peer-venv" / "bin" / "python"
# (file pattern, regex, replacement, why): what today's PyTorch / torchvision need in the official source.
FIXES = (
  (
    "util/misc.py",
    r"float\(torchvision\.__version__\[:3\]\) < (\d)\.(\d)",
    r"tuple(map(int, torchvision.__version__.split('+')[0].split('.')[:2])) < (\1, \2)",
    "torchvision's version read from its first 3 characters: '0.29.1' as 0.2",
  ),
  ("models/ops/src/**/*", r"(\w+)\.type\(\)\.is_cuda\(\)", r"\1.is_cuda()", "Tensor::type() removed"),
  (
    "models/ops/src/**/*",
    r"AT_DISPATCH_FLOATING_TYPES\((\w+)\.type\(\)",
    r"AT_DISPATCH_FLOATING_TYPES(\1.scalar_type()",
    "Tensor::type() removed",
  ),
  ("models/ops/src/**/*", r"\.data<", ".data_ptr<", "Tensor::data<T>() removed"),
  ("models/ops/src/**/*", r"#include <THC/THCAtomics.cuh>", "#include <ATen/cuda/Atomic.cuh>", "THC removed"),
)


def patched_copy(official: pathlib.Path, dest: pathlib.Path) -> list[str]:
  """Copy the official source to dest and apply FIXES; returns what changed, one line per file and fix."""
  if not (official / "models" / "deformable_detr.py").is_file():
    raise SystemExit(f"--official {official}: not the official Sparse DETR source (no models/deformable_detr.py)")
  shutil.copytree(official, dest, ignore=shutil.ignore_patterns(".git", "figs", "*.pth"))
  applied = []
  for pattern, regex, replacement, why in FIXES:
    for path in sorted(dest.glob(pattern)):
      if not path.is_file():
        continue
      text = path.read_text()
      new, n = re.subn(regex, replacement, text)
      if n:
        path.write_text(new)
        applied.append(f"{path.relative_to(dest)}: {n} x {why}")
  return applied


def official_values(model_cfg) -> dict:
  """The official argparse values of a model config (the fields convert reads back from a checkpoint)."""
  if model_cfg.num_classes != 91:
    raise SystemExit(f"model.num_classes={model_cfg.num_classes}: the official COCO model has 91")
  if model_cfg.backbone not in ("resnet50", "none"):
    raise SystemExit(f"model.backbone={model_cfg.backbone!r}: this benchmark builds resnet50 or none")
  return {k: model_cfg[k] for k in convert.ARCH_ARGS}


class Official:
  """The official side (benchmarks/official_side.py in the peer's Python) as a subprocess answering one request per
  line: `row(name)` builds a row, `call(what)` times one of its calls."""

  def __init__(self, python: pathlib.Path, spec: pathlib.Path):
    cmd = [str(python), str(ROOT / "benchmarks" / "official_side.py"), str(spec)]
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    self.info = self._reply()

  def _reply(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise SystemExit(f"the official side failed (exit {self.proc.wait()}) in {self.proc.args[0]}; see above")
    return json.loads(line)

  def request(self, **request) -> dict:
    self.proc.stdin.write(json.dumps(request) + "\n")
    return self._reply()

  def close(self) -> None:
    self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
    self.proc.stdin.close()
    self.proc.wait()
    self.proc.stdout.close()


def seconds(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def agreement(o: dict, ref, num_queries: int) -> dict:
  """How closely our forward (batch 1) matches the official one. Both pick tokens and queries by top-k, and on
  random weights scores at a top-k boundary can be closer than float32 rounding, so an exact-math difference
  can still choose another token; then the outputs after it differ by O(1) while both are right. Returns the
  differences of every compared tensor, the number of chosen tokens / queries that differ with the official
  score gap at that boundary, and `max_abs_diff`: the largest difference over what precedes the first selection
  that differs (the final outputs when both selections agree)."""

  def diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())

  # The decoder is permutation-equivariant over its queries: where the official top-k ranks two queries of nearly
  # equal objectness the other way round, the final outputs come in another order. Compare them in the official
  # order (descending official objectness), counting the queries placed differently.
  objectness = ref["enc_logits"][0].max(-1)  # (N,) the official two-stage top-k score (eff_specific_head)
  official_order = np.argsort(-objectness, kind="stable")[:num_queries]
  ours_order = np.asarray(o["query_indices"])[0]
  where = {int(t): i for i, t in enumerate(ours_order)}
  perm = np.array([where.get(int(t), i) for i, t in enumerate(official_order)])  # ours in the official order
  r = {"queries_reordered": int(np.sum(ours_order != official_order))}
  r["logits"] = diff(np.asarray(o["pred_logits"])[:, perm], ref["pred_logits"])
  r["boxes"] = diff(np.asarray(o["pred_boxes"])[:, perm], ref["pred_boxes"])
  r["enc_outputs"] = max(diff(o["enc_outputs"]["pred_logits"], ref["enc_logits"]),
                         diff(o["enc_outputs"]["pred_boxes"], ref["enc_boxes"]))  # fmt: skip
  compared = ["logits", "boxes", "enc_outputs"]
  if "backbone_mask_prediction" in ref:
    r["scores"] = diff(o["backbone_mask_prediction"], ref["backbone_mask_prediction"])
    count = int(ref["sparse_token_nums"][0])
    theirs = set(ref["backbone_topk_proposals"][0, :count].tolist())
    r["tokens_differ"] = count - len(theirs & set(np.asarray(o["backbone_topk_proposals"])[0, :count].tolist()))
    ranked = np.sort(ref["backbone_mask_prediction"][0])[::-1]
    r["tokens_gap"] = float(ranked[count - 1] - ranked[count])
    if r["tokens_differ"]:
      compared = ["scores"]
  ranked = np.sort(objectness)[::-1]
  r["queries_differ"] = num_queries - len(set(official_order.tolist()) & set(ours_order.tolist()))
  r["queries_gap"] = float(ranked[num_queries - 1] - ranked[num_queries])
  if r["queries_differ"] and compared != ["scores"]:
    compared = ["enc_outputs"]
  r["max_abs_diff"] = max(r[k] for k in compared)
  r["compared"] = "+".join(compared)
  return r


def our_calls(name: str, cfg, out: pathlib.Path, images: np.ndarray, mask: np.ndarray, a) -> tuple[dict, dict, Any]:
  """Our forward on the official weights (converted) and its agreement with the official outputs; our calls
  (forward at each batch, jitted train step of the config), each returning what to block on; and
  `trained_parity(official)`: the model our train calls have trained so far, written as an official checkpoint
  (to_official), built from that file's args and loaded strictly by the official side, which runs it on the first
  image: its agreement with our forward of the same variables."""
  model, variables, converted = convert.load_official(str(out / f"{name}.pth"))
  for k in (*convert.ARCH_ARGS, "num_classes"):
    if converted[k] != cfg.model[k]:
      raise SystemExit(f"row {name}: the official model's {k}={converted[k]!r}, the config's {cfg.model[k]!r}")
  apply = jax.jit(model.apply)
  x = jax.device_put(np.ascontiguousarray(images.transpose(0, 2, 3, 1)))  # NCHW -> NHWC
  m = jax.device_put(mask)
  with np.load(out / f"{name}_outputs.npz") as ref:
    parity = agreement(apply(variables, x[:1], m[:1]), ref, cfg.model.num_queries)
  inputs = {b: (x[:b], m[:b]) for b in a.batches}
  calls = {f"forward_b{b}": lambda b=b: apply(variables, *inputs[b]) for b in a.batches}
  step, state, batch = train_step.random_step(cfg, (a.train_height, a.train_width), a.train_batch)
  carry = [state]

  def train():
    carry[0], metrics = step(carry[0], batch)
    return metrics

  def trained_parity(official: Official) -> dict:
    variables = jax.device_get({"params": carry[0].params, **carry[0].constants})
    path = out / f"{name}_trained.pth"
    to_official.save(str(path), variables, cfg.model, to_official.official_args(cfg.model, cfg))
    official.request(load=str(path), inputs=str(out / "first_image.npz"), out=str(out / f"{name}_trained.npz"))
    with np.load(out / f"{name}_trained.npz") as ref:
      return agreement(apply(variables, x[:1], m[:1]), ref, cfg.model.num_queries)

  if a.onnx:
    calls.update(onnx_calls(model, variables, images, mask, a.batches, out / name))
    got = calls["onnx_forward_b1"]() if 1 in a.batches else None
    if got is not None:  # ONNX Runtime against XLA on the same image: the converter's agreement
      o = apply(variables, x[:1], m[:1])
      # where two queries of nearly equal objectness come in the other order, compare in our order
      where = {int(t): i for i, t in enumerate(got["query_indices"][0])}
      perm = np.array([where.get(int(t), i) for i, t in enumerate(np.asarray(o["query_indices"])[0])])
      parity["onnx_vs_ours"] = max(
        float(np.abs(got[k][:, perm] - np.asarray(o[k])).max()) for k in ("pred_logits", "pred_boxes")
      )
      parity["onnx_queries_reordered"] = int(np.sum(perm != np.arange(len(perm))))
  return {**calls, "train": train}, parity, trained_parity


def onnx_calls(model, variables, images: np.ndarray, mask: np.ndarray, batches, prefix: pathlib.Path) -> dict:
  """{"onnx_forward_b<B>": ONNX Runtime (CPU, every core) running the model's forward at batch B}: the forward
  (final logits and boxes, what a deployment reads) converted by onnx_export at the inputs' static shapes."""
  import onnx  # pylint: disable=import-outside-toplevel
  import onnxruntime  # pylint: disable=import-outside-toplevel

  from sparse_detr_jax import onnx_export  # pylint: disable=import-outside-toplevel

  def forward(v, x, m):
    o = model.apply(v, x, m)
    return {k: o[k] for k in ONNX_OUTPUTS}

  weights = jax.device_get(variables)
  options = onnxruntime.SessionOptions()
  options.intra_op_num_threads = os.cpu_count()
  # Freed tensors go back to malloc (kept for reuse by hostmem, as both other sides' are) instead of a second arena
  # of ORT's own that would hold its peak beside XLA's in this process.
  options.enable_cpu_mem_arena = False
  calls = {}
  for b in batches:
    x = np.ascontiguousarray(images[:b].transpose(0, 2, 3, 1))
    args = (jax.ShapeDtypeStruct(x.shape, np.float32), jax.ShapeDtypeStruct(mask[:b].shape, np.bool_))
    graph = onnx_export.convert(forward, weights, args, ("image", "padding_mask"), ONNX_OUTPUTS)
    path = pathlib.Path(f"{prefix}_b{b}.onnx")
    onnx.save(graph, path, save_as_external_data=True, location=path.name + ".data")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {"image": x, "padding_mask": mask[:b]}
    run = lambda s=session, f=feeds: s.run(list(ONNX_OUTPUTS), f)
    calls[f"onnx_forward_b{b}"] = lambda run=run: dict(zip(ONNX_OUTPUTS, run(), strict=True))
  return calls


def interleaved(official: Official, ours: dict, what: str, rounds: int) -> dict[str, list[float]]:
  """Seconds of `rounds` calls of `what` by the official side, ours and (forwards, with --onnx) ONNX Runtime, in
  turn (who goes first rotates), after one warm-up call each (our compilation): all meet the same drift of a
  shared machine."""
  sides = ["official", "ours"] + (["onnx"] if f"onnx_{what}" in ours else [])
  run = {
    "official": lambda: official.request(call=what)["s"],
    "ours": lambda: seconds(ours[what]),
    "onnx": lambda: seconds(ours[f"onnx_{what}"]),
  }
  for side in sides:
    run[side]()
  times: dict[str, list[float]] = {side: [] for side in sides}
  for r in range(rounds):
    for side in sides[r % len(sides) :] + sides[: r % len(sides)]:
      times[side].append(run[side]())
  return times


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--official", required=True, help="the official Sparse DETR source directory")
  p.add_argument("--peer-python", default=None, help="a Python with torch + torchvision (default: .peer-venv's)")
  p.add_argument("--rows", default=ROWS, help="NAME=CONFIG,... (model.num_classes 91, resnet50 or none backbone)")
  p.add_argument("--set", action="append", default=[], help="KEY=VALUE config override for every row (repeatable)")
  p.add_argument("--height", type=int, default=800)
  p.add_argument("--width", type=int, default=1066)
  p.add_argument("--batches", default="1,4", help="forward batch sizes")
  p.add_argument("--train-height", type=int, default=None, help="default 800 on a GPU, 384 on a CPU")
  p.add_argument("--train-width", type=int, default=None, help="default 1333 on a GPU, 512 on a CPU")
  p.add_argument("--train-batch", type=int, default=2)
  p.add_argument("--iters", type=int, default=5, help="timed rounds (one official call and one of ours) per cell")
  p.add_argument(
    "--onnx",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="also time the forwards exported to ONNX (onnx_export) and run by ONNX Runtime on the CPU",
  )
  a = p.parse_args()
  hostmem.retain_freed_memory()
  a.batches = [int(b) for b in a.batches.split(",")]
  gpu = jax.default_backend() == "gpu"
  a.train_height = a.train_height or (800 if gpu else 384)
  a.train_width = a.train_width or (1333 if gpu else 512)
  if jax.device_count() != 1:
    raise SystemExit("run with one JAX device (the official model uses one)")
  peer = pathlib.Path(a.peer_python or (PEER_VENV_PYTHON if PEER_VENV_PYTHON.exists() else sys.executable))
  rows = {}
  for item in a.rows.split(","):
    name, _, path = item.partition("=")
    rows[name] = config_lib.load_config_file(str(ROOT / path) if not os.path.isabs(path) else path)
    rows[name].update_from_flattened_dict({k: ast.literal_eval(v) for k, v in (x.split("=", 1) for x in a.set)})

  with tempfile.TemporaryDirectory(prefix="peer_official_") as tmp:
    tmp = pathlib.Path(tmp)
    fixes = patched_copy(pathlib.Path(a.official), tmp / "src")
    rng = np.random.default_rng(0)
    images = rng.normal(size=(max(a.batches), 3, a.height, a.width)).astype(np.float32)
    mask = np.zeros((max(a.batches), a.height, a.width), bool)
    np.savez(tmp / "inputs.npz", images=images, mask=mask)
    np.savez(tmp / "first_image.npz", images=images[:1], mask=mask[:1])
    spec = {
      "src": str(tmp / "src"),
      "out": str(tmp),
      "device": "cuda" if gpu else "cpu",
      "threads": os.cpu_count(),
      "rows": [{"name": n, "args": official_values(c.model)} for n, c in rows.items()],
      "forward": {"batches": a.batches, "inputs": str(tmp / "inputs.npz")},
      "train": {"batch": a.train_batch, "height": a.train_height, "width": a.train_width, "boxes": 10},
    }
    (tmp / "spec.json").write_text(json.dumps(spec))
    official = Official(peer, tmp / "spec.json")
    times: dict = {}  # row -> what -> (official seconds, our seconds), per round
    parity: dict = {}
    trained: dict = {}  # row -> agreement on the model trained here, run by the official code
    try:
      for n, c in rows.items():
        official.request(row=n)
        calls, parity[n], trained_parity = our_calls(n, c, tmp, images, mask, a)
        whats = [f"forward_b{b}" for b in a.batches] + ["train"]
        times[n] = {w: interleaved(official, calls, w, a.iters) for w in whats}
        trained[n] = trained_parity(official)
        del calls
    finally:
      official.close()

  print("fixes applied to the official copy:" + "".join(f"\n  {f}" for f in fixes) if fixes else "no fixes applied")
  print(
    f"device: JAX {jax.devices()[0].device_kind} ({jax.default_backend()}), official torch {official.info['torch']} "
    f"{official.info['device_name'] or f'CPU x{os.cpu_count()}'}; forward {a.height}x{a.width}, train step "
    f"{a.train_height}x{a.train_width} batch {a.train_batch}; medians of {a.iters} interleaved rounds"
  )
  print(
    "| row | what | official s | ours s | speed-up | per-round speed-ups | official min s | ours min s | of the mins |"
    "\n|---|---|---|---|---|---|---|---|---|"
  )
  last = {}
  for n, row in times.items():
    for what, sides in row.items():
      theirs, mine = sides["official"], sides["ours"]
      speedup = statistics.median(theirs) / statistics.median(mine)
      rounds = [t / m for t, m in zip(theirs, mine, strict=True)]
      print(
        f"| {n} | {what} | {statistics.median(theirs):.3f} | {statistics.median(mine):.3f} | {speedup:.2f}x | "
        f"{min(rounds):.2f}-{max(rounds):.2f}x | {min(theirs):.3f} | {min(mine):.3f} | {min(theirs) / min(mine):.2f}x |"
      )
      if what in ("forward_b4", "train"):
        last[f"{'fwd_b4' if what != 'train' else 'train'}_speedup_{n}"] = speedup
  onnx_rows = [(n, w, sides) for n, row in times.items() for w, sides in row.items() if "onnx" in sides]
  if onnx_rows:
    print(
      "\nONNX Runtime (the forward exported by onnx_export, CPU, every core), in the same rounds:\n"
      "| row | what | official s | ours s | ONNX Runtime s | ORT vs official | ours vs ORT | per-round ours vs ORT |"
      "\n|---|---|---|---|---|---|---|---|"
    )
    for n, what, sides in onnx_rows:
      official_s, ours_s, onnx_s = (statistics.median(sides[k]) for k in ("official", "ours", "onnx"))
      rounds = [o / m for o, m in zip(sides["onnx"], sides["ours"], strict=True)]
      print(
        f"| {n} | {what} | {official_s:.3f} | {ours_s:.3f} | {onnx_s:.3f} | {official_s / onnx_s:.2f}x | "
        f"{onnx_s / ours_s:.2f}x | {min(rounds):.2f}-{max(rounds):.2f}x |"
      )
      if what == "forward_b4":
        last[f"fwd_b4_ours_vs_onnx_{n}"] = onnx_s / ours_s
  for n, q in parity.items():
    if "onnx_vs_ours" in q:
      print(
        f"{n}: max |ONNX Runtime - ours| final logits and boxes {q['onnx_vs_ours']:.2e} (batch 1; queries in "
        f"another order {q['onnx_queries_reordered']}, compared in ours)"
      )
    line = f"{n}: max |official - ours| final logits {q['logits']:.2e}, boxes {q['boxes']:.2e}; two-stage outputs "
    line += f"{q['enc_outputs']:.2e}"
    if "scores" in q:
      line += (
        f"; scoring logits {q['scores']:.2e}; kept tokens differing {q['tokens_differ']} (gap {q['tokens_gap']:.1e})"
      )
    line += f"; queries differing {q['queries_differ']} (gap {q['queries_gap']:.1e}), in another order "
    line += f"{q['queries_reordered']} (outputs compared in the official order); max_abs_diff over {q['compared']}"
    print(line)
  for n, q in trained.items():
    print(
      f"{n}, trained here ({a.iters + 1} steps), written as an official .pth and run by the official code: max "
      f"|official - ours| final logits {q['logits']:.2e}, boxes {q['boxes']:.2e}; max_abs_diff over {q['compared']}"
    )
  diff = max(q["max_abs_diff"] for q in parity.values())
  diff_trained = max(q["max_abs_diff"] for q in trained.values())
  print(
    f"device={'gpu' if gpu else 'cpu'} "
    + " ".join(f"{k}={v:.3f}" for k, v in last.items())
    + f" max_abs_diff={diff:.3e} trained_max_abs_diff={diff_trained:.3e}"
  )


if __name__ == "__main__":
  main()
