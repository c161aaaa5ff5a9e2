"""Read PyTorch checkpoints (`torch.save` files) into numpy arrays, without PyTorch.

    state, extra = pth.load("sparse_detr_r50_10.pth")        # nested dicts / lists, tensors as np.ndarray

Both of PyTorch's formats are read: the zip archive (`name/data.pkl` plus one raw file per storage,
PyTorch >= 1.6) and the legacy stream (a sequence of pickles, then the storages). The pickle is read by
an unpickler that builds only plain containers, `argparse.Namespace` and tensors (as PyTorch's
`weights_only=True` does): any other object, which could run code on loading, is refused. Every
failure is a `CheckpointError` naming the file and what was found instead.
"""

import argparse
import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

# PyTorch storage classes -> numpy dtypes (bfloat16 through ml_dtypes, which JAX ships).
_STORAGE_DTYPES = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the legacy stream's first pickle

# What a file starts with, to say what was given instead of a checkpoint.
_SIGNATURES = (
  (b"\xff\xd8\xff", "a JPEG image"),
  (b"\x89PNG", "a PNG image"),
  (b"GIF8", "a GIF image"),
  (b"\x93NUMPY", "a numpy .npy array"),
  (b"PK\x03\x04", "a zip archive without its directory at the end: the file is truncated or corrupt"),
  (b"\x1f\x8b", "a gzip file"),
  (b"{", "a JSON (text) file"),
)


class CheckpointError(ValueError):
  """A file that is not a readable, weights-only PyTorch checkpoint."""


def _dtype(storage_class: str) -> np.dtype:
  if storage_class == "BFloat16Storage":
    import ml_dtypes  # pylint: disable=import-outside-toplevel

    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(_STORAGE_DTYPES[storage_class])


