"""Evaluation-only forms of the parameters, computed once per parameter version.

An evaluation pass runs the same parameters over every batch of a split. Two forms of them
that the CPU forward wants are not the stored ones, and computing them inside the jitted
scores function would redo the work on every batch (docs/performance.md, "Where the time
goes"):

* ``winograd_kernel`` of each 3x3 convolution that may run Winograd's F(4x4, 3x3)
  (``rma_jax.winograd``): the transformed kernel ``G g G^T``, (36, Cin, Cout), 4x the
  kernel; about 10 % of a ten-view call when transformed per call;
* ``kernel_t`` of each large dense layer (the attention's fc6 and LSTM input): the kernel
  in (out, in) layout, with which XLA:CPU's small-batch matmul runs 1.5-2x faster than
  with the (in, out) one from 4 rows on (20 rows by fc6's 25088 x 4096 kernel, the ten-view
  batch of two images: 82 vs 145 ms a step, K + 1 steps a call); ``models.Dense`` uses it
  from ``models.DENSE_TRANSPOSED_MIN_ROWS`` rows on.

``prepare`` returns ``variables`` plus these, in the ``COLLECTION`` collection, mirroring the
``params`` tree; ``conv.Conv3x3`` and ``models.Dense`` use them when they are present and are
exactly the same modules without them. They are for evaluation only: a train step never
passes them (``steps.train_step``), and must not, since ``models.Dense`` would then
differentiate the copy, not its kernel. On GPU/TPU ``forms`` is empty (cuDNN and cuBLAS
choose their own algorithms and layouts).

The extra memory, for the full-size RMA model in float32: 648 MiB (fc6's copy 392, the
LSTM input's 32, the Winograd kernels 224: 4x the 3x3 kernels of >= 64 input channels);
``nbytes`` tells. Preparing takes ~0.7 s on 2 CPU cores, compile included.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from rma_jax import conv, winograd

COLLECTION = conv.INFERENCE_COLLECTION
"""The Flax variable collection of the evaluation-only forms."""

MIN_CALLS = 4
"""Scores calls from which ``prepare`` pays for itself (``predict`` prepares from this many
batches on): it takes ~0.7 s for the full-size model on 2 CPU cores, including its compile,
and saves 0.2-0.6 s a batch of two (docs/performance.md)."""

MIN_TRANSPOSED_KERNEL_SIZE = 2**22
"""Dense kernels of at least this many elements get a (out, in) copy (16 MiB in float32;
smaller matmuls gain nothing measurable)."""


def min_winograd_channels(conv_impl: str) -> int | None:
  """The fewest input channels of a 3x3 convolution that may run a Winograd forward in a
  model with ``conv_impl`` on the CPU (``prepare`` transforms the kernels of those): every
  layer for 'winograd', ``conv.use_winograd``'s channel rule for 'auto', none (None) for
  'xla' and 'patches'."""
  return {"winograd": 0, "auto": conv.AUTO_WINOGRAD_MIN_CHANNELS}.get(conv_impl)


def _prepare_tree(params: Mapping[str, Any], min_channels: int | None) -> dict[str, Any]:
  out = {}
  for name, value in params.items():
    if not isinstance(value, Mapping):
      continue
    kernel = value.get("kernel")
    entry = {} if kernel is None else _entry(kernel, min_channels)
    entry.update(_prepare_tree(value, min_channels))
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


def forms(params: Mapping[str, Any], conv_impl: str = "auto") -> dict[str, Any]:
  """The ``COLLECTION`` tree of ``params``: the evaluation-only forms, at the paths of the
  modules that use them. Jittable. Empty on GPU/TPU; for a model whose ``conv_impl`` never
  runs Winograd on CPU ('xla', 'patches'), only the dense layers' copies.

  Args:
    params: the ``params`` of ``models.RMA`` or ``models.VGG16``.
    conv_impl: the model's ``conv_impl``.
  """
  if jax.default_backend() != "cpu":
    return {}
  return _prepare_tree(params, min_winograd_channels(conv_impl))


def _with_forms(variables: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
  return dict(variables, **({COLLECTION: extra} if extra else {}))


def prepare(variables: Mapping[str, Any], conv_impl: str = "auto") -> dict[str, Any]:
  """``variables`` (``{'params': ...}``) plus ``COLLECTION``: ``forms`` of its params, if
  any. Call it once per parameter version (``prepare_fn``) and pass the result to every
  scores call of the pass."""
  return _with_forms(variables, forms(variables["params"], conv_impl))


def forms_fn(conv_impl: str = "auto", **jit_kwargs) -> Callable[[Mapping[str, Any]], dict]:
  """``forms`` jitted for one ``conv_impl`` (``jit_kwargs``: e.g. ``out_shardings``)."""
  return jax.jit(functools.partial(forms, conv_impl=conv_impl), **jit_kwargs)


def prepare_fn(conv_impl: str = "auto", **jit_kwargs) -> Callable[[Mapping[str, Any]], dict]:
  """``prepare`` with ``forms`` jitted (``forms_fn``); the parameters themselves are passed
  through, not copied."""
  jitted = forms_fn(conv_impl, **jit_kwargs)
  return lambda variables: _with_forms(variables, jitted(variables["params"]))


def nbytes(variables: Mapping[str, Any]) -> int:
  """Bytes of the ``COLLECTION`` arrays in ``variables`` (0 if none)."""
  return sum(x.nbytes for x in jax.tree_util.tree_leaves(variables.get(COLLECTION, {})))
