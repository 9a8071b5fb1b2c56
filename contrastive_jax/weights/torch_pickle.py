"""Reading `torch.save` checkpoints as numpy arrays, without importing torch.

Two layouts exist. Since torch 1.6 a checkpoint is a zip archive: `<name>/data.pkl` holds the
pickled object, each tensor a `torch._utils._rebuild_tensor_v2` call whose first argument is a
persistent id ("storage", torch.FloatStorage, key, location, numel), and `<name>/data/<key>`
holds that storage's raw bytes (byte order in `<name>/byteorder`). Older files (and
`_use_new_zipfile_serialization=False`) are one stream: magic number, protocol version, system
info, the pickled object, the list of storage keys, then per key an int64 element count and the
bytes.

`torch.load(weights_only=False)` will call any global a file names (`os.system` included); this
reader's unpickler resolves only `collections.OrderedDict`, the tensor rebuild functions and the
storage types, and raises `WeightsError` for any other global.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from contrastive_jax.weights.hf import WeightsError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES = {
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}


class _StorageType:
  """What the unpickler returns for `torch.FloatStorage` etc.: only its numpy dtype matters."""

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


class _TensorRef:
  """A tensor whose storage bytes may come later in the stream (legacy layout)."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, *_):
  return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_tensor(storage, offset, size, stride):
  return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, hooks=None, *_):
  return data


_GLOBALS = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  **{("torch", name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
  """`pickle.Unpickler` that resolves only the globals of a tensor state dict.

  `storage(dtype, key, numel, view)` is called for every persistent storage id and returns what
  the rebuild functions receive as their storage.
  """

  def __init__(self, stream, *, file: str, storage=None):
    super().__init__(stream, encoding="latin1")
    self.file, self.storage = file, storage

  def find_class(self, module, name):
    try:
      return _GLOBALS[(module, name)]
    except KeyError:
      raise WeightsError(
        f"{self.file}: refuses to unpickle the global {module}.{name}; only tensors, storages "
        f"and OrderedDicts are read from a checkpoint"
      ) from None

  def persistent_load(self, pid):
    if self.storage is None or not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      raise WeightsError(f"{self.file}: unsupported persistent id {pid!r:.80}")
    storage_type, key, _, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise WeightsError(f"{self.file}: storage {key!r} has no known type ({storage_type!r})")
    view = pid[5] if len(pid) > 5 else None
    return self.storage(storage_type.dtype, str(key), int(numel), view)


def _materialise(ref: _TensorRef, data: np.ndarray, file: str) -> np.ndarray:
  size, stride = ref.size, ref.stride
  if len(size) != len(stride) or any(n < 0 for n in size) or any(s < 0 for s in stride):
    raise WeightsError(f"{file}: tensor with size {size} and stride {stride} is malformed")
  if 0 in size:
    return np.zeros(size, data.dtype)
  last = ref.offset + sum((n - 1) * s for n, s in zip(size, stride))
  if ref.offset < 0 or last >= data.size:
    raise WeightsError(
      f"{file}: tensor of size {size}, stride {stride}, offset {ref.offset} reads past its "
      f"storage of {data.size} elements"
    )
  item = data.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
    data[ref.offset :], size, tuple(s * item for s in stride), writeable=False
  )
  return np.array(view)


def _resolve(obj: Any, storages, file: str) -> Any:
  if isinstance(obj, _TensorRef):
    _, key, view = obj.storage
    data = storages[key]
    if view is not None:
      _, offset, length = view
      data = data[int(offset) : int(offset) + int(length)]
    return _materialise(obj, data, file)
  if isinstance(obj, dict):
    return type(obj)((k, _resolve(v, storages, file)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v, storages, file) for v in obj)
  return obj


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if len(pkl) != 1:
      raise WeightsError(f"{path}: a torch zip checkpoint has one data.pkl, found {pkl}")
    prefix = pkl[0][: -len("data.pkl")]
    big = (
      prefix + "byteorder" in archive.namelist()
      and archive.read(prefix + "byteorder").strip() == b"big"
    )
    storages = {}

    def storage(dtype, key, numel, view):
      if key not in storages:
        name = f"{prefix}data/{key}"
        try:
          raw = archive.read(name)
        except KeyError:
          raise WeightsError(f"{path}: storage {name} is missing from the archive") from None
        data = np.frombuffer(raw, dtype.newbyteorder(">") if big else dtype)
        if data.size < numel:
          raise WeightsError(f"{path}: storage {name} holds {data.size} of {numel} elements")
        storages[key] = data.astype(dtype)
      return dtype, key, view

    with archive.open(pkl[0]) as f:
      obj = RestrictedUnpickler(f, file=path, storage=storage).load()
    return _resolve(obj, storages, path)


def _load_legacy(path: str) -> Any:
  with open(path, "rb") as f:
    header = [RestrictedUnpickler(f, file=path).load() for _ in range(3)]
    if header[0] != LEGACY_MAGIC or header[1] != LEGACY_PROTOCOL:
      raise WeightsError(f"{path}: not a torch checkpoint (neither zip nor legacy format)")
    little = header[2].get("little_endian", True) if isinstance(header[2], dict) else True
    dtypes = {}

    def storage(dtype, key, numel, view):
      dtypes[key] = dtype
      return dtype, key, view

    obj = RestrictedUnpickler(f, file=path, storage=storage).load()
    keys = RestrictedUnpickler(f, file=path).load()
    storages = {}
    for key in keys:
      (numel,) = struct.unpack("<q" if little else ">q", f.read(8))
      dtype = dtypes[key].newbyteorder("<" if little else ">")
      raw = f.read(numel * dtype.itemsize)
      if len(raw) != numel * dtype.itemsize:
        raise WeightsError(f"{path}: truncated: storage {key} needs {numel} elements")
      storages[key] = np.frombuffer(raw, dtype).astype(dtypes[key])
  return _resolve(obj, storages, path)


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
  """The object a `torch.save` file holds, its tensors as numpy arrays (bf16 as ml_dtypes).

  Raises WeightsError for a missing or unreadable file and for any pickled global other than
  those of a tensor state dict (see module docstring).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise WeightsError(f"{path}: no such file")
  try:
    return _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
  except WeightsError:
    raise
  except (pickle.UnpicklingError, EOFError, struct.error, ValueError, TypeError) as e:
    raise WeightsError(f"{path}: cannot read the torch checkpoint ({e})") from e


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A `torch.save`d state dict (name -> tensor) as {name: numpy array}."""
  obj = load_torch_checkpoint(path)
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise WeightsError(f"{path}: does not hold a state dict of tensors")
  return dict(obj)
