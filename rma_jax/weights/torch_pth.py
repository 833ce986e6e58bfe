"""Reading a ``torch.save``-d state dict (torchvision's ``vgg16-397923af.pth``) safely.

Weight files are untrusted input: no pickled code is run. With torch installed,
``torch.load(..., weights_only=True)``; without it, a restricted unpickler that only accepts
``collections.OrderedDict``, torch's tensor rebuild functions and storage types, and reads
the raw storages with NumPy (both the zip format of torch >= 1.6 and the older
single-stream format).
"""

from __future__ import annotations

import collections
import importlib.util
import os
import pickle
import zipfile
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from rma_jax.weights import files


class RefusedPickleError(pickle.UnpicklingError):
  """A weight file asks to build something else than tensors (it is never run)."""


_TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": ml_dtypes.bfloat16, "UntypedStorage": np.uint8,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


class _Storage:
  """A torch storage: a flat array filled from the file (after unpickling, legacy format)."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel, self.data = dtype, int(numel), None


class _PendingTensor:
  """A tensor whose storage may not be read yet (legacy files store data after the pickle)."""

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, _Storage):
      raise pickle.UnpicklingError("tensor without a storage")
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(self.size) != len(self.stride) or min(self.size + self.stride + (self.offset,),
                                                 default=0) < 0:
      raise pickle.UnpicklingError(f"bad tensor size {self.size} / stride {self.stride}")
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if 0 not in self.size and last >= self.storage.numel:
      raise pickle.UnpicklingError("tensor reaches past the end of its storage")

  def numpy(self) -> np.ndarray:
    data = self.storage.data
    if data is None or data.size != self.storage.numel:
      raise pickle.UnpicklingError("storage data missing from the file")
    if 0 in self.size:
      return np.zeros(self.size, data.dtype)
    strides = tuple(s * data.itemsize for s in self.stride)
    return np.lib.stride_tricks.as_strided(data[self.offset:], self.size, strides).copy()


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  del unused  # requires_grad, backward_hooks, metadata: irrelevant for weights
  return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  del unused
  return data


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles torch state dicts and refuses any other global (so runs no foreign code)."""

  _ALLOWED = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  }

  def __init__(self, file, storage_loader: Callable[..., _Storage]):
    super().__init__(file)
    self._storage_loader = storage_loader

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return self._ALLOWED[(module, name)]
    if module in ("torch", "torch.cuda") and name in _TORCH_STORAGE_DTYPES:
      return _StorageType(_TORCH_STORAGE_DTYPES[name])
    raise RefusedPickleError(
        f"refusing to load global {module}.{name}: a weight file holds only tensors")

  def persistent_load(self, pid):
    valid = (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")
             and isinstance(pid[1], _StorageType))
    if self._storage_loader is None or not valid:
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
    return self._storage_loader(*pid[1:])


def _materialise(obj: Any) -> dict[str, np.ndarray]:
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]  # training checkpoints wrap the state dict
  if not isinstance(obj, Mapping):
    raise ValueError(f"expected a state dict (a dict of tensors), got {type(obj).__name__}")
  out = {}
  for key, value in obj.items():
    if not isinstance(value, _PendingTensor):
      raise ValueError(f"state dict entry {key!r} is not a tensor: {type(value).__name__}")
    out[str(key)] = value.numpy()
  return out


