"""Shared test set-up: the official fixtures directory, JAX's persistent compilation cache, garbage collected
after every test."""

import gc
import os
import pathlib

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get("SPARSE_DETR_FIXTURES", ROOT.parent / "shared" / "fixtures" / "official"))
REQUIRE_FIXTURES = os.environ.get("SPARSE_DETR_REQUIRE_FIXTURES", "") == "1"
# The official code's Python (torch + torchvision: `make install-peer`), for the tests that ask PyTorch itself.
PEER_PYTHON = pathlib.Path(os.environ.get("SPARSE_DETR_PEER_PYTHON", ROOT / ".peer-venv" / "bin" / "python"))
REQUIRE_PEER = os.environ.get("SPARSE_DETR_REQUIRE_PEER", "") == "1"

# JAX's persistent compilation cache, for this process and (through the environment) the train.py and
# check-script processes the tests start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ.get("JAX_CACHE_DIR", str(ROOT / ".jax_cache")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
  "jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])
)


def official(name: str) -> pathlib.Path:
  """Path of an official fixture file; skip (or fail, with SPARSE_DETR_REQUIRE_FIXTURES=1) when absent."""
  path = FIXTURES / name
  if not path.exists():
    msg = (
      f"official fixture {path} not found: set SPARSE_DETR_FIXTURES to the directory holding the "
      f"official PyTorch outputs (default ../shared/fixtures/official)"
    )
    if REQUIRE_FIXTURES:
      pytest.fail(msg)
    pytest.skip(msg)
  return path


def require_peer(path: pathlib.Path = PEER_PYTHON, what: str = "") -> pathlib.Path:
  """`path` (default: the peer's Python); skip (or fail, with SPARSE_DETR_REQUIRE_PEER=1) when absent."""
  if not path.exists():
    what = what or "run 'make install-peer' (or set SPARSE_DETR_PEER_PYTHON to a Python with torch + torchvision)"
    msg = f"{path} not found: {what}"
    if REQUIRE_PEER:
      pytest.fail(msg)
    pytest.skip(msg)
  return path


def load_npz(name: str) -> dict:
  with np.load(official(name + ".npz")) as d:
    return {k: d[k] for k in d.files}


@pytest.fixture(autouse=True)
def _collect_garbage():
  """Finalise what a test left behind before the next one starts: a finaliser that raises (pytest.ini makes
  that an error) is then reported for the test that leaked the object, not inside a later test."""
  yield
  gc.collect()
