"""export.py: the command line writes serialized inference functions that a fresh process, without the
model's code or the training packages, runs to the in-process detections; a fixed batch bit for bit."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, official
from test_detector import CANVASES, fixture_images, tiny_config

from sparse_detr_jax import Detector, export

FRESH_PROCESS = """
import json, sys
import numpy as np
sys.modules["sparse_detr_jax.model"] = None  # importing the model code now fails: the export must not need it
sys.modules["sparse_detr_jax.convert"] = None
for name in ("flax", "optax", "orbax", "grain", "tensorflow", "tensorflow_datasets", "pycocotools"):
  sys.modules[name] = None  # nor what training needs (docs/install.md: a serving machine)
from sparse_detr_jax import Detector
with np.load(sys.argv[1]) as f:
  images = [f[k] for k in sorted(f.files)]
results = []
for spec in sys.argv[2:]:  # DIR:BATCH_SIZE (0: the export's)
  directory, batch = spec.rsplit(":", 1)
  results.append(Detector.from_export(directory, batch_size=int(batch) or None)(images, threshold=0.0))
print(json.dumps(results))
"""


def run(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  rng = np.random.default_rng(0)
  extra = [rng.integers(0, 256, s, dtype=np.uint8) for s in ((90, 60, 3), (30, 41, 3), (64, 64, 3))]
  pictures = fixture_images("tiny_sparse") + extra  # landscape and portrait canvases, a partial batch
  path = tmp_path_factory.mktemp("images") / "images.npz"
  np.savez(path, **{f"{i:02d}": x for i, x in enumerate(pictures)})
  return pictures, str(path)


def test_export_round_trip_in_a_fresh_process(images, tmp_path):
  pictures, npz = images
  checkpoint = str(official("tiny_sparse.pth"))
  config = tmp_path / "tiny.py"
  config.write_text(  # tiny_config() as a config file
    "from configs import shapes_tiny\n\ndef get_config():\n  c = shapes_tiny.get_config()\n"
    f"  c.data.update(scales=(48,), val_size=48, max_size=64, buckets={CANVASES!r})\n  return c\n"
  )
  symbolic = run(
    "-m", "sparse_detr_jax.export", f"--checkpoint={checkpoint}", f"--config={config}", f"--out={tmp_path / 'b'}"
  )
  assert symbolic.returncode == 0, symbolic.stderr
  assert "Unable to initialize backend" not in symbolic.stderr  # JAX's backend probing stays quiet
  assert symbolic.stdout.startswith(f"wrote {tmp_path / 'b'}: 3 canvases")
  manifest = json.loads((tmp_path / "b" / export.MANIFEST).read_text())
  assert manifest["batch_size"] is None and set(manifest["canvases"]) == {"48x64", "64x48", "64x64"}

  detector = Detector.from_checkpoint(checkpoint, tiny_config(), batch_size=2)
  export.write(detector, str(tmp_path / "fixed"), batch_size=2, canvases=[(48, 64), (64, 48)])
  want = detector(pictures, threshold=0.0)

  fresh = run("-c", FRESH_PROCESS, npz, f"{tmp_path / 'fixed'}:0", f"{tmp_path / 'b'}:2", f"{tmp_path / 'b'}:3")
  assert fresh.returncode == 0, fresh.stderr
  fixed, *symbolic_runs = json.loads(fresh.stdout.splitlines()[-1])
  assert fixed == want  # fixed batch: bit for bit
  # Symbolic batch, run at batch sizes 2 and 3: the same detections up to float32 rounding (a symbolic
  # dimension compiles to differently rounded code; measured <= 1e-7 on scores).
  for got in symbolic_runs:
    for g, w in zip(got, want, strict=True):
      assert [d["category_id"] for d in g] == [d["category_id"] for d in w]
      np.testing.assert_allclose([d["score"] for d in g], [d["score"] for d in w], rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose([d["box"] for d in g], [d["box"] for d in w], rtol=1e-5, atol=1e-4)


def test_export_errors(images, tmp_path):
  detector = Detector.from_checkpoint(str(official("tiny_sparse.pth")), tiny_config())
  with pytest.raises(ValueError, match=r"canvases 32x32: 32x32 is not one of the config.s \(48x64,"):
    export.write(detector, str(tmp_path / "x"), canvases=[(32, 32)])
  with pytest.raises(ValueError, match=r"canvases \[\(64, 48\)\] cannot hold a 48x64"):
    export.write(detector, str(tmp_path / "x"), canvases=[(64, 48)])
  with pytest.raises(FileNotFoundError, match="manifest.json: not found"):
    Detector.from_export(str(tmp_path / "missing"))
  export.write(detector, str(tmp_path / "ok"), canvases=[(48, 64), (64, 48)], batch_size=1)
  manifest = json.loads((tmp_path / "ok" / export.MANIFEST).read_text())
  with pytest.raises(ValueError, match="fixed batch size 1, got 4"):
    Detector.from_export(str(tmp_path / "ok"), batch_size=4)
  (tmp_path / "ok" / export.MANIFEST).write_text(json.dumps(manifest | {"platforms": ["tpu"]}))
  with pytest.raises(ValueError, match=r"exported for \['tpu'\], this machine runs cpu"):
    Detector.from_export(str(tmp_path / "ok"))
  with pytest.raises(ValueError, match="already an export"):
    (tmp_path / "ok" / export.MANIFEST).write_text(json.dumps(manifest))
    export.write(Detector.from_export(str(tmp_path / "ok")), str(tmp_path / "again"))
