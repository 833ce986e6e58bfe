"""From a Keras or torchvision VGG-16 file to this project's parameters, and the Orbax
checkpoint that holds them (``config.init.pretrained``).

* Keras (``--from=keras``): kernels are already HWIO and ``fc1`` flattens the 7x7x512 pool5
  map in (h, w, c) order, like our ``fc6``. Inputs are BGR with the Caffe mean subtracted:
  pixel convention ``'caffe'``.
* torchvision (``--from=torch``): conv weights are OIHW and ``classifier.0`` flattens pool5 in
  (c, h, w) order, so both are permuted. Inputs are RGB / 255 normalised by the ImageNet
  mean/std: convention ``'torch'``.

Missing, extra or wrongly shaped tensors are one error that names them all.
``save_pretrained`` writes ``{conv1_1 ... conv5_3, fc6, fc7}`` (no fc6/fc7 for a ``_notop``
file) with the pixel convention in its custom metadata; ``load_pretrained`` reads both back.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from rma_jax import errors, models, paths
from rma_jax.weights import keras_h5, torch_pth

Params = dict[str, Any]

ORIGINS = ("keras", "torch")
PIXEL_CONVENTION = {"keras": "caffe", "torch": "torch"}
"""Pixel preprocessing each weight origin was trained with (docs/design.md §3)."""

FC6_INPUT_SHAPE = (7, 7, 512)
"""pool5 of VGG-16 on a 224x224 image, the input of fc6 (flattened (h, w, c) here)."""

TORCH_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
"""Positions of conv1_1 … conv5_3 in torchvision's ``vgg16().features`` (ReLU/pool between)."""


class WeightsMismatchError(errors.UserError, ValueError):
  """A weight file's tensors do not match the expected VGG-16 names and shapes."""


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



def load_weights(path: str | os.PathLike, origin: str) -> dict[str, Any]:
  """Reads a Keras or torchvision VGG-16 file: ``to_flax(read(path), origin)``."""
  if origin == "keras":
    return to_flax(keras_h5.load_keras_h5(path), origin)
  if origin == "torch":
    return to_flax(torch_pth.load_torch_state_dict(path), origin)
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
  path = paths.absolute(path)  # a gs:// checkpoint is read from the bucket
  with ocp.StandardCheckpointer() as checkpointer:
    recorded = (checkpointer.metadata(path).custom_metadata or {}).get("pixel_convention")
    params = checkpointer.restore(path)
  if not recorded:
    raise ValueError(f"{path} records no pixel_convention; re-create it with "
                     "python -m rma_jax.pretrained")
  if pixel_convention is not None and pixel_convention != recorded:
    raise ValueError(f"{path} needs pixel_convention={recorded!r}, got {pixel_convention!r}")
  return jax.tree.map(np.asarray, params), recorded


def convert(path: str | os.PathLike, origin: str, out: str | os.PathLike) -> str:
  """Reads a Keras/torchvision VGG-16 file and writes the checkpoint ``out``; returns it."""
  converted = load_weights(path, origin)
  return save_pretrained(out, converted["params"], converted["pixel_convention"],
                         origin=origin, source=os.path.basename(os.fspath(path)))
