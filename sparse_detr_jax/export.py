"""Ship a detector: its inference function serialized with jax.export (StableHLO) or as ONNX, one artifact per
canvas; or the model as an official Sparse DETR checkpoint for the official PyTorch code.

    python -m sparse_detr_jax.export --checkpoint PATH --out DIR [--config FILE] \\
        [--canvases 800x1088,1088x800,800x1333,1333x800] [--batch_size 0] [--platforms cpu,cuda]
    python -m sparse_detr_jax.export --checkpoint PATH --format onnx --out DIR [--canvases ...] [--batch_size 1]
    python -m sparse_detr_jax.export --checkpoint PATH --format pth --out model.pth [--config FILE]

    from sparse_detr_jax import Detector
    detector = Detector.from_export("DIR")      # no model code runs: the serialized functions do
    detections = detector(image)

PATH is what Detector.from_checkpoint takes (official .pth, converted directory, training workdir or
checkpoint step). DIR holds manifest.json (format, canvases, batch size, platforms, the data config that
preprocesses the images, the checkpoint's label map: category ids and names, null where unknown; the JAX version
that wrote it), variables.npz (the weights, arguments of every artifact) and canvas_<H>x<W>.jax
(Exported.serialize() of `detector.inference_function` at that canvas). --batch_size 0 (default) exports a
symbolic batch dimension (any batch size runs); N > 0 fixes it, which also makes the artifact compute bit for bit
what the in-process model computes (a symbolic batch compiles to code whose float32 rounding differs from the
fixed-batch one at ~1e-7).
The artifacts run on the platforms they were exported for (default: this machine's).

--format onnx writes canvas_<H>x<W>.onnx (standard ONNX operators, opset onnx_export.OPSET, no custom op: the
deformable attention's sampling is gathers and products) with the weights once in weights.bin, which every canvas's
graph reads as external data, and the same manifest.json (format sparse_detr_jax.onnx/1). The graphs have static
shapes: --batch_size N (0: 1) is the batch every call runs. `Detector.from_onnx(DIR)` runs them with ONNX Runtime,
without JAX.

--format pth writes {'model': state_dict, 'args': Namespace} as the official main.py saves it (to_official.py):
the official code builds the model from the file's args and loads it with strict=True; PyTorch is not needed to
write it. Read it with torch.load(path, weights_only=True) after torch.serialization.add_safe_globals([argparse.
Namespace]). What the official args cannot say (a class count other than COCO's 91, Swin widths other than
swin-t's) is printed.
"""

import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
from absl import app, flags
from jax import export as jax_export

from sparse_detr_jax import cli, logs
from sparse_detr_jax import config as config_lib
from sparse_detr_jax import detector as detector_lib
from sparse_detr_jax.data import batching
from sparse_detr_jax.detector import MANIFEST, VARIABLES, Detector

WEIGHTS = "weights.bin"  # the ONNX format's weights, external data of every canvas's graph


def canvas_file(canvas: tuple[int, int], kind: str = "jax") -> str:
  return f"canvas_{canvas[0]}x{canvas[1]}.{kind}"


def _flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out


def checked_canvases(detector, canvases: list[tuple[int, int]] | None) -> list[tuple[int, int]]:
  """`canvases` (default: all of the detector's), or a ValueError unless they are among the detector's and
  together hold every image its transform produces."""
  canvases = [tuple(int(v) for v in c) for c in (canvases or detector.canvases)]
  unknown = sorted(set(canvases) - set(detector.canvases))
  names = ",".join(f"{h}x{w}" for h, w in canvases)
  if unknown:
    choices = ",".join(f"{h}x{w}" for h, w in detector.canvases)
    raise ValueError(f"canvases {names}: {unknown[0][0]}x{unknown[0][1]} is not one of the config's ({choices})")
  d = detector.data_config
  batching.check_buckets(canvases, max(max(d.scales), d.val_size), d.max_size, what="canvases")
  return canvases


def _manifest(detector: Detector, kind: str, files: dict[str, str], batch_size: int, **extra: Any) -> dict:
  canvases = [tuple(int(v) for v in k.split("x")) for k in files]
  return {
    "format": detector_lib.FORMATS[kind],
    "canvases": files,
    "batch_size": batch_size or None,
    **extra,
    "data": detector.data_config.to_dict() | {"buckets": [list(c) for c in canvases]},
    "categories": None if detector.names is None else {str(k): v for k, v in detector.names.items()},
    "jax_version": jax.__version__,
  }