def _read_torch_zip(path: str) -> dict[str, np.ndarray]:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
      raise ValueError(f"{path}: not a torch.save zip archive (no <name>/data.pkl)")
    prefix = pkl[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode().strip()
    storages: dict[str, _Storage] = {}

    def load(storage_type, key, location, numel, *unused):
      del location, unused
      key = str(key)
      if key not in storages:
        raw = archive.read(f"{prefix}data/{key}")
        dtype = storage_type.dtype.newbyteorder("<" if byteorder == "little" else ">")
        storage = _Storage(storage_type.dtype, len(raw) // dtype.itemsize)
        storage.data = np.frombuffer(raw, dtype).astype(storage_type.dtype)
        storages[key] = storage
      return storages[key]

    with archive.open(pkl[0]) as f:
      result = _RestrictedUnpickler(f, load).load()
  return _materialise(result)


def _read_torch_legacy(path: str) -> dict[str, np.ndarray]:
  with open(path, "rb") as f:
    header = [_RestrictedUnpickler(f, None).load() for _ in range(3)]
    if header[0] != _LEGACY_MAGIC:
      raise ValueError(f"{path}: not a torch.save file (bad magic number)")
    storages: dict[str, _Storage] = {}

    def load(storage_type, key, location, numel, view=None, *unused):
      del location, unused
      if view is not None:
        raise pickle.UnpicklingError("storage views are not supported")
      key = str(key)
      storages.setdefault(key, _Storage(storage_type.dtype, numel))
      return storages[key]

    result = _RestrictedUnpickler(f, load).load()
    keys = _RestrictedUnpickler(f, None).load()  # the storage keys, in file order
    if not isinstance(keys, list):
      raise ValueError(f"{path}: corrupt file (no storage key list)")
    for key in keys:
      storage = storages.get(str(key))
      if storage is None:
        raise ValueError(f"{path}: storage {key!r} was not referenced")
      numel = int(np.frombuffer(f.read(8), "<i8")[0])
      if numel != storage.numel:
        raise ValueError(f"{path}: storage {key!r} holds {numel} values, expected {storage.numel}")
      raw = f.read(numel * storage.dtype.itemsize)
      storage.data = np.frombuffer(raw, storage.dtype.newbyteorder("<")).astype(storage.dtype)
  return _materialise(result)


def load_torch_state_dict(path: str | os.PathLike, *,
                          use_torch: bool | None = None) -> dict[str, np.ndarray]:
  """Reads a ``torch.save``-d state dict (e.g. torchvision's ``vgg16-397923af.pth``) safely.

  No pickled code is run: with torch, ``torch.load(..., weights_only=True)``; without it,
  a restricted unpickler that allows only OrderedDict, tensor rebuilds and storage types.

  Args:
    path: the ``.pth`` file (zip format of torch >= 1.6, or the older stream format).
    use_torch: ``None`` uses torch if it is installed; ``False`` forces the built-in reader.

  Returns:
    state dict name (``'features.0.weight'`` …) -> NumPy array, in torch's layout.

  Raises:
    RefusedPickleError (a pickle.UnpicklingError): the file asks to run code or build
      anything but tensors.
    FileNotFoundError: no such file.
    ValueError: the file is empty, truncated, not a torch.save file or not a state dict
      (one line naming the file and what was expected).
  """
  path = os.fspath(path)
  expected = "expected a torchvision .pth state dict (torch.save)"
  files.check_weight_file(path, expected)
  # What the file is, before torch or the built-in reader sees it: both would fail on
  # another format with a message that names neither the file nor the fix.
  kind = files.sniff(path)
  foreign = {
      "hdf5": "it is an HDF5 file: use --from=keras",
      "keras-zip": "it is a .keras archive (a zip with model.weights.h5): use --from=keras",
      "zip": "it is a zip archive without <name>/data.pkl, so not a torch.save file",
      "pickle": ("it is a Python pickle but not a torch.save file (no torch magic number; "
                 "save the state dict with torch.save)"),
      "unknown": ("it is neither a zip archive nor a pickle (it starts with "
                  f"{files.first_bytes(path)})"),
  }
  if kind in foreign:
    raise ValueError(f"{path}: cannot be read as a torch.save file: {foreign[kind]}; "
                     f"{expected}")
  try:
    return _read_torch(path, use_torch)
  except RefusedPickleError:
    raise  # the message says what was refused
  except (EOFError, RuntimeError, OSError, ValueError, IndexError, KeyError, TypeError,
          zipfile.BadZipFile, pickle.UnpicklingError) as e:
    # Truncated or foreign files fail anywhere inside the readers, mostly without the name.
    hint = ("; it is an HDF5 file: use --from=keras" if files.is_hdf5_file(path) else
            "; it starts as a zip archive but its end is missing: truncated? (compare its size "
            "with the download)" if files.starts_as_broken_zip(path) else
            "; truncated? (compare its size with the download)" if files.is_torch_file(path)
            else "")
    message = files.one_line(e).replace(f"{path}: ", "")
    raise ValueError(f"{path}: cannot be read as a torch.save file ({message}){hint}; "
                     f"{expected}") from None


def _read_torch(path: str, use_torch: bool | None) -> dict[str, np.ndarray]:
  if use_torch is None:
    use_torch = importlib.util.find_spec("torch") is not None
  if use_torch:
    import torch  # pylint: disable=g-import-not-at-top  # optional: the `torch` extra
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
      raise RefusedPickleError(f"{path}: refused by torch.load(weights_only=True): {e}")
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
      obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
      raise ValueError(f"expected a state dict (a dict of tensors), got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
      if not isinstance(value, torch.Tensor):
        raise ValueError(f"state dict entry {key!r} is not a tensor: {type(value).__name__}")
      value = value.detach()
      out[str(key)] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return out
  if zipfile.is_zipfile(path):
    return _read_torch_zip(path)
  return _read_torch_legacy(path)

