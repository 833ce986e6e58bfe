"""ImageNet VGG-16 weights and the paper's two-step initialisation (SPEC §3).

Two public VGG-16 weight files are supported:

* Keras (``--from=keras``): ``vgg16_weights_tf_dim_ordering_tf_kernels.h5`` and its
  ``_notop`` variant (converted from Caffe), read with h5py. Kernels are already HWIO and
  ``fc1`` flattens the 7x7x512 pool5 map in (h, w, c) order, like our ``fc6``. Inputs are
  BGR with the Caffe mean subtracted: pixel convention ``'caffe'``.
* torchvision (``--from=torch``): ``vgg16-397923af.pth``, a pickled state dict. Conv
  weights are OIHW and ``classifier.0`` flattens pool5 in (c, h, w) order, so both are
  permuted. Inputs are RGB / 255 normalised by the ImageNet mean/std: convention ``'torch'``.

Weight files are untrusted input. A ``.pth`` is unpickled without executing code: with
``torch.load(..., weights_only=True)`` when torch is installed, otherwise with a restricted
unpickler that only accepts ``collections.OrderedDict``, torch's tensor rebuild functions and
storage types, and reads the raw storages with NumPy (both the zip format of torch >= 1.6 and
the older single-stream format). Missing, extra or wrongly shaped tensors are one error that
names them all; a file that cannot be read at all (empty, truncated, another format, given to
the wrong ``--from``) is one line naming it and what was expected.

``python -m rma_jax.pretrained --from=keras|torch FILE --out=DIR`` writes DIR as an Orbax
checkpoint of ``{conv1_1 … conv5_3, fc6, fc7}`` (no fc6/fc7 for a ``_notop`` file) with the
pixel convention in its custom metadata; ``load_pretrained(DIR)`` reads both back. DIR
appears only once complete.

Initialisation (paper §5.1, "two-step"): stage 1 fine-tunes the baseline (``VGG16`` with a
head) from ImageNet weights, ``init_trunk_from_pretrained``; stage 2 builds the attention
model from the stage-1 trunk and ImageNet ``fc6`` (as ``W_fx``), ``init_rma_from_baseline``,
every other layer keeping its fresh (Xavier) initialisation.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import shutil
import sys
import tempfile
import zipfile
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import ml_dtypes
import numpy as np

from rma_jax import models

Params = dict[str, Any]

ORIGINS = ("keras", "torch")
PIXEL_CONVENTION = {"keras": "caffe", "torch": "torch"}
"""Pixel preprocessing each weight origin was trained with (SPEC §3)."""

FC6_INPUT_SHAPE = (7, 7, 512)
"""pool5 of VGG-16 on a 224x224 image, the input of fc6 (flattened (h, w, c) here)."""

TORCH_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
"""Positions of conv1_1 … conv5_3 in torchvision's ``vgg16().features`` (ReLU/pool between)."""


class WeightsMismatchError(ValueError):
  """A weight file's tensors do not match the expected VGG-16 names and shapes."""


class RefusedPickleError(pickle.UnpicklingError):
  """A weight file asks to build something else than tensors (it is never run)."""


# --------------------------------------------------------------------------------------------
# Expected layout.


def _vgg16_shapes() -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
  """Flax name -> (kernel shape, bias shape) of the real VGG-16 (convs HWIO, fc (in, out))."""
  shapes = {}
  cin = 3
  for name, cout in zip(models.vgg16_layer_names(),
                        (c for block in models.VGG16_BLOCKS for c in block)):
    shapes[name] = ((3, 3, cin, cout), (cout,))
    cin = cout
  shapes["fc6"] = ((int(np.prod(FC6_INPUT_SHAPE)), 4096), (4096,))
  shapes["fc7"] = ((4096, 4096), (4096,))
  return shapes


def _fc6_from_torch(w: np.ndarray) -> np.ndarray:
  # torch: (out, in) with in = (c, h, w) flattened; ours: (in, out) with in = (h, w, c).
  h, wd, c = FC6_INPUT_SHAPE
  return w.reshape(w.shape[0], c, h, wd).transpose(2, 3, 1, 0).reshape(h * wd * c, w.shape[0])