class _StorageType:
  """Stands for `torch.XStorage` inside the pickle: only its dtype is used."""

  def __init__(self, name: str):
    self.dtype = _dtype(name)


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_: Any) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2: a strided view of a storage, copied to a contiguous array."""
  if not size:
    return storage[offset].copy()
  item = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
    storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride), writeable=False
  )
  return np.ascontiguousarray(view)


def _rebuild_parameter(data: np.ndarray, *_: Any) -> np.ndarray:
  """torch._utils._rebuild_parameter(_with_state): a Parameter is its data."""
  return data


_ALLOWED = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("argparse", "Namespace"): argparse.Namespace,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
  ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):
  """Builds containers, Namespaces and tensors; storages come from `storages(key, dtype, numel)`.

  With `rebuild=False` tensors are not built (the legacy format's first pass, which only learns the storages).
  """

  def __init__(self, stream: io.BytesIO, path: str, storages: Callable[[str, np.dtype, int], Any], rebuild=True):
    super().__init__(stream)
    self._path, self._storages, self._rebuild = path, storages, rebuild

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED:
      found = _ALLOWED[(module, name)]
      return found if self._rebuild or found is not _rebuild_tensor else _skip
    if module == "torch" and (name in _STORAGE_DTYPES or name == "BFloat16Storage"):
      return _StorageType(name)
    raise CheckpointError(
      f"{self._path}: refused to load: it holds `{module}.{name}`, an object that could run code; only "
      f"weights-only checkpoints (tensors, containers, argparse.Namespace) are read"
    )

  def persistent_load(self, pid: Any) -> Any:
    # ('storage', storage type, key, location, numel[, view of another storage (legacy format)])
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
      raise CheckpointError(f"{self._path}: unexpected persistent record {str(pid)[:80]} (not a tensor storage)")
    if len(pid) > 5 and pid[5] is not None:
      raise CheckpointError(f"{self._path}: storage views (PyTorch < 0.4 checkpoints) are not supported")
    return self._storages(str(pid[2]), pid[1].dtype, int(pid[4]))


def _skip(*_: Any) -> None:
  return None


def _what_it_is(path: str) -> str:
  with open(path, "rb") as f:
    head = f.read(16)
  if not head:
    return "an empty file"
  for sig, what in _SIGNATURES:
    if head.startswith(sig):
      return what
  return f"unknown content starting with {head[:8]!r}"


def _load_zip(path: str, archive: zipfile.ZipFile) -> Any:
  pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    kind = "a numpy .npz archive" if any(n.endswith(".npy") for n in archive.namelist()) else "a zip archive"
    raise CheckpointError(f"{path}: {kind} without one `<name>/data.pkl`: not a PyTorch checkpoint")
  prefix = pickles[0][: -len("data.pkl")]
  names = set(archive.namelist())
  big_endian = prefix + "byteorder" in names and archive.read(prefix + "byteorder").strip() == b"big"

  def storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    name = f"{prefix}data/{key}"
    if name not in names:
      raise CheckpointError(f"{path}: storage {name} is missing: the file is truncated or corrupt")
    return _array(path, key, archive.read(name), dtype, numel, big_endian)

  return _Unpickler(io.BytesIO(archive.read(pickles[0])), path, storage).load()


def _array(path: str, key: str, raw: bytes, dtype: np.dtype, numel: int, big_endian: bool) -> np.ndarray:
  if len(raw) < numel * dtype.itemsize:
    raise CheckpointError(
      f"{path}: storage {key} holds {len(raw)} bytes, {numel} x {dtype} need {numel * dtype.itemsize}: "
      f"the file is truncated or corrupt"
    )
  return np.frombuffer(raw, dtype.newbyteorder(">" if big_endian else "<"), count=numel).astype(dtype)


def _load_legacy(path: str, data: bytes) -> Any:
  """magic number, protocol, sys info, the object, its storage keys, then each storage as (int64 numel, bytes)."""
  stream = io.BytesIO(data)

  def no_storage(*_: Any) -> None:
    raise CheckpointError(f"{path}: a pickle, but not a PyTorch checkpoint")

  if _Unpickler(stream, path, no_storage).load() != _LEGACY_MAGIC:
    no_storage()
  _Unpickler(stream, path, no_storage).load()  # protocol version
  sys_info = _Unpickler(stream, path, no_storage).load()
  big_endian = isinstance(sys_info, dict) and not sys_info.get("little_endian", True)
  start, dtypes = stream.tell(), {}

  def learn(key: str, dtype: np.dtype, numel: int) -> None:
    dtypes[key] = dtype

  _Unpickler(stream, path, learn, rebuild=False).load()  # first pass: which storages, of which dtype
  arrays = {}
  for key in _Unpickler(stream, path, no_storage).load():
    head = stream.read(8)
    if len(head) < 8 or str(key) not in dtypes:
      raise CheckpointError(f"{path}: storage {key} is missing: the file is truncated or corrupt")
    (numel,) = struct.unpack(">q" if big_endian else "<q", head)
    dtype = dtypes[str(key)]
    arrays[str(key)] = _array(path, str(key), stream.read(numel * dtype.itemsize), dtype, numel, big_endian)
  stream.seek(start)
  return _Unpickler(stream, path, lambda key, dtype, numel: arrays[key]).load()


def load(path: str) -> Any:
  """The object a `torch.save` file holds, with tensors as numpy arrays (contiguous copies)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: a directory, not a checkpoint file")
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as archive:
        return _load_zip(path, archive)
    with open(path, "rb") as f:
      data = f.read()
    if not data.startswith(b"\x80"):
      raise CheckpointError(f"{path}: not a PyTorch checkpoint: {_what_it_is(path)}")
    return _load_legacy(path, data)
  except CheckpointError:
    raise
  except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, struct.error, KeyError, IndexError, TypeError) as e:
    raise CheckpointError(
      f"{path}: a PyTorch checkpoint that is truncated or corrupt ({type(e).__name__}: {e})"
    ) from None
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
