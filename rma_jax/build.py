"""From a config to the model: ``build_model(config, num_classes)``.

Two tables, each entry a function that reads its ``config.model`` fields by name:
``TRUNKS`` (``model.trunk`` -> the trunk module) and ``HEADS`` (``model.name`` -> the model
on that trunk). A new trunk joins ``TRUNKS`` with one line (docs/architecture.md, "Add a
trunk"). The platform-specific building blocks of ``model.conv_impl`` come from
``rma_jax.kernels``; the models themselves name none.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from rma_jax import kernels, models

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _rows(array: Any) -> tuple[tuple[float, ...], ...]:
  return tuple(map(tuple, array.tolist()))


def vgg16(m: ml_collections.ConfigDict) -> nn.Module:
  """``model.trunk='vgg16'``: the paper's trunk."""
  return models.VGG16(width=m.width, dtype=DTYPES[m.dtype], remat=m.remat,
                      init_scheme=m.get("trunk_init", "he"),
                      block=kernels.vgg_block(m.get("conv_impl", "auto")))


def _resnet(m: ml_collections.ConfigDict, depth: int) -> nn.Module:
  return models.ResNet(depth=depth, output_stride=m.get("resnet_stride", 32), width=m.width,
                       bn=m.get("bn", "frozen"), dtype=DTYPES[m.dtype], remat=m.remat,
                       scan_unroll=m.get("resnet_scan_unroll", True))


def resnet50(m: ml_collections.ConfigDict) -> nn.Module:
  """``model.trunk='resnet50'``: torchvision's ResNet-50 to layer4 (``model.resnet_stride``,
  ``model.bn``); plain Flax on every platform (the CPU kernels are VGG's)."""
  return _resnet(m, 50)


def resnet101(m: ml_collections.ConfigDict) -> nn.Module:
  """``model.trunk='resnet101'``: as ``resnet50``, ResNet-101."""
  return _resnet(m, 101)


def rma(m: ml_collections.ConfigDict, trunk: nn.Module, num_classes: int,
        pixel_convention: str) -> nn.Module:
  """``model.name='rma'``: the paper's model on ``trunk``."""
  k = m.num_regions
  return models.RMA(
      trunk=trunk, num_classes=num_classes, num_regions=k, sample_size=m.sample_size,
      region_pool=m.get("region_pool", "flatten"),
      x_dim=m.x_dim, hidden_dim=m.hidden_dim, z_dim=m.z_dim, standard_lstm=m.standard_lstm,
      theta_bias=tuple(m.theta_bias), theta_kernel_scale=m.theta_kernel_scale,
      fixed_regions=(_rows(models.fixed_region_thetas(k)) if m.fixed_regions == "anchors"
                     else None),
      step_theta_init=(_rows(models.anchor_step_offsets(k, tuple(m.theta_bias)))
                       if m.get("region_init", "") == "anchors" else None),
      dtype=DTYPES[m.dtype], dense=kernels.dense(m.get("conv_impl", "auto")),
      pixel_convention=pixel_convention)


def baseline(m: ml_collections.ConfigDict, trunk: nn.Module, num_classes: int,
             pixel_convention: str) -> nn.Module:
  """``model.name='baseline'``: global pooling and a linear classifier on ``trunk``."""
  return models.Baseline(trunk=trunk, num_classes=num_classes, pool=m.baseline_pool,
                         pixel_convention=pixel_convention)


TRUNKS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {
    "vgg16": vgg16, "resnet50": resnet50, "resnet101": resnet101}
"""``model.trunk`` -> its builder."""

HEADS: dict[str, Callable[..., nn.Module]] = {"rma": rma, "baseline": baseline}
"""``model.name`` -> its builder ``(config.model, trunk, num_classes, pixel_convention)``."""

MODEL_NAMES = tuple(HEADS)


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """The model ``config`` describes, for ``num_classes`` classes (the run's class list)."""
  m = config.model
  trunk = TRUNKS[m.get("trunk", "vgg16")](m)
  return HEADS[m.name](m, trunk, num_classes, config.data.pixel_convention)


def unrolled(model: nn.Module) -> nn.Module:
  """``model`` with its loops written out: the attention's K+1 steps (``RMA.unroll``) and a
  ResNet trunk's scanned blocks (``ResNet.unroll``); the same parameters and numbers. For
  what takes no loop: jax2onnx (``rma_jax.export``), and XLA's cost analysis, which counts a
  loop's body once (``benchmarks.bench``)."""
  if isinstance(model, models.RMA):
    model = model.clone(unroll=True)
  if isinstance(getattr(model, "trunk", None), models.ResNet):
    model = model.clone(trunk=model.trunk.clone(unroll=True))
  return model
