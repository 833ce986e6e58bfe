"""From a Keras or torchvision VGG-16 file, or a torchvision ResNet-50/101 file, to this
project's parameters, and the Orbax checkpoint that holds them (``config.init.pretrained``).

* Keras (``--from=keras``): kernels are already HWIO and ``fc1`` flattens the 7x7x512 pool5
  map in (h, w, c) order, like our ``fc6``. Inputs are BGR with the Caffe mean subtracted:
  pixel convention ``'caffe'``.
* torchvision (``--from=torch``): conv weights are OIHW and ``classifier.0`` flattens pool5 in
  (c, h, w) order, so both are permuted. Inputs are RGB / 255 normalised by the ImageNet
  mean/std: convention ``'torch'``. A state dict with ``layer1.*`` entries is a ResNet
  (``resnet50-*.pth`` / ``resnet101-*.pth``, V1 or V2 weights: the same names), its depth
  read from layer3's number of blocks: ``conv1``, ``bn1``, ``layer{1..4}.{i}.{conv,bn}{1,2,3}``
  and ``.downsample.{0,1}`` map to ``models.ResNet``'s names (``layer1_0/conv1`` …,
  ``downsample_conv`` / ``downsample_bn``, blocks 1 … of a layer stacked as
  ``layerL_rest``; batch norm's ``weight``, ``bias``,
  ``running_mean``, ``running_var`` to ``scale``, ``bias``, ``mean``, ``var``), kernels
  OIHW -> HWIO; ``fc`` (the ImageNet classifier) and ``num_batches_tracked`` are dropped.

Missing, extra or wrongly shaped tensors are one error that names them all.
``save_pretrained`` writes ``{conv1_1 ... conv5_3, fc6, fc7}`` (no fc6/fc7 for a ``_notop``
file), or the ResNet's tree, with the pixel convention and the trunk (``model.trunk``) in its
custom metadata; ``load_pretrained`` reads them back.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
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


TRUNK_NAMES = {"vgg16": "VGG-16", "resnet50": "ResNet-50", "resnet101": "ResNet-101"}
"""The trunks a weight file can hold (``model.trunk`` -> its name)."""


class WeightsMismatchError(errors.UserError, ValueError):
  """A weight file's tensors do not match the expected names and shapes of its trunk."""


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

_TORCH_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_IGNORED_SUFFIXES = (".num_batches_tracked",)  # torch's batch-norm step counters


def _torch_resnet_name(path: Sequence[str]) -> str:
  """A path of the unstacked ResNet (``_resnet_rules``) -> torchvision's state dict name:
  ``('layer3_5', 'downsample_bn', 'mean')`` -> ``'layer3.5.downsample.1.running_mean'``."""
  *modules, leaf = path
  names = []
  for m in modules:
    block = re.fullmatch(r"layer(\d)_(\d+)", m)
    names.append(f"layer{block[1]}.{block[2]}" if block else
                 {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(m, m))
  return ".".join(names + ["weight" if leaf == "kernel" else _TORCH_BN[leaf]])


def _resnet_rules(trunk: str) -> list[_Rule]:
  """The rules of torchvision's ResNet-50/101, from ``models.ResNet``'s own tree: one per
  tensor, a ``layerL_rest`` leaf (stacked over blocks 1 …) as ``layerL_1``, ``layerL_2`` …
  (``_stack_rest`` stacks them after)."""
  depth = int(trunk[len("resnet"):])
  shapes = jax.eval_shape(models.ResNet(depth=depth).init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))["params"]
  rules = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    names = tuple(str(k.key) for k in path)
    rest = re.fullmatch(r"(layer\d)_rest", names[0])
    blocks = ([(f"{rest[1]}_{i + 1}",) + names[1:] for i in range(leaf.shape[0])] if rest
              else [names])
    shape = leaf.shape[1:] if rest else leaf.shape
    for block in blocks:
      if block[-1] == "kernel":  # OIHW -> HWIO
        kh, kw, cin, cout = shape
        rules.append((_torch_resnet_name(block), "/".join(block), (cout, cin, kh, kw),
                      lambda a: a.transpose(2, 3, 1, 0)))
      else:
        rules.append((_torch_resnet_name(block), "/".join(block), shape, lambda a: a))
  return rules


