"""Reading torch.save files without PyTorch: the same arrays as torch.load (both file formats, every dtype and
layout a checkpoint holds), refused pickles, and one clear error for each kind of wrong file."""

import os
import pickle
import subprocess
import zipfile

import numpy as np
import pytest
from conftest import official, require_peer

from sparse_detr_jax import convert, pth

# Run by PyTorch: writes both formats of one object and, as .npz, what torch.load reads back from each.
WRITE = """
import argparse, collections, sys, numpy as np, torch
out, fixture = sys.argv[1], sys.argv[2]
torch.serialization.add_safe_globals([argparse.Namespace])
g = torch.Generator().manual_seed(0)
base = torch.randn(6, 5, generator=g)
sd = collections.OrderedDict(
  transposed=base.t(), sliced=base[2:, 1:4], shared=base[1], half=base.half(), bf16=base.bfloat16(),
  long=torch.arange(-3, 9).reshape(3, 4), flag=torch.tensor([True, False, True]), scalar=torch.tensor(2.5),
  double=base.double()[::2], param=torch.nn.Parameter(torch.ones(2, 3)),
)
obj = {"model": sd, "args": argparse.Namespace(lr=2e-4, backbone="resnet50", dims=[1, 2]), "epoch": 3}
torch.save(obj, f"{out}/zip.pth")
torch.save(obj, f"{out}/legacy.pth", _use_new_zipfile_serialization=False)
for name in ("zip", "legacy"):
  back = torch.load(f"{out}/{name}.pth", weights_only=True)["model"]
  back = {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().numpy() for k, v in back.items()}
  np.savez(f"{out}/{name}.npz", **back)
fix = torch.load(fixture, map_location="cpu", weights_only=True)["model"]
np.savez(f"{out}/fixture.npz", **{k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in fix.items()})
"""


def test_same_arrays_as_torch_load(tmp_path):
  fixture = official("tiny_sparse.pth")
  subprocess.run([str(require_peer()), "-c", WRITE, str(tmp_path), str(fixture)], check=True, timeout=300)
  for name in ("zip", "legacy"):
    got = pth.load(str(tmp_path / f"{name}.pth"))
    assert got["epoch"] == 3 and vars(got["args"]) == {"lr": 2e-4, "backbone": "resnet50", "dims": [1, 2]}
    with np.load(tmp_path / f"{name}.npz") as want:
      assert sorted(got["model"]) == sorted(want.files)
      for key in want.files:
        value = got["model"][key]
        assert value.flags.c_contiguous, (name, key)
        if key == "bf16":
          assert value.dtype.name == "bfloat16"
          value = value.astype(np.float32)
        assert value.dtype == want[key].dtype and value.shape == want[key].shape, (name, key)
        np.testing.assert_array_equal(value, want[key], err_msg=f"{name}: {key}")
  state, args = convert.read_checkpoint(str(fixture))
  assert args["backbone"] == "none"
  with np.load(tmp_path / "fixture.npz") as want:
    assert sorted(state) == sorted(want.files)
    for key in want.files:
      assert state[key].dtype == want[key].dtype, key
      np.testing.assert_array_equal(state[key], want[key], err_msg=key)


class _Evil:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, fmt):
  path, target = tmp_path / "evil.pth", tmp_path / "pwned"
  data = pickle.dumps({"model": {}, "args": _Evil(target)}, protocol=2)
  if fmt == "zip":
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("evil/data.pkl", data)
  else:
    path.write_bytes(b"".join(pickle.dumps(x, protocol=2) for x in (pth._LEGACY_MAGIC, 1001, {})) + data)
  with pytest.raises(pth.CheckpointError, match=r"evil.pth: refused to load: it holds `posix.system`"):
    convert.read_checkpoint(str(path))
  assert not target.exists()


def _truncated(tmp_path, src):
  data = src.read_bytes()
  (tmp_path / "t.pth").write_bytes(data[: len(data) // 2])
  return tmp_path / "t.pth", "truncated or corrupt"


def _flipped(tmp_path, src):
  data = bytearray(src.read_bytes())
  data[len(data) // 2] ^= 0xFF  # inside a storage: the zip's CRC no longer matches
  (tmp_path / "c.pth").write_bytes(bytes(data))
  return tmp_path / "c.pth", "truncated or corrupt"


def _jpeg(tmp_path, _):
  (tmp_path / "photo.pth").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
  return tmp_path / "photo.pth", "not a PyTorch checkpoint: a JPEG image"


def _npz(tmp_path, _):
  np.savez(tmp_path / "a.npz", x=np.zeros(3))
  return tmp_path / "a.npz", "a numpy .npz archive"


def _empty(tmp_path, _):
  (tmp_path / "e.pth").write_bytes(b"")
  return tmp_path / "e.pth", "an empty file"


def _plain_pickle(tmp_path, _):
  (tmp_path / "p.pth").write_bytes(pickle.dumps({"a": 1}))
  return tmp_path / "p.pth", "a pickle, but not a PyTorch checkpoint"


def _not_a_state_dict(tmp_path, _):
  with zipfile.ZipFile(tmp_path / "l.pth", "w") as out:
    out.writestr("l/data.pkl", pickle.dumps([1, 2], protocol=2))
  return tmp_path / "l.pth", "a PyTorch file, but not a checkpoint: expected"


@pytest.mark.parametrize(
  "make", [_truncated, _flipped, _jpeg, _npz, _empty, _plain_pickle, _not_a_state_dict], ids=lambda f: f.__name__[1:]
)
def test_a_wrong_file_is_named_with_what_it_holds(tmp_path, make):
  path, expected = make(tmp_path, official("tiny_deformable.pth"))
  with pytest.raises(pth.CheckpointError) as e:
    convert.read_checkpoint(str(path))
  assert str(e.value).startswith(str(path)) and expected in str(e.value), str(e.value)


def test_missing_file_and_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pth: no such checkpoint file"):
    convert.read_checkpoint(str(tmp_path / "nope.pth"))
  os.mkdir(tmp_path / "d.pth")
  with pytest.raises(pth.CheckpointError, match="a directory"):
    convert.read_checkpoint(str(tmp_path / "d.pth"))