def write(
  detector: Detector,
  out_dir: str,
  canvases: list[tuple[int, int]] | None = None,
  batch_size: int = 0,
  platforms: list[str] | None = None,
) -> None:
  """Export `detector` (in-process) to out_dir: see the module docstring. canvases: a subset of the detector's
  (default all; together they must hold every image the transform produces); batch_size: 0 = symbolic."""
  if detector.model is None:
    raise ValueError("detector: already an export; export the checkpoint it came from")
  canvases = checked_canvases(detector, canvases)
  if batch_size < 0:
    raise ValueError(f"batch_size: expected 0 (symbolic) or a positive int, got {batch_size}")
  (b,) = jax_export.symbolic_shape("b") if batch_size == 0 else (batch_size,)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  variables = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), detector.variables)
  files = {}
  for h, w in canvases:
    args = detector_lib.input_specs(b, (h, w))
    exported = jax_export.export(jax.jit(detector.function((h, w))), platforms=platforms)(variables, *args)
    files[f"{h}x{w}"] = canvas_file((h, w))
    (out / files[f"{h}x{w}"]).write_bytes(exported.serialize())
  np.savez(out / VARIABLES, **_flat(jax.device_get(detector.variables)))
  platforms = list(platforms or [jax_export.default_export_platform()])
  manifest = _manifest(detector, "jax", files, batch_size, platforms=platforms)
  (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def write_onnx(detector: Detector, out_dir: str, canvases: list[tuple[int, int]] | None = None, batch_size: int = 1):
  """Export `detector` (in-process) to out_dir as ONNX: see the module docstring."""
  import onnx  # pylint: disable=import-outside-toplevel

  from sparse_detr_jax import onnx_export, onnx_runtime  # pylint: disable=import-outside-toplevel

  if detector.model is None:
    raise ValueError("detector: already an export; export the checkpoint it came from")
  canvases = checked_canvases(detector, canvases)
  if batch_size < 1:
    raise ValueError(f"batch_size: an ONNX export has a fixed batch size, expected a positive int, got {batch_size}")
  if detector.model.config.dtype != "float32":  # ONNX Runtime's CPU kernels are float32
    raise ValueError(
      f"model.dtype {detector.model.config.dtype!r}: ONNX exports compute in float32; give a config with "
      "model.dtype = 'float32' (--config)"
    )
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  weights = jax.device_get(detector.variables)
  places = onnx_export.write_weights(weights, out / WEIGHTS)
  files = {}
  for h, w in canvases:
    args = detector_lib.input_specs(batch_size, (h, w))
    model = onnx_export.convert(
      detector.function((h, w)), weights, args, onnx_runtime.INPUTS, detector_lib.OUTPUTS, (WEIGHTS, places)
    )
    files[f"{h}x{w}"] = canvas_file((h, w), "onnx")
    onnx.save(model, out / files[f"{h}x{w}"])
  extra = {"weights": WEIGHTS, "opset": onnx_export.OPSET, "onnx_version": onnx.__version__}
  (out / MANIFEST).write_text(json.dumps(_manifest(detector, "onnx", files, batch_size, **extra), indent=1))


def define_flags() -> None:
  """The command line's flags (defined only when run as a program: the library must not own global flags)."""
  flags.DEFINE_string("checkpoint", None, "official .pth, converted directory, training workdir or checkpoint step")
  flags.DEFINE_string("config", None, "config file whose data block gives the transform and canvases")
  flags.DEFINE_enum(
    "format", "jax", FORMATS, "jax: jax.export artifacts, onnx: ONNX graphs (a directory); pth: the official checkpoint"
  )
  flags.DEFINE_string("out", None, "output directory (--format jax) or file (--format pth)")
  flags.DEFINE_list("canvases", [], "HxW canvases to export (default: every canvas of the config)")
  flags.DEFINE_integer(
    "batch_size", 0, "jax: 0 = symbolic batch dimension, N = fixed (bit-identical to in-process); onnx: N (0: 1)"
  )
  flags.DEFINE_list("platforms", [], "platforms to export for, e.g. cpu,cuda,tpu (default: this machine's)")
  flags.mark_flags_as_required(["checkpoint", "out"])


PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for
FORMATS = ("jax", "onnx", "pth")


def official_checkpoint(FLAGS) -> None:
  """--format pth: the official checkpoint file."""
  from sparse_detr_jax import to_official  # pylint: disable=import-outside-toplevel

  jax_only = [f"--{n}" for n in ("canvases", "platforms", "batch_size") if FLAGS[n].present]
  if jax_only:
    cli.usage_error(f"{', '.join(jax_only)}: only for --format jax (an official checkpoint holds weights only)")
  if os.path.isdir(FLAGS.out):
    cli.usage_error(f"--out {FLAGS.out}: a directory; --format pth writes a file, e.g. {FLAGS.out}/model.pth")
  config = config_lib.load_config_file(FLAGS.config) if FLAGS.config else None
  notes = to_official.from_checkpoint(FLAGS.checkpoint, FLAGS.out, config)
  print(f"wrote {FLAGS.out}: the official checkpoint format" + "".join(f"\n  note: {n}" for n in notes))


def main(argv: list[str]) -> None:
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logs.quiet_library_logs()
  if FLAGS.format == "pth":
    official_checkpoint(FLAGS)
    return
  try:
    canvases = [tuple(int(v) for v in c.lower().split("x")) for c in FLAGS.canvases]
  except ValueError:
    cli.usage_error(f"--canvases: expected HxW values such as 800x1088, got {','.join(FLAGS.canvases)}")
  if FLAGS.format == "onnx" and FLAGS.platforms:
    cli.usage_error("--platforms: only for --format jax (ONNX graphs run wherever an ONNX runtime does)")
  unknown = [p for p in FLAGS.platforms if p not in PLATFORMS]
  if unknown:
    cli.usage_error(f"--platforms {unknown[0]!r}: expected some of {', '.join(PLATFORMS)} (NVIDIA GPUs: cuda)")
  detector = Detector.from_checkpoint(FLAGS.checkpoint, FLAGS.config)
  if FLAGS.format == "onnx":
    write_onnx(detector, FLAGS.out, canvases or None, FLAGS.batch_size or 1)
  else:
    write(detector, FLAGS.out, canvases or None, FLAGS.batch_size, FLAGS.platforms or None)  # bad canvases: one line
  stored = VARIABLES if FLAGS.format == "jax" else WEIGHTS
  print(f"wrote {FLAGS.out}: {len(canvases or detector.canvases)} canvases, {MANIFEST}, {stored}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