def _stack_rest(params: Params) -> Params:
  """``layerL_1``, ``layerL_2`` … (the blocks after a layer's first) stacked on a leading
  axis as ``layerL_rest``, ``models.ResNet``'s scan."""
  out, rest = {}, {}
  for name, tree in params.items():
    block = re.fullmatch(r"(layer\d)_(\d+)", name)
    if block and block[2] != "0":
      rest.setdefault(block[1], {})[int(block[2])] = tree
    else:
      out[name] = tree
  for layer, blocks in rest.items():
    out[f"{layer}_rest"] = jax.tree.map(lambda *a: np.stack(a),
                                        *(blocks[i] for i in sorted(blocks)))
  return out


def trunk_of(weights: Mapping[str, Any], origin: str) -> str:
  """The trunk a weight dict holds (``TRUNK_NAMES``): a torchvision state dict with
  ``layer1.*`` entries is a ResNet, 50 or 101 by layer3's number of blocks (6 or 23);
  anything else is taken for VGG-16 (and checked as one)."""
  if origin != "torch" or not any(k.startswith("layer1.") for k in weights):
    return "vgg16"
  blocks = len({k.split(".")[1] for k in weights if k.startswith("layer3.")})
  depth = {6: 50, 23: 101}.get(blocks)
  if depth is None:
    raise WeightsMismatchError(
        f"these torch weights are a ResNet whose layer3 has {blocks} blocks; expected 6 "
        "(ResNet-50) or 23 (ResNet-101)")
  return f"resnet{depth}"


def _rules(origin: str, trunk: str = "vgg16"
           ) -> tuple[list[_Rule], list[_Rule], tuple[str, ...]]:
  """(conv rules, fc rules, ignored name prefixes) mapping source tensors to flax params.

  A rule is (source name, flax 'layer/…/param', expected source shape, transform).
  """
  if trunk != "vgg16":
    return _resnet_rules(trunk), [], ("fc.",)
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
  """Maps a Keras or torchvision VGG-16 weight dict, or a torchvision ResNet-50/101 state
  dict (``trunk_of``), to this project's parameter names.

  Args:
    weights: source name -> array, as returned by ``load_keras_h5`` (``'block1_conv1/kernel'``,
      ``'fc1/bias'``, …) or ``load_torch_state_dict`` (``'features.0.weight'``, …;
      ``'layer1.0.conv1.weight'``, … for a ResNet). The ImageNet classifier
      (``predictions`` / ``classifier.6`` / ``fc``) is accepted and dropped; VGG's fc6 and
      fc7 are optional together (``_notop`` files have neither).
    origin: ``'keras'`` or ``'torch'``.

  Returns:
    ``{'params': {'conv1_1': {'kernel': (3, 3, 3, 64), 'bias': (64,)}, …, 'conv5_3': …,
    'fc6': {'kernel': (25088, 4096), 'bias'}, 'fc7': {'kernel': (4096, 4096), 'bias'}},
    'pixel_convention': 'caffe' | 'torch', 'trunk': 'vgg16'}`` with float32 NumPy arrays;
    fc6's input is pool5 flattened in (h, w, c) order. A ResNet: ``models.ResNet``'s tree
    and ``'trunk': 'resnet50' | 'resnet101'``.

  Raises:
    WeightsMismatchError: naming every missing, unexpected and wrongly shaped tensor.
  """
  trunk = trunk_of(weights, origin)
  conv, fc, ignored = _rules(origin, trunk)
  has_fc = any(src in weights for src, *_ in fc)
  rules = conv + (fc if has_fc else [])
  known = {src for src, *_ in conv + fc}
  missing = [src for src, *_ in rules if src not in weights]
  extra = sorted(k for k in weights if k not in known and not k.startswith(ignored)
                 and not k.endswith(_IGNORED_SUFFIXES))
  wrong = [f"{src} {tuple(np.shape(weights[src]))} (expected {shape})"
           for src, _, shape, _ in rules
           if src in weights and tuple(np.shape(weights[src])) != shape]
  if missing or extra or wrong:
    lines = [f"these {origin} weights are not {TRUNK_NAMES[trunk]}'s:"]
    if missing:
      lines.append("  missing: " + ", ".join(missing))
    if extra:
      lines.append("  unexpected: " + ", ".join(extra))
    if wrong:
      lines.append("  wrong shape: " + ", ".join(wrong))
    raise WeightsMismatchError("\n".join(lines))
  params: Params = {}
  for src, dst, _, transform in rules:
    *modules, name = dst.split("/")
    value = transform(np.asarray(weights[src], dtype=np.float32))
    node = params
    for m in modules:
      node = node.setdefault(m, {})
    node[name] = np.ascontiguousarray(value)
  if trunk != "vgg16":
    params = _stack_rest(params)
  return {"params": params, "pixel_convention": PIXEL_CONVENTION[origin], "trunk": trunk}



