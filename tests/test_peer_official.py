"""benchmarks/peer_official.py end to end on a tiny config: the official code (patched copy, pure-PyTorch path, in
the peer's Python) and ours on the same converted weights agree, a model trained here and written as an official
.pth runs in the official code as ours does, and the report's last line is complete."""

import os
import pathlib
import re
import subprocess
import sys

from conftest import PEER_PYTHON, ROOT, require_peer

OFFICIAL = pathlib.Path(
  os.environ.get("SPARSE_DETR_OFFICIAL_SRC", ROOT.parent / "shared" / "official-src" / "sparse-detr")
)


def test_tiny_rows_agree_and_report():
  require_peer(
    OFFICIAL / "models", "set SPARSE_DETR_OFFICIAL_SRC to the official source (default ../shared/official-src)"
  )
  require_peer()
  cmd = [
    sys.executable, str(ROOT / "benchmarks" / "peer_official.py"),
    f"--official={OFFICIAL}", f"--peer-python={PEER_PYTHON}",
    # 2 encoder layers: with 1, the official code's encoder aux heads alias the decoder's (bbox_embed[-0:]).
    "--rows=tiny=configs/shapes_tiny.py",
    "--set=model.num_classes=91", "--set=model.enc_layers=2",
    "--height=32", "--width=40", "--batches=1,4", "--train-height=32", "--train-width=32", "--iters=1",
  ]  # fmt: skip
  run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  last = run.stdout.strip().splitlines()[-1]
  fields = dict(kv.split("=") for kv in last.split())
  assert fields.keys() == {
    "device",
    "fwd_b4_speedup_tiny",
    "train_speedup_tiny",
    "fwd_b4_ours_vs_onnx_tiny",
    "max_abs_diff",
    "trained_max_abs_diff",
  }
  assert fields["device"] == "cpu"
  assert all(float(v) > 0 for k, v in fields.items() if "speedup" in k), last
  assert float(fields["max_abs_diff"]) < 1e-4, run.stdout[-2000:]
  # The model our two train steps made, written as an official .pth, built from its args and loaded strictly by
  # the official code: the official forward equals ours.
  assert float(fields["trained_max_abs_diff"]) < 1e-5, run.stdout[-2000:]
  assert re.search(r"tiny: max \|ONNX Runtime - ours\| final logits and boxes (\S+)", run.stdout), run.stdout[-2000:]
  assert float(re.search(r"ONNX Runtime - ours\| final logits and boxes (\S+)", run.stdout).group(1)) < 1e-4
  assert re.search(r"util/misc.py: 4 x", run.stdout), run.stdout[:2000]  # the fixes are listed
