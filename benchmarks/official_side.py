"""The official Sparse DETR (PyTorch) half of benchmarks/peer_official.py. It runs in the peer's Python (PyTorch
+ torchvision, e.g. `make install-peer`), never imports JAX, and is driven by peer_official.py through its stdin
and stdout (see main), so that the two sides' timed calls can alternate:

    PEER_PYTHON benchmarks/official_side.py SPEC.json

SPEC.json: {"src": a patched copy of the official source, "device": "cpu" | "cuda", "threads", "rows": [{"name",
"args": official argparse values}], "forward": {"batches", "inputs": NPZ}, "train": {"batch", "height", "width",
"boxes"}, "out": DIR} ("rows", "forward" and "train" only where rows are built). For a row it builds the official
model and criterion from the official argparse defaults plus the row's values (`models.build_model`, seed 0,
random weights), saves them as DIR/NAME.pth in the official checkpoint format (for our side to convert), runs the
forward on the first input image (DIR/NAME_outputs.npz: outputs, scoring logits, kept tokens, two-stage outputs),
then times single calls on request: the forward at each batch size (inference mode) and the official training step
(the engine's: weighted criterion sum, backward, clip_grad_norm_ 0.1, AdamW with main.py's three parameter groups).

On a GPU the deformable attention is the official CUDA kernel, compiled from models/ops/src; on a CPU the
official pure-PyTorch path (`python_ops_for_test`, which the official code uses to check its kernel). The process
keeps freed memory for reuse (sparse_detr_jax/hostmem.py, as our side does: PyTorch's CPU allocator gains from it
too).
"""

import argparse
import ast
import json
import os
import pathlib
import shutil
import sys
import time
import types
import warnings

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from sparse_detr_jax import hostmem  # no dependencies: the peer's Python has no JAX


def official_args(src: pathlib.Path, values: dict) -> argparse.Namespace:
  """The official main.py's argparse defaults with `values` set (main.py itself is not imported: its
  module-level imports need the training stack; only its get_args_parser function is executed)."""
  tree = ast.parse((src / "main.py").read_text())
  fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_args_parser")
  namespace: dict = {"argparse": argparse, "np": np}  # what get_args_parser uses from main.py's imports
  exec(compile(ast.Module([fn], []), str(src / "main.py"), "exec"), namespace)
  args = namespace["get_args_parser"]().parse_args([])
  unknown = set(values) - set(vars(args))
  if unknown:
    raise SystemExit(f"official_side: not official arguments: {sorted(unknown)}")
  vars(args).update(values)
  return args


def deformable_kernel(src: pathlib.Path, device: str) -> types.ModuleType:
  """The module the official code imports as MultiScaleDeformableAttention: on a GPU the official CUDA/C++
  extension compiled from models/ops/src; on a CPU a placeholder that is never called (see use_python_path)."""
  if device == "cpu":
    module = types.ModuleType("MultiScaleDeformableAttention")

    def unavailable(*_args, **_kwargs):
      raise RuntimeError("the official CUDA kernel is not built on a CPU run")

    module.ms_deform_attn_forward = module.ms_deform_attn_backward = unavailable
    return module
  nvcc = shutil.which("nvcc")
  if nvcc and not {"CUDA_HOME", "CUDA_PATH"} & set(os.environ):
    # torch's builder takes nvcc's grandparent folder for the toolkit: /usr/local for a /usr/local/bin/nvcc that
    # links or execs /usr/local/cuda-13.0/bin/nvcc. The first folder with the runtime's headers, then.
    homes = [pathlib.Path(nvcc).resolve().parents[1], pathlib.Path("/usr/local/cuda")]
    home = next((h for h in homes if (h / "include" / "cuda_runtime_api.h").exists()), None)
    if home:
      os.environ["CUDA_HOME"] = str(home)
  from torch.utils import cpp_extension  # pylint: disable=import-outside-toplevel

  ops = src / "models" / "ops" / "src"
  headers = [ops]
  if not (pathlib.Path(cpp_extension.CUDA_HOME or "/nonexistent") / "include" / "cusparse.h").exists():
    # A toolkit of nvcc and the runtime alone: PyTorch's CUDA headers include cuSPARSE's and cuBLAS's, which the
    # CUDA wheels beside torch hold (nvidia/cu13/include; one folder per library in the cu12 wheels).
    headers += sorted(pathlib.Path(torch.__file__).parents[1].glob("nvidia/*/include"))
  sources = [ops / "vision.cpp", *sorted((ops / "cpu").glob("*.cpp")), *sorted((ops / "cuda").glob("*.cu"))]
  return cpp_extension.load(  # the flags of the official models/ops/setup.py
    "MultiScaleDeformableAttention",
    [str(s) for s in sources],
    extra_include_paths=[str(h) for h in headers],
    extra_cflags=["-DWITH_CUDA"],
    extra_cuda_cflags=[
      "-DWITH_CUDA",
      "-DCUDA_HAS_FP16=1",
      "-D__CUDA_NO_HALF_OPERATORS__",
      "-D__CUDA_NO_HALF_CONVERSIONS__",
      "-D__CUDA_NO_HALF2_OPERATORS__",
    ],
    build_directory=str(src.parent / "kernel-build"),
    verbose=False,
  )