def load_weights(path: str | os.PathLike, origin: str) -> dict[str, Any]:
  """Reads a Keras or torchvision weight file: ``to_flax(read(path), origin)``."""
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


def load_pretrained(path: str | os.PathLike, *, pixel_convention: str | None = None,
                    trunk: str | None = None) -> tuple[Params, str]:
  """Reads a checkpoint written by ``python -m rma_jax.pretrained`` / ``save_pretrained``.

  Args:
    path: the checkpoint folder.
    pixel_convention: if given, the convention the caller preprocesses with; a different
      recorded one is an error (the weights would silently see wrongly normalised pixels).
    trunk: if given, the ``model.trunk`` the caller initialises; weights of another trunk
      are an error (a checkpoint that records none holds VGG-16).

  Returns:
    (params, pixel_convention): ``{'conv1_1': {'kernel', 'bias'}, …, 'fc6', 'fc7'}`` as
    float32 NumPy arrays (no fc6/fc7 from a ``_notop`` file), and the recorded convention.
  """
  path = paths.absolute(path)  # a gs:// checkpoint is read from the bucket
  with ocp.StandardCheckpointer() as checkpointer:
    custom = checkpointer.metadata(path).custom_metadata or {}
    recorded = custom.get("pixel_convention")
    params = checkpointer.restore(path)
  if not recorded:
    raise ValueError(f"{path} records no pixel_convention; re-create it with "
                     "python -m rma_jax.pretrained")
  if pixel_convention is not None and pixel_convention != recorded:
    raise ValueError(f"{path} needs pixel_convention={recorded!r}, got {pixel_convention!r}")
  held = custom.get("trunk", "vgg16")  # checkpoints from before the ResNets are VGG-16
  if trunk is not None and trunk != held:
    raise WeightsMismatchError(
        f"{path} holds {TRUNK_NAMES.get(held, held)} weights, not model.trunk={trunk!r}'s: "
        f"set model.trunk={held!r}, or init.pretrained to a conversion of "
        f"{TRUNK_NAMES.get(trunk, trunk)} weights")
  return jax.tree.map(np.asarray, params), recorded


def convert(path: str | os.PathLike, origin: str, out: str | os.PathLike) -> str:
  """Reads a Keras/torchvision weight file and writes the checkpoint ``out``; returns it."""
  converted = load_weights(path, origin)
  return save_pretrained(out, converted["params"], converted["pixel_convention"],
                         origin=origin, source=os.path.basename(os.fspath(path)),
                         trunk=converted["trunk"])
