"""Reading a Keras VGG-16 weight file (``.h5``, ``.weights.h5``, ``.keras``) with h5py.

The layout is Keras's own (``block1_conv1/kernel`` ... ``fc1``, ``fc2``, ``predictions``);
``rma_jax.weights.convert.to_flax`` maps it to this project's names.
"""

from __future__ import annotations

import io
import os
import zipfile
from typing import Any, Sequence

import numpy as np

from rma_jax.weights import files


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
  import h5py  # pylint: disable=g-import-not-at-top  # optional: in the `test` extra only
  path = os.fspath(path)
  expected = "expected a Keras weight file (.h5, .weights.h5 or a .keras archive)"
  files.check_weight_file(path, expected)
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
    hint = "; it is a torch.save file: use --from=torch" if files.is_torch_file(path) else ""
    raise ValueError(f"{path}: cannot be read as a Keras weight file "
                     f"({files.one_line(e)}){hint}; {expected}") from None

