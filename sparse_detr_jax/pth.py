"""Read and write PyTorch checkpoints (`torch.save` files) as numpy arrays, without PyTorch.

    state, extra = pth.load("sparse_detr_r50_10.pth")        # nested dicts / lists, tensors as np.ndarray
    pth.save("model.pth", {"model": {"w": np.ones((2, 3), np.float32)}, "args": argparse.Namespace(lr=2e-4)})

Both of PyTorch's formats are read: the zip archive (`name/data.pkl` plus one raw file per storage,
PyTorch >= 1.6) and the legacy stream (a sequence of pickles, then the storages). The pickle is read by
an unpickler that builds only plain containers, `argparse.Namespace` and tensors (as PyTorch's
`weights_only=True` does): any other object, which could run code on loading, is refused. Every
failure is a `CheckpointError` naming the file and what was found instead.

`save` writes PyTorch's zip format (what `torch.save` writes by default), which `torch.load(weights_only=True)`
reads: numpy arrays become tensors (the same array object twice: one storage, as tied weights), holding plain
containers, scalars, strings and `argparse.Namespace` (which weights_only loading must be allowed to build:
`torch.serialization.add_safe_globals([argparse.Namespace])`).
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
_STORAGE_CLASSES = {np.dtype(v): k for k, v in _STORAGE_DTYPES.items()}  # what `save` writes
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


class _Writer:
  """The pickle (protocol 2, as torch.save) of a checkpoint object, written opcode by opcode: tensors are
  `torch._utils._rebuild_tensor_v2` calls on persistent storages, which a standard pickler cannot name without
  PyTorch imported. `storages` collects each array once (by identity), keyed '0', '1', ..."""

  def __init__(self):
    self.out = io.BytesIO()
    self.storages: dict[int, tuple[str, np.ndarray]] = {}

  def op(self, *parts: bytes) -> None:
    self.out.write(b"".join(parts))

  def global_(self, module: str, name: str) -> None:
    self.op(pickle.GLOBAL, f"{module}\n{name}\n".encode())

  def items(self, pairs) -> None:
    self.op(pickle.EMPTY_DICT, pickle.MARK)
    for k, v in pairs:
      self.save(k)
      self.save(v)
    self.op(pickle.SETITEMS)

  def save(self, obj: Any) -> None:
    if isinstance(obj, _StorageName):
      self.global_("torch", str(obj))
    elif obj is None or isinstance(obj, bool):
      self.op({None: pickle.NONE, True: pickle.NEWTRUE, False: pickle.NEWFALSE}[obj])
    elif isinstance(obj, int | np.integer):
      self.integer(int(obj))
    elif isinstance(obj, float | np.floating):
      self.op(pickle.BINFLOAT, struct.pack(">d", float(obj)))
    elif isinstance(obj, str):
      raw = obj.encode("utf-8")
      self.op(pickle.BINUNICODE, struct.pack("<I", len(raw)), raw)
    elif isinstance(obj, list | tuple):
      self.op(pickle.EMPTY_LIST, pickle.MARK) if isinstance(obj, list) else self.op(pickle.MARK)
      for x in obj:
        self.save(x)
      self.op(pickle.APPENDS if isinstance(obj, list) else pickle.TUPLE)
    elif isinstance(obj, collections.OrderedDict):
      self.global_("collections", "OrderedDict")
      self.op(pickle.EMPTY_TUPLE, pickle.REDUCE, pickle.MARK)
      for k, v in obj.items():
        self.save(k)
        self.save(v)
      self.op(pickle.SETITEMS)
    elif isinstance(obj, dict):
      self.items(obj.items())
    elif isinstance(obj, argparse.Namespace):
      self.global_("argparse", "Namespace")
      self.op(pickle.EMPTY_TUPLE, pickle.NEWOBJ)
      self.items(vars(obj).items())
      self.op(pickle.BUILD)
    elif isinstance(obj, np.ndarray):
      self.tensor(obj)
    else:
      raise TypeError(f"pth.save: cannot write a {type(obj).__name__} (tensors, containers, scalars, Namespace)")

  def integer(self, n: int) -> None:
    if 0 <= n < 256:
      self.op(pickle.BININT1, bytes([n]))
    elif 0 <= n < 65536:
      self.op(pickle.BININT2, struct.pack("<H", n))
    elif -(2**31) <= n < 2**31:
      self.op(pickle.BININT, struct.pack("<i", n))
    else:
      raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
      self.op(pickle.LONG1, bytes([len(raw)]), raw)

  def tensor(self, array: np.ndarray) -> None:
    if array.dtype not in _STORAGE_CLASSES:
      raise TypeError(f"pth.save: no PyTorch storage for dtype {array.dtype}")
    key, _ = self.storages.setdefault(id(array), (str(len(self.storages)), array))
    strides = [int(np.prod(array.shape[i + 1 :])) for i in range(array.ndim)]  # contiguous, in elements
    self.global_("torch._utils", "_rebuild_tensor_v2")
    self.op(pickle.MARK)
    self.save(("storage", _StorageName(_STORAGE_CLASSES[array.dtype]), key, "cpu", array.size))
    self.op(pickle.BINPERSID)
    self.save(0)  # storage offset
    self.save(tuple(int(n) for n in array.shape))
    self.save(tuple(strides))
    self.save(False)  # requires_grad
    self.save(collections.OrderedDict())  # backward hooks
    self.op(pickle.TUPLE, pickle.REDUCE)


class _StorageName(str):
  """A storage class inside a persistent id: written as the global `torch.<name>`."""


def save(path: str, obj: Any) -> None:
  """Write `obj` (see the module docstring) to `path` as torch.save would: a zip archive `<stem>/data.pkl`,
  `<stem>/data/<key>` (each storage, little-endian, 64-byte aligned as PyTorch aligns them), `<stem>/version`,
  `<stem>/byteorder`. Written to a temporary name, then renamed: a failure leaves no partial file."""
  writer = _Writer()
  writer.op(pickle.PROTO, b"\x02")
  writer.save(obj)
  writer.op(pickle.STOP)
  stem = "".join(c if c.isalnum() or c in "_-" else "_" for c in os.path.basename(path).split(".")[0]) or "archive"
  records = [("data.pkl", writer.out.getvalue()), ("byteorder", b"little")]
  records += [(f"data/{key}", np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes())
              for key, a in writer.storages.values()]  # fmt: skip
  records.append(("version", b"3\n"))
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
      for name, data in records:
        info = zipfile.ZipInfo(f"{stem}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        start = archive.fp.tell() + 30 + len(info.filename.encode())  # where the data would begin
        pad = -(start + 4) % 64  # an extra field (id 'FB', as PyTorch's) moves it to a multiple of 64
        info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        archive.writestr(info, data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
