"""ONNX export (onnx_export.py, `export --format onnx`) and Detector.from_onnx: every fixture model (Sparse DETR and
Deformable DETR on the `none` backbone, ResNet-50, Swin) run by ONNX Runtime gives the detections JAX gives, on the
fixture images and on a photo-sized one; it runs in a fresh venv that holds numpy, pillow and onnxruntime only; the
converter takes lax.platform_dependent's CPU branch and names a primitive it cannot convert."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import onnxruntime
import pytest
from conftest import ROOT, official
from jax import lax
from PIL import Image
from test_detector import fixture_images, tiny_config

from sparse_detr_jax import Detector, export, onnx_export

MODELS = ("tiny_sparse", "tiny_deformable", "r50_sparse", "swin_sparse")
# Scores agree to float32 rounding of two compilers of the same graph; boxes are in pixels.
SCORE_TOL, BOX_TOL = 1e-4, 1e-3

SERVE = """
import json, sys
import numpy as np
from sparse_detr_jax import Detector
with np.load(sys.argv[2]) as f:
  images = [f[k] for k in sorted(f.files)]
found = Detector.from_onnx(sys.argv[1])(images, threshold=0.0)
banned = sorted(m for m in ("jax", "jaxlib", "flax", "tensorflow", "ml_collections", "absl", "optax", "orbax")
                if m in sys.modules)
print(json.dumps({"found": found, "imported": banned}))
"""


def assert_same_detections(got: list, want: list, what: str) -> None:
  assert len(got) == len(want), what
  for i, (g, w) in enumerate(zip(got, want, strict=True)):
    assert [d["category_id"] for d in g] == [d["category_id"] for d in w], f"{what}: image {i}"
    np.testing.assert_allclose([d["score"] for d in g], [d["score"] for d in w], rtol=0, atol=SCORE_TOL, err_msg=what)
    np.testing.assert_allclose(
      np.reshape([d["box"] for d in g], (-1, 4)), np.reshape([d["box"] for d in w], (-1, 4)), rtol=0, atol=BOX_TOL,
      err_msg=what,
    )  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """{model: (ONNX export directory, its images, the in-process JAX detections)} at the tiny canvases, batch 2."""
  out = {}
  for name in MODELS:
    jax_detector = Detector.from_checkpoint(str(official(f"{name}.pth")), tiny_config(), batch_size=2)
    rng = np.random.default_rng(0)
    images = fixture_images(name) + [rng.integers(0, 256, (90, 60, 3), dtype=np.uint8)]  # a partial batch too
    directory = tmp_path_factory.mktemp(name)
    export.write_onnx(jax_detector, str(directory), [(48, 64), (64, 48)], batch_size=2)
    out[name] = directory, images, jax_detector(images, threshold=0.0)
  return out


@pytest.mark.parametrize("name", MODELS)
def test_onnx_detections_equal_jax(exported, name):
  directory, images, want = exported[name]
  manifest = json.loads((directory / "manifest.json").read_text())
  assert manifest["format"] == "sparse_detr_jax.onnx/1" and manifest["batch_size"] == 2
  assert sorted(p.name for p in directory.iterdir()) == [
    "canvas_48x64.onnx", "canvas_64x48.onnx", "manifest.json", "weights.bin"
  ]  # fmt: skip
  onnx_detector = Detector.from_onnx(str(directory))
  assert onnx_detector.names is not None and len(onnx_detector.names) == 80  # COCO's, as the checkpoint's
  assert_same_detections(onnx_detector(images, threshold=0.0), want, name)


def test_photo_sized_image_on_the_coco_canvases(tmp_path):
  """ResNet-50 on a 480x640 photo: the official evaluation transform puts it on the 800x1088 canvas. (The command
  line's --format onnx runs in test_readme, as docs/inference.md gives it.)"""
  jax_detector = Detector.from_checkpoint(str(official("r50_sparse.pth")))
  photo = np.asarray(Image.fromarray(fixture_images("r50_sparse")[0]).resize((640, 480)))  # content, not noise
  export.write_onnx(jax_detector, str(tmp_path), [(800, 1088), (800, 1333), (1333, 800)])  # the fewest that hold COCO
  onnx_detector = Detector.from_onnx(str(tmp_path))
  assert_same_detections([onnx_detector(photo, threshold=0.0)], [jax_detector(photo, threshold=0.0)], "photo")


def _serving_venv() -> pathlib.Path:
  """A venv with numpy, pillow and onnxruntime (the lock's versions) and this project installed without its
  dependencies, kept in the user cache (keyed by the lock, the Python and this checkout's path)."""
  cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "sparse_detr_jax"
  key = hashlib.sha256((ROOT / "constraints.txt").read_bytes() + sys.version.encode() + str(ROOT).encode())
  venv = cache / f"onnx-serve-venv-{key.hexdigest()[:16]}"
  python = venv / "bin" / "python"
  if not (venv / ".installed").exists():
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
    pip = [str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt")]
    subprocess.run([*pip, "numpy", "pillow", "onnxruntime", "setuptools"], check=True, timeout=900)
    subprocess.run([*pip, "--no-deps", "--no-build-isolation", "-e", str(ROOT)], check=True, timeout=300)
    (venv / ".installed").touch()
  return python


def test_from_onnx_runs_in_a_venv_without_jax(exported, tmp_path):
  directory, images, want = exported["tiny_sparse"]
  python = _serving_venv()
  np.savez(tmp_path / "images.npz", **{f"{i:02d}": x for i, x in enumerate(images)})
  freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
  installed = sorted(line.split("==")[0].lower() for line in freeze.splitlines() if "==" in line)
  assert not {"jax", "jaxlib", "flax", "tensorflow", "ml-collections", "absl-py"} & set(installed), installed
  run = subprocess.run(
    [str(python), "-c", SERVE, str(directory), str(tmp_path / "images.npz")],
    capture_output=True, text=True, timeout=300, cwd=tmp_path,
  )  # fmt: skip
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.splitlines()[-1])
  assert result["imported"] == []
  assert_same_detections(result["found"], want, "fresh venv")


def test_the_converter_takes_the_cpu_branch_and_names_what_it_cannot_convert():
  x = jax.ShapeDtypeStruct((3,), np.float32)
  branches = lambda w, v: {"y": lax.platform_dependent(v, tpu=lambda v: v * 2, default=lambda v: v + w)}
  model = onnx_export.convert(branches, np.float32(3), (x,), ("v",), ("y",))
  session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
  np.testing.assert_array_equal(session.run(None, {"v": np.ones(3, np.float32)})[0], [4, 4, 4])
  with pytest.raises(NotImplementedError, match="the JAX primitive 'cummax' has no conversion"):
    onnx_export.convert(lambda w, v: {"y": lax.cummax(v) * w}, np.float32(1), (x,), ("v",), ("y",))