_Rule = tuple[str, str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def _rules(origin: str) -> tuple[list[_Rule], list[_Rule], tuple[str, ...]]:
  """(conv rules, fc rules, ignored name prefixes) mapping source tensors to flax params.

  A rule is (source name, flax 'layer/param', expected source shape, transform).
  """
  shapes = _vgg16_shapes()
  conv, fc = [], []
  ident = lambda a: a  # noqa: E731
  if origin == "keras":
    for name in models.vgg16_layer_names():
      b, i = name[4:].split("_")
      src = f"block{b}_conv{i}"
      conv.append((f"{src}/kernel", f"{name}/kernel", shapes[name][0], ident))
      conv.append((f"{src}/bias", f"{name}/bias", shapes[name][1], ident))
    for src, name in (("fc1", "fc6"), ("fc2", "fc7")):
      fc.append((f"{src}/kernel", f"{name}/kernel", shapes[name][0], ident))
      fc.append((f"{src}/bias", f"{name}/bias", shapes[name][1], ident))
    return conv, fc, ("predictions/",)
  if origin == "torch":
    for idx, name in zip(TORCH_CONV_INDICES, models.vgg16_layer_names()):
      k, bias = shapes[name]
      conv.append((f"features.{idx}.weight", f"{name}/kernel", (k[3], k[2], k[0], k[1]),
                   lambda a: a.transpose(2, 3, 1, 0)))  # OIHW -> HWIO
      conv.append((f"features.{idx}.bias", f"{name}/bias", bias, ident))
    fc.append(("classifier.0.weight", "fc6/kernel", shapes["fc6"][0][::-1], _fc6_from_torch))
    fc.append(("classifier.0.bias", "fc6/bias", shapes["fc6"][1], ident))
    fc.append(("classifier.3.weight", "fc7/kernel", shapes["fc7"][0][::-1], lambda a: a.T))
    fc.append(("classifier.3.bias", "fc7/bias", shapes["fc7"][1], ident))
    return conv, fc, ("classifier.6.",)
  raise ValueError(f"origin must be one of {ORIGINS}, got {origin!r}")


def to_flax(weights: Mapping[str, Any], origin: str) -> dict[str, Any]:
  """Maps a Keras or torchvision VGG-16 weight dict to this project's parameter names.

  Args:
    weights: source name -> array, as returned by ``load_keras_h5`` (``'block1_conv1/kernel'``,
      ``'fc1/bias'``, …) or ``load_torch_state_dict`` (``'features.0.weight'``, …). The
      ImageNet classifier (``predictions`` / ``classifier.6``) is accepted and dropped; fc6
      and fc7 are optional together (``_notop`` files have neither).
    origin: ``'keras'`` or ``'torch'``.

  Returns:
    ``{'params': {'conv1_1': {'kernel': (3, 3, 3, 64), 'bias': (64,)}, …, 'conv5_3': …,
    'fc6': {'kernel': (25088, 4096), 'bias'}, 'fc7': {'kernel': (4096, 4096), 'bias'}},
    'pixel_convention': 'caffe' | 'torch'}`` with float32 NumPy arrays; fc6's input is
    pool5 flattened in (h, w, c) order.

  Raises:
    WeightsMismatchError: naming every missing, unexpected and wrongly shaped tensor.
  """
  conv, fc, ignored = _rules(origin)
  has_fc = any(src in weights for src, *_ in fc)
  rules = conv + (fc if has_fc else [])
  known = {src for src, *_ in conv + fc}
  missing = [src for src, *_ in rules if src not in weights]
  extra = sorted(k for k in weights if k not in known and not k.startswith(ignored))
  wrong = [f"{src} {tuple(np.shape(weights[src]))} (expected {shape})"
           for src, _, shape, _ in rules
           if src in weights and tuple(np.shape(weights[src])) != shape]
  if missing or extra or wrong:
    lines = [f"these {origin} weights are not VGG-16's:"]
    if missing:
      lines.append("  missing: " + ", ".join(missing))
    if extra:
      lines.append("  unexpected: " + ", ".join(extra))
    if wrong:
      lines.append("  wrong shape: " + ", ".join(wrong))
    raise WeightsMismatchError("\n".join(lines))
  params: Params = {}
  for src, dst, _, transform in rules:
    layer, name = dst.split("/")
    value = transform(np.asarray(weights[src], dtype=np.float32))
    params.setdefault(layer, {})[name] = np.ascontiguousarray(value)
  return {"params": params, "pixel_convention": PIXEL_CONVENTION[origin]}


# --------------------------------------------------------------------------------------------
# Weight-file errors: one line naming the file and what was expected.

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _check_weight_file(path: str, expected: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file; {expected}")
  if os.path.getsize(path) == 0:
    raise ValueError(f"{path}: the file is empty; {expected}")


def _is_torch_file(path: str) -> bool:
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      return any(n.endswith("/data.pkl") for n in archive.namelist())
  with open(path, "rb") as f:
    return f.read(2) == b"\x80\x02"  # the legacy format starts with a protocol-2 pickle


def _starts_as_broken_zip(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(path)


def _is_hdf5_file(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE


# --------------------------------------------------------------------------------------------
# Keras .h5 reader.


def _h5_attr_list(group, name: str) -> list[str] | None:
  """Reads a (possibly chunked: name0, name1, …) string-list attribute as Keras writes it."""
  if name in group.attrs:
    values = list(group.attrs[name])
  elif f"{name}0" in group.attrs:
    values, i = [], 0
    while f"{name}{i}" in group.attrs:
      values.extend(group.attrs[f"{name}{i}"])
      i += 1
  else:
    return None
  return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _layer_entries(layer: str, arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
  # Conv2D and Dense always list (kernel, bias) in this order, in every Keras version,
  # whatever the stored names ('block1_conv1_W_1:0', 'block1_conv1/kernel:0', 'vars/0').
  if len(arrays) == 2 and arrays[0].ndim >= 2 and arrays[1].ndim == 1:
    return {f"{layer}/kernel": arrays[0], f"{layer}/bias": arrays[1]}
  return {f"{layer}/{i}": a for i, a in enumerate(arrays)}


def _read_keras_h5(f) -> dict[str, np.ndarray]:
  root = f
  if _h5_attr_list(root, "layer_names") is None and "model_weights" in root:
    root = root["model_weights"]  # model.save('x.h5') wraps the weights
  layer_names = _h5_attr_list(root, "layer_names")
  out: dict[str, np.ndarray] = {}
  if layer_names is not None:  # legacy layout: Keras 1/2 save_weights and every *.h5 save
    for layer in layer_names:
      group = root[layer]
      names = _h5_attr_list(group, "weight_names") or []
      out.update(_layer_entries(layer, [np.asarray(group[n]) for n in names]))
    return out
  if "layers" in f:  # Keras 3 save_weights('x.weights.h5'): layers/<path>/vars/{0,1,…}
    def visit(path, obj):
      if path.endswith("vars") and hasattr(obj, "keys") and len(obj):
        layer = obj.attrs.get("name", path.split("/")[-2])
        layer = layer.decode("utf8") if isinstance(layer, bytes) else str(layer)
        if any(k.startswith(layer + "/") for k in out):
          raise ValueError(f"two layers are named {layer!r}")
        arrays = [np.asarray(obj[k]) for k in sorted(obj.keys(), key=int)]
        out.update(_layer_entries(layer, arrays))
    f["layers"].visititems(visit)
    return out
  raise ValueError("not a Keras weight file: no 'layer_names' attribute and no 'layers' group")


def load_keras_h5(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads the weights of a Keras model file.

  Supports the legacy HDF5 layout (the downloadable
  ``vgg16_weights_tf_dim_ordering_tf_kernels[_notop].h5``, Keras 2 ``save_weights``, and
  ``model.save('x.h5')`` of Keras 2 and 3), Keras 3 ``save_weights('x.weights.h5')`` and a
  ``.keras`` archive.

  Args:
    path: the weight file.

  Returns:
    ``'<layer>/kernel'`` and ``'<layer>/bias'`` -> array for each layer with a kernel and a
    bias (``'<layer>/<i>'`` for other layers), layer names as Keras gives them
    (``block1_conv1`` … ``fc1``, ``fc2``, ``predictions``).

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is empty, truncated, not HDF5, a zip without ``model.weights.h5``
      or not a Keras weight file (one line naming the file and what was expected).
  """
  import h5py  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  expected = "expected a Keras weight file (.h5, .weights.h5 or a .keras archive)"
  _check_weight_file(path, expected)
  source: Any = path
  if zipfile.is_zipfile(path):  # .keras: a zip holding model.weights.h5
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      if "model.weights.h5" not in names:
        hint = ("; it is a torch.save archive: use --from=torch"
                if any(n.endswith("/data.pkl") for n in names) else "")
        raise ValueError(f"{path}: a zip archive without model.weights.h5, so not a .keras "
                         f"file{hint}; {expected}")
      source = io.BytesIO(archive.read("model.weights.h5"))
  try:
    with h5py.File(source, "r") as f:
      return _read_keras_h5(f)
  except (OSError, KeyError, ValueError) as e:  # h5py names neither the file nor the fix
    hint = "; it is a torch.save file: use --from=torch" if _is_torch_file(path) else ""
    raise ValueError(f"{path}: cannot be read as a Keras weight file "
                     f"({_one_line(e)}){hint}; {expected}") from None


# --------------------------------------------------------------------------------------------
# torchvision .pth reader.

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
  _check_weight_file(path, expected)
  try:
    return _read_torch(path, use_torch)
  except RefusedPickleError:
    raise  # the message says what was refused
  except (EOFError, RuntimeError, OSError, ValueError, IndexError, KeyError, TypeError,
          zipfile.BadZipFile, pickle.UnpicklingError) as e:
    # Truncated or foreign files fail anywhere inside the readers, mostly without the name.
    hint = ("; it is an HDF5 file: use --from=keras" if _is_hdf5_file(path) else
            "; it starts as a zip archive but its end is missing: truncated? (compare its size "
            "with the download)" if _starts_as_broken_zip(path) else
            "; truncated? (compare its size with the download)" if _is_torch_file(path) else "")
    message = _one_line(e).replace(f"{path}: ", "")
    raise ValueError(f"{path}: cannot be read as a torch.save file ({message}){hint}; "
                     f"{expected}") from None


def _read_torch(path: str, use_torch: bool | None) -> dict[str, np.ndarray]:
  if use_torch is None:
    try:
      import torch  # pylint: disable=g-import-not-at-top,unused-import
      use_torch = True
    except ImportError:
      use_torch = False
  if use_torch:
    import torch  # pylint: disable=g-import-not-at-top
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


def load_weights(path: str | os.PathLike, origin: str) -> dict[str, Any]:
  """Reads a Keras or torchvision VGG-16 file: ``to_flax(read(path), origin)``."""
  if origin == "keras":
    return to_flax(load_keras_h5(path), origin)
  if origin == "torch":
    return to_flax(load_torch_state_dict(path), origin)
  raise ValueError(f"origin must be one of {ORIGINS}, got {origin!r}")


# --------------------------------------------------------------------------------------------
# The Orbax checkpoint.


def save_pretrained(out: str | os.PathLike, params: Params, pixel_convention: str,
                    **metadata: Any) -> str:
  """Writes ``params`` as an Orbax checkpoint at ``out`` with the pixel convention.

  The checkpoint is written beside ``out`` in a temporary folder and renamed when complete,
  so ``out`` is either absent or whole. An existing ``out`` is an error (never overwritten).

  Args:
    out: the folder to create.
    params: the parameter tree (``to_flax(...)['params']``).
    pixel_convention: ``'caffe'`` | ``'torch'`` | …, stored in the custom metadata.
    **metadata: more JSON-serialisable custom metadata (origin, source file).

  Returns:
    The absolute path of ``out``.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(os.fspath(out))
  if os.path.exists(out):
    raise FileExistsError(f"{out} exists; choose a new --out folder")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  try:
    target = os.path.join(staging, "checkpoint")
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(target, params,
                        custom_metadata={"pixel_convention": pixel_convention, **metadata})
    os.rename(target, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return out


def load_pretrained(path: str | os.PathLike, *,
                    pixel_convention: str | None = None) -> tuple[Params, str]:
  """Reads a checkpoint written by ``python -m rma_jax.pretrained`` / ``save_pretrained``.

  Args:
    path: the checkpoint folder.
    pixel_convention: if given, the convention the caller preprocesses with; a different
      recorded one is an error (the weights would silently see wrongly normalised pixels).

  Returns:
    (params, pixel_convention): ``{'conv1_1': {'kernel', 'bias'}, …, 'fc6', 'fc7'}`` as
    float32 NumPy arrays (no fc6/fc7 from a ``_notop`` file), and the recorded convention.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(os.fspath(path))
  with ocp.StandardCheckpointer() as checkpointer:
    recorded = (checkpointer.metadata(path).custom_metadata or {}).get("pixel_convention")
    params = checkpointer.restore(path)
  if not recorded:
    raise ValueError(f"{path} records no pixel_convention; re-create it with "
                     "python -m rma_jax.pretrained")
  if pixel_convention is not None and pixel_convention != recorded:
    raise ValueError(f"{path} needs pixel_convention={recorded!r}, got {pixel_convention!r}")
  return jax.tree.map(np.asarray, params), recorded


# --------------------------------------------------------------------------------------------
# Initialisation of the models from pretrained parameters (pure functions on pytrees).


def _unwrap(tree: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
  """Accepts ``params`` or ``{'params': params}``; returns (params, was_wrapped)."""
  if set(tree) == {"params"}:
    return tree["params"], True
  return tree, False


def _trunk_of(params: Mapping[str, Any], what: str) -> tuple[Mapping[str, Any], tuple[str, ...]]:
  """The conv1_1 … conv5_3 subtree of a VGG16 (top level) or RMA (``trunk``) tree."""
  if "trunk" in params:
    return params["trunk"], ("trunk",)
  if "conv1_1" in params:
    return params, ()
  raise ValueError(f"{what} is neither a VGG16 nor an RMA parameter tree "
                   f"(top-level keys {sorted(params)})")


def _like(value: Any, old: Any) -> Any:
  """``value`` with the dtype (and, for a jax.Array, the sharding) of ``old``."""
  new = np.asarray(value, dtype=old.dtype if hasattr(old, "dtype") else np.asarray(old).dtype)
  if isinstance(old, jax.Array):
    return jax.device_put(new, old.sharding)
  return new


def _replace(tree: Mapping[str, Any], path: Sequence[str], value: Any) -> dict[str, Any]:
  """A copy of ``tree`` with ``tree[path]`` = value; shares every untouched subtree."""
  new = dict(tree)
  new[path[0]] = value if len(path) == 1 else _replace(tree[path[0]], path[1:], value)
  return new


def _fit(name: str, src: Any, old: Any, width: int, errors: list[str]) -> Any:
  """``src`` as a replacement of ``old``; the leading channels when ``width`` > 1 thins it."""
  src_shape, old_shape = tuple(np.shape(src)), tuple(np.shape(old))
  if src_shape == old_shape:
    return _like(src, old)
  if width > 1 and len(src_shape) == len(old_shape) and all(
      o <= s for o, s in zip(old_shape, src_shape)):
    # Thin trunks (width > 1, smoke tests only) take the leading input/output channels.
    return _like(np.asarray(src)[tuple(slice(0, o) for o in old_shape)], old)
  errors.append(f"{name}: pretrained {src_shape} vs model {old_shape}")
  return old


def _copy_layers(params: Mapping[str, Any], prefix: tuple[str, ...],
                 source: Mapping[str, Any], names: Sequence[str], width: int,
                 what: str) -> dict[str, Any]:
  errors = []
  target = params
  for path in prefix:
    target = target[path]
  for name in names:
    if name not in source:
      errors.append(f"{name}: missing from the {what}")
      continue
    for leaf in ("kernel", "bias"):
      full = "/".join(prefix + (name, leaf))
      if leaf not in source[name] or leaf not in target.get(name, {}):
        errors.append(f"{full}: missing")
        continue
      params = _replace(params, prefix + (name, leaf),
                        _fit(full, source[name][leaf], target[name][leaf], width, errors))
  if errors:
    raise WeightsMismatchError(f"cannot initialise from the {what}:\n  " + "\n  ".join(errors))
  return dict(params)


def init_trunk_from_pretrained(params: Mapping[str, Any], pretrained_params: Mapping[str, Any],
                               *, width: int = 1) -> dict[str, Any]:
  """Copies ImageNet (or any VGG-16) conv weights into a baseline or RMA parameter tree.

  The RMA's ``attention/cell/fc6`` (``W_fx``) is also copied from ``fc6`` when the shapes
  match (width 1, S = 7, x_dim = 4096) and left as initialised otherwise (logged).

  Args:
    params: a ``VGG16`` tree (``conv1_1`` … at the top, maybe ``head``) or an ``RMA`` tree
      (``trunk/…``, ``attention/…``), bare or as ``{'params': …}``.
    pretrained_params: ``{'conv1_1': …, 'conv5_3': …, ['fc6', 'fc7']}`` (``load_pretrained``),
      or another VGG16/RMA tree (e.g. a stage-1 baseline).
    width: the model's channel divisor. With width > 1, pretrained kernels wider than the
      model are cut to their leading channels: a cheap stand-in for smoke tests, not a
      faithful network.

  Returns:
    A new tree like ``params`` (inputs are not modified) with the trunk replaced; dtypes and
    jax.Array shardings follow ``params``.

  Raises:
    WeightsMismatchError: naming every missing layer and every shape that does not fit.
  """
  tree, wrapped = _unwrap(params)
  source, _ = _unwrap(pretrained_params)
  source_trunk, _ = _trunk_of(source, "pretrained_params")
  _, prefix = _trunk_of(tree, "params")
  new = _copy_layers(tree, prefix, source_trunk, models.vgg16_layer_names(), width,
                     "pretrained parameters")
  cell = new.get("attention", {}).get("cell", {})
  if "fc6" in cell and "fc6" in source:
    fc6 = source["fc6"]
    if all(np.shape(fc6[k]) == np.shape(cell["fc6"][k]) for k in ("kernel", "bias")):
      new = _copy_layers(new, ("attention", "cell"), source, ["fc6"], 1, "pretrained fc6")
    else:
      logging.warning("W_fx (attention/cell/fc6 %s) keeps its fresh init: pretrained fc6 is %s",
                      np.shape(cell["fc6"]["kernel"]), np.shape(fc6["kernel"]))
  return {"params": new} if wrapped else new


def init_rma_from_baseline(rma_params: Mapping[str, Any], baseline_params: Mapping[str, Any],
                           *, fc6: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Stage 2 of the paper's two-step initialisation (§5.1).

  Args:
    rma_params: a freshly initialised ``RMA`` tree (bare or ``{'params': …}``); its
      attention layers other than fc6 (LSTM, ``W_hz``, ``W_zs``, ``W_zm``) are kept.
    baseline_params: the stage-1 ``VGG16`` tree (its ``head`` is not used), or any tree
      with the trunk convs at the top or under ``trunk``.
    fc6: ``{'kernel': (S*S*C, x_dim), 'bias': (x_dim,)}``, the ImageNet fc6 to initialise
      ``W_fx`` with (e.g. ``load_pretrained(dir)[0]['fc6']``); ``None`` keeps the fresh
      ``W_fx``. Shapes must match exactly.

  Returns:
    A new RMA tree: trunk = stage-1 convs, ``W_fx`` = fc6 when given, the rest unchanged.

  Raises:
    WeightsMismatchError: naming every missing or mismatching tensor.
  """
  tree, wrapped = _unwrap(rma_params)
  if "trunk" not in tree or "attention" not in tree:
    raise ValueError(f"rma_params is not an RMA tree (top-level keys {sorted(tree)})")
  source, _ = _unwrap(baseline_params)
  source_trunk, _ = _trunk_of(source, "baseline_params")
  new = _copy_layers(tree, ("trunk",), source_trunk, models.vgg16_layer_names(), 1,
                     "stage-1 parameters")
  if fc6 is not None:
    new = _copy_layers(new, ("attention", "cell"), {"fc6": fc6}, ["fc6"], 1, "fc6 weights")
  return {"params": new} if wrapped else new


# --------------------------------------------------------------------------------------------
# Command line.


def convert(path: str | os.PathLike, origin: str, out: str | os.PathLike) -> str:
  """Reads a Keras/torchvision VGG-16 file and writes the checkpoint ``out``; returns it."""
  converted = load_weights(path, origin)
  return save_pretrained(out, converted["params"], converted["pixel_convention"],
                         origin=origin, source=os.path.basename(os.fspath(path)))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m rma_jax.pretrained",
      description="Convert ImageNet VGG-16 weights (Keras .h5 or torchvision .pth) to an "
                  "Orbax checkpoint for config.init.pretrained.")
  parser.add_argument("--from", dest="origin", choices=ORIGINS, required=True,
                      help="keras: vgg16_weights_tf_dim_ordering_tf_kernels[_notop].h5; "
                           "torch: torchvision vgg16-397923af.pth")
  parser.add_argument("file", help="the weight file")
  parser.add_argument("--out", required=True, help="checkpoint folder to create")
  args = parser.parse_args(argv)
  try:
    out = convert(args.file, args.origin, args.out)
  except (OSError, ValueError, pickle.UnpicklingError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out} (pixel_convention={PIXEL_CONVENTION[args.origin]}); "
        f"train with --config.init.pretrained={out} "
        f"--config.data.pixel_convention={PIXEL_CONVENTION[args.origin]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