def no_pretrained_download() -> None:
  """torchvision's ResNet-50 with random weights: the official backbone asks for ImageNet weights (a download);
  frozen stem and layer1 stay as official (they depend on the flags, not on the weights)."""
  import torchvision  # pylint: disable=import-outside-toplevel

  resnet50 = torchvision.models.resnet50

  def random_resnet50(*, pretrained: bool = False, **kwargs):
    del pretrained
    return resnet50(weights=None, **kwargs)

  torchvision.models.resnet50 = random_resnet50


def param_groups(model: torch.nn.Module, args: argparse.Namespace) -> list[dict]:
  """main.py's AdamW groups: backbone (lr_backbone), sampling offsets / reference points (lr x lr_linear_proj_mult),
  the rest (lr); frozen parameters excluded."""

  def matches(name: str, keys: list[str]) -> bool:
    return any(k in name for k in keys)

  groups: dict[str, list] = {"base": [], "backbone": [], "linear_proj": []}
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    if matches(name, args.lr_linear_proj_names):
      groups["linear_proj"].append(p)
    elif matches(name, args.lr_backbone_names):
      groups["backbone"].append(p)
    else:
      groups["base"].append(p)
  return [
    {"params": groups["base"], "lr": args.lr},
    {"params": groups["backbone"], "lr": args.lr_backbone},
    {"params": groups["linear_proj"], "lr": args.lr * args.lr_linear_proj_mult},
  ]


def use_python_path(model: torch.nn.Module, device: str) -> None:
  """The official switch between its CUDA kernel and its pure-PyTorch reference path: the latter on a CPU."""
  for m in model.modules():
    if hasattr(m, "python_ops_for_test"):
      m.python_ops_for_test = device == "cpu"


def save_outputs(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor, path: pathlib.Path) -> None:
  """The eval-mode forward's outputs to an npz: final logits and boxes, scoring logits, kept tokens, two-stage
  outputs (the fixtures' names)."""
  from util.misc import NestedTensor  # pylint: disable=import-outside-toplevel

  model.eval()
  with torch.inference_mode():
    o = model(NestedTensor(images, mask))
    keep = {
      k: o[k] for k in ("pred_logits", "pred_boxes", "backbone_mask_prediction", "backbone_topk_proposals") if k in o
    }
    keep.update(enc_logits=o["enc_outputs"]["pred_logits"], enc_boxes=o["enc_outputs"]["pred_boxes"])
    if "sparse_token_nums" in o:
      keep["sparse_token_nums"] = torch.as_tensor(o["sparse_token_nums"])
    np.savez(path, **{k: v.cpu().numpy() for k, v in keep.items()})


def load_checkpoint(spec: dict, request: dict) -> dict:
  """A checkpoint file as the official code uses one: read with torch.load(weights_only=True) (argparse.Namespace
  allowed, as the official args need), the model built from its own `args` (device: this run's) and the
  state_dict loaded with strict=True; then the forward on request["inputs"] (an npz with `images`, `mask`) saved to
  request["out"]. With request["reference"] (another checkpoint) the reply says whether both hold the same keys and
  which tensors differ in value (compared in float32: bit-identical or not)."""
  from models import build_model  # pylint: disable=import-outside-toplevel

  torch.serialization.add_safe_globals([argparse.Namespace])
  ckpt = torch.load(request["load"], map_location="cpu", weights_only=True)
  reply: dict = {"loaded": request["load"]}
  if "reference" in request:
    ref = torch.load(request["reference"], map_location="cpu", weights_only=True)["model"]
    got = ckpt["model"]
    reply["same_keys"] = set(ref) == set(got)
    reply["differ"] = sorted(k for k in set(ref) & set(got) if not torch.equal(ref[k].float(), got[k].float()))
    reply["dtypes"] = sorted({str(v.dtype) for v in got.values()})
  if not request.get("build", True):
    return reply
  args = ckpt["args"]
  args.device = spec["device"]
  torch.manual_seed(0)
  model, _, _ = build_model(args)
  model.load_state_dict(ckpt["model"], strict=True)  # raises on a missing, unexpected or mis-shaped key
  use_python_path(model.to(spec["device"]), spec["device"])
  if "inputs" in request:
    inputs = np.load(request["inputs"])
    device = torch.device(spec["device"])
    images = torch.from_numpy(inputs["images"]).to(device)
    save_outputs(model, images, torch.from_numpy(inputs["mask"]).to(device), pathlib.Path(request["out"]))
  return reply


