"""Data parallelism: the device mesh, its two shardings, and arrays back to the host.

Every jitted function of the package runs over one ``Mesh`` whose single axis ``data`` spans
every device of every host: batches are sharded along it (``batch_sharding``), parameters and
optimizer state are replicated (``replicated``). XLA inserts the gradient all-reduce because
the loss is a mean over the global batch; nothing here is ``pmap``.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh ``('data',)`` over ``devices`` (default: all devices of all hosts)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimizer state, scalars)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis split over the ``data`` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def to_host(x: Any) -> np.ndarray:
  """One NumPy array on every host.

  Args:
    x: a global ``jax.Array`` (possibly batch-sharded over several hosts), or a per-process
      host array (each process holds its own rows).

  Returns:
    ``x`` itself for a single process or a fully addressable array; otherwise the rows of
    every process, concatenated in process order (``process_allgather(tiled=True)``).
  """
  if jax.process_count() == 1 or (isinstance(x, jax.Array) and x.is_fully_addressable):
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
