"""ResNet-50 and ResNet-101 trunks in torchvision's layout (docs/design.md §7).

``ResNet(depth=101)(images)`` is the layer4 map: stride 32 (or 16 with ``output_stride=16``,
layer4 dilated as torchvision's ``replace_stride_with_dilation=[False, False, True]``),
2048 / width channels. The bottleneck is torchvision's v1.5: the stride sits on its 3x3
convolution. Parameter tree (``width`` divides every channel count; 1 is the real network):
``conv1`` and ``bn1`` (the stem), then per layer L ``layerL_0``, its first block (``conv1 …
conv3``, ``bn1 … bn3``, ``downsample_conv`` and ``downsample_bn``: torchvision's
``layerL.0``, its ``downsample.0`` / ``.1``), and ``layerL_rest``, the layer's other blocks
(torchvision's ``layerL.1`` …), which have one shape: one ``nn.scan`` over them, their
parameters stacked on a leading axis (ResNet-101's layer3: 22). One compiled block body per
layer instead of one per block: ResNet-101's train step compiles 3.5x faster (tiny, on a CPU)
and its 520 parameter arrays are 145 (checkpoints, the optimizer). Convolutions have a
``kernel`` (HWIO) and no bias. ``unroll=True`` runs the same parameters block by block, for
converters that take no scan (ONNX).

Batch norm keeps its running statistics among the parameters (``BatchNorm``: ``scale``,
``bias``, ``mean``, ``var``; the statistics never receive a gradient), so that checkpoints,
the moving average, the two-step initialisation, ``load_run`` and the export carry them with
no collection of their own. ``bn='frozen'`` fixes all four (detection codebases' choice for
small per-device batches); ``bn='finetune'`` trains ``scale`` and ``bias``, normalises a
training batch by its own statistics and writes their running averages to the ``BN_STATS``
collection, which ``steps.train_step`` asks for and copies into the parameters
(``merge_batch_stats``).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

from rma_jax.models.vgg import HE_INIT, relu

Dtype = Any

RESNET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
"""Bottleneck blocks of layer1 … layer4 by depth (torchvision's ``resnet50`` / ``resnet101``)."""

BN_MODES = ("frozen", "finetune")
OUTPUT_STRIDES = (16, 32)
EXPANSION = 4
"""A bottleneck's output has 4x the channels of its 3x3 convolution (``planes``)."""

BN_STATS = "bn_stats"
"""The variable collection in which fine-tuned batch norm puts the running averages of a
training batch (``steps.train_step`` applies the model with it mutable)."""
BN_MOMENTUM = 0.1
BN_EPSILON = 1e-5
"""torchvision's ``nn.BatchNorm2d`` defaults (running = (1 - m) running + m batch)."""

BN_STAT_NAMES = ("mean", "var")


class BatchNorm(nn.Module):
  """Batch norm with its running statistics as parameters: ``scale``, ``bias``, ``mean``,
  ``var`` (torchvision's ``weight``, ``bias``, ``running_mean``, ``running_var``).

  ``mean`` and ``var`` never receive a gradient (``stop_gradient``); with ``mode='frozen'``
  neither do ``scale`` and ``bias``. With ``mode='finetune'``, where the model is applied
  with the ``BN_STATS`` collection mutable (a training step), a batch is normalised by its
  own statistics (over every image of the global batch: under a mesh the mean is an
  all-reduce) and their running averages (torch's: momentum 0.1, the unbiased variance) go
  to ``BN_STATS`` at this module's path; otherwise it normalises by ``mean`` and ``var``.

  Attributes:
    mode: 'frozen' or 'finetune'.
    dtype: the output dtype; the normalisation is computed in float32 (float64 for float64).
  """
  mode: str = "frozen"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(..., C) -> (..., C) in ``dtype``."""
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    mean = jax.lax.stop_gradient(self.param("mean", nn.initializers.zeros, (c,), jnp.float32))
    var = jax.lax.stop_gradient(self.param("var", nn.initializers.ones, (c,), jnp.float32))
    compute = jnp.promote_types(self.dtype, jnp.float32)
    x = x.astype(compute)
    if self.mode == "frozen":
      scale, bias = jax.lax.stop_gradient(scale), jax.lax.stop_gradient(bias)
    elif self.is_mutable_collection(BN_STATS) and not self.is_initializing():
      axes = tuple(range(x.ndim - 1))
      batch_mean = jnp.mean(x, axis=axes)
      batch_var = jnp.mean(jnp.square(x - batch_mean), axis=axes)
      n = x.size // c
      for name, old, new in (("mean", mean, batch_mean),
                             ("var", var, batch_var * (n / max(n - 1, 1)))):
        self.put_variable(BN_STATS, name, ((1 - BN_MOMENTUM) * old + BN_MOMENTUM *
                                           jax.lax.stop_gradient(new)).astype(jnp.float32))
      mean, var = batch_mean, batch_var
    # One per-channel affine map: x * a + b.
    a = scale.astype(compute) * jax.lax.rsqrt(var.astype(compute) + BN_EPSILON)
    return (x * a + (bias.astype(compute) - mean.astype(compute) * a)).astype(self.dtype)


def merge_batch_stats(params: Mapping[str, Any], stats: Mapping[str, Any]) -> Any:
  """``params`` with each ``mean`` / ``var`` that ``stats`` (a ``BN_STATS`` collection, at
  the same paths) holds replaced by it: the running averages of fine-tuned batch norm after
  a training step. ``params`` itself for empty ``stats`` (every other model)."""
  if not stats:
    return params
  flat = traverse_util.flatten_dict(dict(params))
  for path, value in traverse_util.flatten_dict(dict(stats)).items():
    if path not in flat:
      raise KeyError(f"batch statistics {'/'.join(path)} have no parameter to go to")
    flat[path] = value.astype(flat[path].dtype)
  return traverse_util.unflatten_dict(flat)


def is_batch_stat(path: Any) -> bool:
  """Whether a parameter (its ``jax.tree_util`` key path, or a tuple of names) is a batch
  norm running statistic (counted apart from the parameters: they are not trained)."""
  last = path[-1]
  return str(getattr(last, "key", last)) in BN_STAT_NAMES


class Bottleneck(nn.Module):
  """torchvision's ``Bottleneck`` (v1.5): 1x1, 3x3 (stride, dilation), 1x1 convolutions with
  batch norm, ReLU, and the shortcut (a strided 1x1 convolution and batch norm where the
  shape changes).

  Attributes:
    planes: the 3x3 convolution's channels (the output has ``EXPANSION`` x as many).
    strides: the 3x3 convolution's (and the shortcut's) stride.
    dilation: the 3x3 convolution's dilation (and padding).
    downsample: the shortcut is a convolution (the first block of a layer).
    bn: ``BatchNorm.mode``.
    dtype: computation dtype; parameters float32.
  """
  planes: int
  strides: int = 1
  dilation: int = 1
  downsample: bool = False
  bn: str = "frozen"
  dtype: Dtype = jnp.float32
  scanned: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, unused: Any = None) -> Any:
    """(B, H, W, C) -> (B, H / strides, W / strides, 4 planes); with ``scanned``, that and
    None (the ``(carry, output)`` of a step of ``nn.scan``)."""
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32, kernel_init=HE_INIT)
    norm = functools.partial(BatchNorm, mode=self.bn, dtype=self.dtype)
    y = relu(norm(name="bn1")(conv(self.planes, (1, 1), name="conv1")(x)))
    y = relu(norm(name="bn2")(conv(self.planes, (3, 3), strides=self.strides,
                                   padding=self.dilation, kernel_dilation=self.dilation,
                                   name="conv2")(y)))
    y = norm(name="bn3")(conv(self.planes * EXPANSION, (1, 1), name="conv3")(y))
    if self.downsample:
      x = norm(name="downsample_bn")(conv(self.planes * EXPANSION, (1, 1),
                                          strides=self.strides, name="downsample_conv")(x))
    y = relu(y + x)
    return (y, None) if self.scanned else y


class _Unrolled(nn.Module):
  """The blocks a ``layerL_rest`` scan holds, one after the other (``ResNet.unroll``); its
  parameters come unstacked (``_unstack``) under ``block{i}``."""
  count: int
  block: dict[str, Any]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.count):
      x = Bottleneck(**self.block, name=f"block{i}")(x)
    return x


def _unstack(count: int, variables: Mapping[str, Any]) -> dict[str, Any]:
  """A scan's stacked variables -> ``{'block0': the first block's, …}``."""
  return {name: {f"block{i}": jax.tree.map(lambda a, i=i: a[i], tree) for i in range(count)}
          for name, tree in variables.items()}


class ResNet(nn.Module):
  """torchvision's ResNet-50 / ResNet-101 up to layer4 (no pooling, no fc): a trunk.

  ``trunk(images)`` is the feature map the heads (``models.RMA``, ``models.Baseline``) work
  on; ``stride`` and ``channels`` describe it.

  Attributes:
    depth: 50 or 101.
    output_stride: 32 (layer4 as torchvision) or 16 (layer4 dilated: its stride 2 replaced by
      dilation 2 in its blocks after the first, as torchvision's
      ``replace_stride_with_dilation=[False, False, True]``; the same parameters).
    width: divisor of every channel count (1 = the real network; 64 % width == 0).
    bn: batch norm, 'frozen' or 'finetune' (``BatchNorm``).
    dtype: computation dtype (parameters stay float32), e.g. ``jnp.bfloat16``.
    remat: recompute each bottleneck's activations in the backward pass to save memory.
    unroll: run each ``layerL_rest`` block by block instead of ``nn.scan``: the same
      parameters and numbers, for converters that take no scan (jax2onnx; ``rma_jax.export``).
      Applies trained parameters only (it cannot initialise them).
    scan_unroll: compile each ``layerL_rest`` scan's loop written out (``nn.scan``'s
      ``unroll``): the same parameters and numbers; XLA:CPU computes the gradient through
      the rolled loop about 10x slower (docs/performance.md), at about twice the compile time
      unrolled.
  """
  depth: int = 50
  output_stride: int = 32
  width: int = 1
  bn: str = "frozen"
  dtype: Dtype = jnp.float32
  remat: bool = False
  unroll: bool = False
  scan_unroll: bool = True

  @property
  def stride(self) -> int:
    """Input pixels per cell of the feature map (``output_stride``)."""
    return self.output_stride

  @property
  def channels(self) -> int:
    """Channels of the feature map (layer4's output)."""
    return 512 * EXPANSION // self.width

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) normalised images (H, W multiples of ``stride``) -> (B, H / stride,
    W / stride, 2048 / width) layer4 map in ``dtype``."""
    if self.depth not in RESNET_DEPTHS:
      raise ValueError(f"depth must be one of {sorted(RESNET_DEPTHS)}, got {self.depth}")
    if self.output_stride not in OUTPUT_STRIDES:
      raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got "
                       f"{self.output_stride}")
    if self.bn not in BN_MODES:
      raise ValueError(f"bn must be one of {BN_MODES}, got {self.bn!r}")
    if self.width < 1 or 64 % self.width:
      raise ValueError(f"width must divide 64, got {self.width}")
    x = nn.Conv(64 // self.width, (7, 7), strides=2, padding=3, use_bias=False,
                dtype=self.dtype, param_dtype=jnp.float32, kernel_init=HE_INIT,
                name="conv1")(images.astype(self.dtype))
    x = relu(BatchNorm(mode=self.bn, dtype=self.dtype, name="bn1")(x))
    # torchvision's MaxPool2d(3, 2, padding=1), the padding written out (jax2onnx's max_pool
    # drops a pool's padding): zeros, which after the ReLU are as -inf (every value >= 0).
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2))
    block = nn.remat(Bottleneck) if self.remat else Bottleneck
    dilation = 1
    for layer, blocks in enumerate(RESNET_DEPTHS[self.depth]):
      strides = 1 if layer == 0 else 2
      first_dilation = dilation
      if layer == 3 and self.output_stride == 16:
        dilation, strides = dilation * strides, 1  # torchvision's _make_layer(dilate=True)
      common = dict(planes=64 * 2**layer // self.width, bn=self.bn, dtype=self.dtype)
      x = block(strides=strides, dilation=first_dilation, downsample=True, **common,
                name=f"layer{layer + 1}_0")(x)
      rest, name = blocks - 1, f"layer{layer + 1}_rest"
      if self.unroll:
        x = nn.map_variables(_Unrolled, True, trans_in_fn=functools.partial(_unstack, rest))(
            rest, dict(dilation=dilation, **common), name=name)(x)
      else:
        scan = nn.scan(block, variable_axes={"params": 0, BN_STATS: 0},
                       split_rngs={"params": True}, length=rest,
                       unroll=rest if self.scan_unroll else 1)
        x, _ = scan(dilation=dilation, scanned=True, **common, name=name)(x, None)
    return x
