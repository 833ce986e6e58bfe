"""The CPU kernels as the models' building blocks: a VGG block and a dense layer.

``VGGBlock`` takes the attributes of ``models.ConvBlock`` and creates the same parameters; it
computes the block with ``conv.conv3x3`` (and ``conv.conv3x3_pair`` for a block whose first
two convolutions fuse, VGG's conv1_1 -> conv1_2), ReLU and the max pool inside the kernels.
With ``impl='auto'`` the kernels are taken where the function is lowered for the CPU and
XLA's convolutions everywhere else (``jax.lax.platform_dependent``): a GPU or TPU lowering
made on a CPU host has XLA's convolutions. ``Dense`` is ``nn.Dense`` that multiplies by the
evaluation-only (out, in) copy of its kernel where one is given.

The kernels choose by shape (the batch size among it), so an input with a symbolic dimension
(``jax.export`` with a symbolic batch) gets XLA's convolutions and ``nn.Dense`` on every
platform: the blocks are then exactly the plain model's.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rma_jax.kernels.cpu import conv
from rma_jax.kernels.cpu.forms import COLLECTION

Dtype = Any

DENSE_TRANSPOSED_MIN_ROWS = 4
"""From this many rows on, ``Dense`` multiplies by its kernel's (out, in) copy, where given;
below, the stored layout is the faster one on XLA:CPU (docs/performance.md)."""


class _ConvParams(nn.Module):
  """The parameters of one 3x3 convolution, as ``nn.Conv`` creates them, promoted to
  ``dtype``, and its precomputed Winograd kernel from the forms, if given."""
  features: int
  kernel_init: Callable[..., jax.Array]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, in_channels: int) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    kernel = self.param("kernel", self.kernel_init, (3, 3, in_channels, self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    kernel, bias = nn.dtypes.promote_dtype(kernel, bias, dtype=self.dtype)
    winograd_kernel = (self.get_variable(COLLECTION, "winograd_kernel")
                       if self.has_variable(COLLECTION, "winograd_kernel") else None)
    return kernel, bias, winograd_kernel


def is_static(shape: Sequence[Any]) -> bool:
  """Whether every dimension of ``shape`` is a number (not a ``jax.export`` symbol)."""
  return all(isinstance(d, (int, np.integer)) for d in shape)


def _block_on_cpu(x: jax.Array, params: Sequence[tuple], impl: str, pool: bool) -> jax.Array:
  """The block by the CPU kernels: convolutions, each with ReLU, the last one pooling."""
  last = len(params) - 1
  first = 0
  if last >= 1:
    (k1, b1, _), (k2, b2, u2) = params[:2]
    if conv.use_fused_pair(x.shape, k1.shape[-1], k2.shape[-1], x.dtype, impl):
      x = conv.conv3x3_pair(x, k1, b1, k2, b2, impl=impl, activation=nn.relu,
                            winograd_kernel=u2, pool=pool and last == 1)
      first = 2
  for i in range(first, last + 1):
    kernel, bias, winograd_kernel = params[i]
    x = conv.conv3x3(x, kernel, bias, impl=impl, activation=nn.relu,
                     winograd_kernel=winograd_kernel, pool=pool and i == last)
  return x


def _block_elsewhere(x: jax.Array, params: Sequence[tuple], pool: bool) -> jax.Array:
  """The block by XLA's convolutions, as ``models.ConvBlock`` computes it."""
  for kernel, bias, _ in params:
    x = nn.relu(conv.conv3x3(x, kernel, bias, impl="xla"))
  return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2)) if pool else x


class VGGBlock(nn.Module):
  """``models.ConvBlock`` computed by the CPU kernels (same attributes and parameters).

  Attributes:
    features, names, kernel_inits, pool, dtype: as ``models.ConvBlock``.
    impl: 'auto' (the kernels' per-shape rules where lowered for the CPU, XLA's
      convolutions elsewhere), 'patches' or 'winograd' (those kernels on every platform;
      ``conv.conv3x3``).
  """
  features: Sequence[int]
  names: Sequence[str]
  kernel_inits: Sequence[Callable[..., jax.Array]]
  pool: bool = False
  dtype: Dtype = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H, W, features[-1]), or (B, H/2, W/2, features[-1]) with pool."""
    x = jnp.asarray(x, self.dtype)
    params, in_channels = [], x.shape[-1]
    for features, name, init in zip(self.features, self.names, self.kernel_inits):
      params.append(_ConvParams(features, init, self.dtype, name=name)(in_channels))
      in_channels = features
    if not is_static(x.shape):
      return _block_elsewhere(x, params, self.pool)
    if self.impl != "auto":
      return _block_on_cpu(x, params, self.impl, self.pool)
    return jax.lax.platform_dependent(
        x, params, cpu=lambda x_, p: _block_on_cpu(x_, p, "auto", self.pool),
        default=lambda x_, p: _block_elsewhere(x_, p, self.pool))


class Dense(nn.Dense):
  """``nn.Dense`` (same parameters, initialisers and numerics) that multiplies by the
  evaluation copy of its kernel in (features, in) layout, ``kernel_t`` of the forms
  (``forms.COLLECTION``), where one is given and the input has at least
  ``DENSE_TRANSPOSED_MIN_ROWS`` rows: the same product, in the layout XLA:CPU's small-batch
  matmul runs fastest with."""

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """(..., in) -> (..., features)."""
    if (not is_static(inputs.shape) or not self.has_variable(COLLECTION, "kernel_t")
        or int(np.prod(inputs.shape[:-1])) < DENSE_TRANSPOSED_MIN_ROWS):
      return super().__call__(inputs)
    kernel_t = self.get_variable(COLLECTION, "kernel_t")
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel_t, bias = self.promote_dtype(inputs, kernel_t, bias, dtype=self.dtype)
    y = jax.lax.dot_general(inputs, kernel_t, (((inputs.ndim - 1,), (1,)), ((), ())),
                            precision=self.precision)
    return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
