"""Evaluation-only forms of the parameters for the CPU kernels, computed once per parameter
version.

An evaluation pass runs the same parameters over every batch of a split. Two forms of them
that the CPU forward wants are not the stored ones, and computing them inside the jitted
scores function would redo the work on every batch (docs/performance.md, "Where the time
goes"):

* ``winograd_kernel`` of each 3x3 convolution that may run Winograd's F(4x4, 3x3)
  (``winograd``): the transformed kernel ``G g G^T``, (36, Cin, Cout), 4x the kernel;
* ``kernel_t`` of each large dense layer (the attention's fc6 and LSTM input): the kernel
  in (out, in) layout, the one XLA:CPU's small-batch matmul runs fastest with
  (``modules.Dense`` uses it from ``modules.DENSE_TRANSPOSED_MIN_ROWS`` rows on).

``evaluation_forms`` mirrors the ``params`` tree; the collection ``COLLECTION`` of a model's
variables holds it, and ``modules.VGGBlock`` and ``modules.Dense`` use it when it is there and are
exactly the same modules without it. It is for evaluation only: a train step must not pass
it, since ``modules.Dense`` would then differentiate the copy, not its kernel.
``rma_jax.kernels.prepare_fn`` prepares it where an evaluation runs on the CPU. Memory and
time: docs/performance.md ("Evaluation-only forms").
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from rma_jax.kernels.cpu import conv, winograd

COLLECTION = "cpu_forms"
"""The Flax variable collection of the evaluation-only forms."""

MIN_TRANSPOSED_KERNEL_SIZE = 2**22
"""Dense kernels of at least this many elements get a (out, in) copy (16 MiB in float32;
smaller matmuls gain nothing measurable)."""


def min_winograd_channels(conv_impl: str) -> int | None:
  """The fewest input channels of a 3x3 convolution that may run a Winograd forward with
  ``conv_impl`` (``evaluation_forms`` transforms the kernels of those): every layer for
  'winograd', ``conv.use_winograd``'s channel rule for 'auto', none (None) otherwise."""
  return {"winograd": 0, "auto": conv.AUTO_WINOGRAD_MIN_CHANNELS}.get(conv_impl)


def _forms_tree(params: Mapping[str, Any], min_channels: int | None) -> dict[str, Any]:
  out = {}
  for name, value in params.items():
    if not isinstance(value, Mapping):
      continue
    kernel = value.get("kernel")
    entry = {} if kernel is None else _entry(kernel, min_channels)
    entry.update(_forms_tree(value, min_channels))
    if entry:
      out[name] = entry
  return out


def _entry(kernel: jax.Array, min_channels: int | None) -> dict[str, jax.Array]:
  if kernel.ndim == 4 and kernel.shape[:2] == (3, 3):
    if min_channels is not None and kernel.shape[2] >= min_channels:
      return {"winograd_kernel": winograd.transform_kernel(kernel)}
    return {}
  if kernel.ndim == 2 and kernel.size >= MIN_TRANSPOSED_KERNEL_SIZE:
    return {"kernel_t": jnp.transpose(kernel)}
  return {}


def evaluation_forms(params: Mapping[str, Any], conv_impl: str = "auto",
                     conv_forms: bool = True) -> dict[str, Any]:
  """The ``COLLECTION`` tree of ``params``: the evaluation-only forms, at the paths of the
  modules that use them (for 'patches', only the dense layers' copies). Jittable.

  Args:
    params: the ``params`` of a model built with the CPU kernels (``rma_jax.kernels``).
    conv_impl: the model's ``conv_impl``.
    conv_forms: whether its 3x3 convolutions are the kernels' (VGG-16's blocks); False
      (a ResNet trunk, plain Flax): the dense layers' copies only.
  """
  return _forms_tree(params, min_winograd_channels(conv_impl) if conv_forms else None)
