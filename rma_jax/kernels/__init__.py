"""Platform-specific building blocks of the models, and the one place that chooses them.

``model.conv_impl`` (a config field) picks them:

* 'xla' — none: the plain model (``models.ConvBlock``, ``nn.Dense``), XLA's convolutions on
  every platform;
* 'auto' (default) — the CPU kernels (``kernels.cpu``) where a function is lowered for the
  CPU, chosen then (``jax.lax.platform_dependent``), never from the host's default backend:
  a function exported or compiled for CUDA or TPU on a CPU host has XLA's convolutions;
* 'patches', 'winograd' — those CPU kernels on every platform (to measure them).

The models name none of this: ``vgg_block`` and ``dense`` are handed to them
(``rma_jax.build``). Evaluation prepares the kernels' parameter forms once per parameter
version (``prepare_fn``) where it runs on the CPU; a train step never passes them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
from jax.sharding import Mesh

from rma_jax import models, parallel
from rma_jax.kernels import cpu
from rma_jax.kernels.cpu import conv as cpu_conv

ModuleDef = Any

IMPLS = cpu_conv.IMPLS
"""Values of ``model.conv_impl``."""

MIN_CALLS = 4
"""Scores calls from which preparing the forms pays for itself (``predict`` prepares from
this many batches on; docs/performance.md)."""


def _check(conv_impl: str) -> None:
  if conv_impl not in IMPLS:
    raise ValueError(f"conv_impl must be one of {IMPLS}, got {conv_impl!r}")


@functools.cache
def vgg_block(conv_impl: str) -> ModuleDef:
  """The ``models.VGG16.block`` for ``conv_impl`` (one object per value: models built twice
  from one config compare equal, and jitted functions keyed on them are reused)."""
  _check(conv_impl)
  if conv_impl == "xla":
    return models.ConvBlock
  return functools.partial(cpu.VGGBlock, impl=conv_impl)


def dense(conv_impl: str) -> ModuleDef:
  """The attention cell's ``dense`` for ``conv_impl``: the CPU one uses the evaluation forms
  where given (an evaluation on the CPU), and is ``nn.Dense`` without them."""
  _check(conv_impl)
  return nn.Dense if conv_impl == "xla" else cpu.Dense


def prepare_fn(conv_impl: str, mesh: Mesh | None = None, *, trunk: str = "vgg16"
               ) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
  """``variables -> variables``, with the evaluation-only forms of their ``params`` added
  where the evaluation runs on the CPU (the platform of ``mesh``'s devices, default JAX's
  devices) and the model has the CPU kernels; elsewhere ``variables`` unchanged. Call it
  once per parameter version and pass the result to every scores call of a pass.

  ``trunk`` (``model.trunk``): only VGG-16's blocks are the CPU kernels'; another trunk
  gets the forms of the attention's dense layers alone.

  The forms are computed by one jitted function (replicated over ``mesh``); the parameters
  are passed through, not copied.
  """
  _check(conv_impl)
  devices = mesh.devices.flat if mesh is not None else jax.devices()
  if conv_impl == "xla" or next(iter(devices)).platform != "cpu":
    return dict
  jit_kwargs = {} if mesh is None else {"out_shardings": parallel.replicated(mesh)}
  jitted = jax.jit(functools.partial(cpu.evaluation_forms, conv_impl=conv_impl,
                                     conv_forms=trunk == "vgg16"), **jit_kwargs)

  def prepare(variables: Mapping[str, Any]) -> dict[str, Any]:
    extra = jitted(variables["params"])
    return dict(variables, **({cpu.COLLECTION: extra} if extra else {}))
  return prepare


def nbytes(variables: Mapping[str, Any]) -> int:
  """Bytes of the evaluation-only forms in ``variables`` (0 if none)."""
  return sum(x.nbytes for x in jax.tree.leaves(variables.get(cpu.COLLECTION, {})))