def build_row(spec: dict, row: dict, inputs) -> dict:
  """Build and save one row's official model, save its outputs on the first input image, and return its timed
  calls: {"forward_b<B>": inference forward at batch B, "train": one official training step}."""
  from models import build_model  # pylint: disable=import-outside-toplevel
  from util.misc import NestedTensor  # pylint: disable=import-outside-toplevel

  src, out, device = pathlib.Path(spec["src"]), pathlib.Path(spec["out"]), torch.device(spec["device"])
  args = official_args(src, {**row["args"], "device": spec["device"]})
  torch.manual_seed(0)
  model, criterion, _ = build_model(args)
  use_python_path(model.to(device), spec["device"])
  torch.save({"model": model.state_dict(), "args": args}, out / f"{row['name']}.pth")

  images = torch.from_numpy(inputs["images"]).to(device)  # (B, 3, H, W)
  mask = torch.from_numpy(inputs["mask"]).to(device)  # (B, H, W), True on padding
  save_outputs(model, images[:1], mask[:1], out / f"{row['name']}_outputs.npz")

  def forward(b: int) -> None:
    model.eval()
    with torch.inference_mode():
      model(NestedTensor(images[:b], mask[:b]))

  t, k = spec["train"], spec["train"]["boxes"]
  g = torch.Generator().manual_seed(0)
  x = torch.randn(t["batch"], 3, t["height"], t["width"], generator=g).to(device)
  pad = torch.zeros(t["batch"], t["height"], t["width"], dtype=torch.bool, device=device)
  targets = [
    {
      "labels": torch.randint(1, 91, (k,), generator=g).to(device),
      "boxes": torch.cat(
        [0.2 + 0.6 * torch.rand(k, 2, generator=g), 0.05 + 0.25 * torch.rand(k, 2, generator=g)], 1
      ).to(device),
    }
    for _ in range(t["batch"])
  ]
  opt = torch.optim.AdamW(param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay)

  def train() -> None:  # engine.train_one_epoch's step
    model.train()
    criterion.train()
    loss_dict = criterion(model(NestedTensor(x, pad)), targets)
    loss = sum(loss_dict[n] * w for n, w in criterion.weight_dict.items() if n in loss_dict)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
    opt.step()

  calls = {f"forward_b{b}": lambda b=b: forward(b) for b in spec["forward"]["batches"]}
  return {**calls, "train": train}


def main() -> None:
  """Serve peer_official.py: one JSON request per stdin line, one JSON reply per line on the real stdout (whatever
  the official code prints goes to stderr). Requests: {"row": NAME} builds that row (reply {"ready": NAME}),
  {"load": PTH, ...} loads a checkpoint into the model its args build (load_checkpoint),
  {"call": WHAT} runs one of its calls and replies {"s": seconds} (synchronised on a GPU), {"quit": true}."""
  hostmem.retain_freed_memory()
  spec = json.loads(pathlib.Path(sys.argv[1]).read_text())
  replies = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)  # the official code's prints (and C-level output) go to stderr
  src = pathlib.Path(spec["src"])
  torch.set_num_threads(spec["threads"])
  warnings.filterwarnings("ignore", category=FutureWarning)  # timm's and torchvision's deprecation notices
  sys.path.insert(0, str(src))
  sys.modules["MultiScaleDeformableAttention"] = deformable_kernel(src, spec["device"])
  no_pretrained_download()
  inputs = np.load(spec["forward"]["inputs"]) if "forward" in spec else None
  cuda = spec["device"] == "cuda"
  sync = torch.cuda.synchronize if cuda else lambda: None
  rows = {r["name"]: r for r in spec.get("rows", [])}
  replies.write(json.dumps({"torch": torch.__version__, "device_name": torch.cuda.get_device_name() if cuda else ""}))
  replies.write("\n")
  calls: dict = {}
  for line in sys.stdin:
    request = json.loads(line)
    if "row" in request:
      calls = {}  # the previous row's model is freed before the next is built
      calls = build_row(spec, rows[request["row"]], inputs)
      reply = {"ready": request["row"]}
    elif "load" in request:
      reply = load_checkpoint(spec, request)
    elif "call" in request:
      sync()
      start = time.perf_counter()
      calls[request["call"]]()
      sync()
      reply = {"s": time.perf_counter() - start}
    else:
      return
    replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
  main()
