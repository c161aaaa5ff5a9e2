"""benchmarks/peer_official.py end to end on a tiny config: the official code (patched copy, pure-PyTorch path, in
the peer's Python) and ours on the same converted weights agree, and the report's last line is complete."""

import os
import pathlib
import re
import subprocess
import sys

import pytest
from conftest import ROOT

OFFICIAL = pathlib.Path(
  os.environ.get("SPARSE_DETR_OFFICIAL_SRC", ROOT.parent / "shared" / "official-src" / "sparse-detr")
)
PEER_PYTHON = pathlib.Path(os.environ.get("SPARSE_DETR_PEER_PYTHON", ROOT / ".peer-venv" / "bin" / "python"))
REQUIRE_PEER = os.environ.get("SPARSE_DETR_REQUIRE_PEER", "") == "1"


def require(path: pathlib.Path, what: str) -> None:
  if not path.exists():
    msg = f"{path} not found: {what}"
    if REQUIRE_PEER:
      pytest.fail(msg)
    pytest.skip(msg)


def test_tiny_rows_agree_and_report():
  require(OFFICIAL / "models", "set SPARSE_DETR_OFFICIAL_SRC to the official source (default ../shared/official-src)")
  require(PEER_PYTHON, "run 'make install-peer' (or set SPARSE_DETR_PEER_PYTHON to a Python with torch + torchvision)")
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
  assert fields.keys() == {"device", "fwd_b4_speedup_tiny", "train_speedup_tiny", "max_abs_diff"}, last
  assert fields["device"] == "cpu"
  assert all(float(v) > 0 for k, v in fields.items() if "speedup" in k), last
  assert float(fields["max_abs_diff"]) < 1e-4, run.stdout[-2000:]
  assert re.search(r"util/misc.py: 4 x", run.stdout), run.stdout[:2000]  # the fixes are listed
