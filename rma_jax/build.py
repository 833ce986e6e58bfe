"""From a config to the model: ``build_model`` (``config.model`` -> ``RMA`` or ``VGG16``).

The module's own fields are the list of settings: every field of ``models.RMA`` (or of
``models.VGG16`` for the baseline) is read from the ``config.model`` field of the same name
(``_CONFIG_KEYS`` names the few that differ), and ``_FROM_CONFIG`` turns the few config
values that are names (a dtype, ``'anchors'``) into what the module takes. A field missing
from an older config keeps the module's default.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from rma_jax import models
from rma_jax.data import classes as data_classes

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MODEL_NAMES = ("rma", "baseline")
NUM_CLASSES = {name: len(names) for name, names in data_classes.BUILTIN_CLASSES.items()}
"""The number of classes of the data sets with a fixed class list (``data.name``)."""

# Module field -> the config.model key it is read from, where the names differ.
_CONFIG_KEYS = {
    models.VGG16: {"head_pool": "baseline_pool", "init_scheme": "trunk_init"},
    models.RMA: {"step_theta_init": "region_init"},
}


def _rows(array: Any) -> tuple[tuple[float, ...], ...]:
  return tuple(map(tuple, array.tolist()))


# Module field -> value from (the config value, config.model).
_FROM_CONFIG: dict[str, Callable[[Any, ml_collections.ConfigDict], Any]] = {
    "dtype": lambda value, m: DTYPES[value],
    "fixed_regions": lambda value, m: (
        _rows(models.fixed_region_thetas(m.num_regions)) if value == "anchors" else None),
    "step_theta_init": lambda value, m: (
        _rows(models.anchor_step_offsets(m.num_regions, tuple(m.theta_bias)))
        if value == "anchors" else None),
}


def build_model(config: ml_collections.ConfigDict, num_classes: int | None = None) -> nn.Module:
  """The module named by ``config.model.name``: ``RMA`` or the ``VGG16`` baseline.

  Args:
    config: a run config (``configs/default.py``).
    num_classes: C; default the fixed class count of ``config.data.name`` (a run on its
      own classes has them in ``WORKDIR/classes.json``).
  """
  m = config.model
  if num_classes is None:
    if config.data.name not in NUM_CLASSES:
      raise ValueError(f"data.name={config.data.name!r} has no fixed class list: pass "
                       "num_classes (a run's classes are in WORKDIR/classes.json)")
    num_classes = NUM_CLASSES[config.data.name]
  cls = models.VGG16 if m.name == "baseline" else models.RMA
  keys = _CONFIG_KEYS[cls]
  kwargs = {}
  for field in dataclasses.fields(cls):
    key = keys.get(field.name, field.name)
    if not field.init or field.name in ("parent", "name", "num_classes") or key not in m:
      continue
    value = m[key]
    if field.name in _FROM_CONFIG:
      value = _FROM_CONFIG[field.name](value, m)
    elif isinstance(value, (list, tuple)):
      value = tuple(value)
    kwargs[field.name] = value
  return cls(num_classes=num_classes, **kwargs)
