"""Orbax checkpoints of a run: the latest (for resuming) and the best by validation loss.

Layout of a workdir::

    WORKDIR/checkpoints/latest/<step>/   the train state, saved every few hundred steps
    WORKDIR/checkpoints/best/<step>/     the train state with the lowest validation loss
    WORKDIR/config.json                  the config the run was started with

Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save resumes from the last complete checkpoint.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import orbax.checkpoint as ocp

LATEST = "latest"
BEST = "best"


def checkpoint_dir(workdir: str, which: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints", which)


def _multiprocessing_options(path: str) -> ocp.options.MultiprocessingOptions:
  """Barrier keys unique to one checkpoint folder.

  Orbax names its cross-host barriers after the step folder ('3', ...), so the 'best' and
  'latest' managers saving the same step at the same time would share a barrier and, on
  several hosts, pair up wrongly and hang. A prefix per folder keeps them apart.
  """
  digest = hashlib.sha1(path.encode()).hexdigest()[:12]
  return ocp.options.MultiprocessingOptions(
      barrier_sync_key_prefix=f"{os.path.basename(path)}_{digest}")


def latest_manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """Manager of the periodic checkpoints used to resume."""
  path = checkpoint_dir(workdir, LATEST)
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True,
      multiprocessing_options=_multiprocessing_options(path)))


def best_manager(workdir: str) -> ocp.CheckpointManager:
  """Manager keeping the single checkpoint with the lowest validation loss (paper §5.1)."""
  path = checkpoint_dir(workdir, BEST)
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
      max_to_keep=1, best_fn=lambda m: m["val_loss"], best_mode="min", create=True,
      multiprocessing_options=_multiprocessing_options(path)))


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         metrics: dict[str, float] | None = None) -> None:
  manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> Any:
  """Restores ``step`` (default the latest) into the structure and shardings of
  ``abstract_state`` (e.g. ``jax.eval_shape`` of the state, or the state itself)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}")
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  return manager.restore(step, args=ocp.args.StandardRestore(target))


def find_checkpoint(workdir: str, which: str = BEST) -> tuple[ocp.CheckpointManager, int]:
  """The manager and step of the ``which`` ('best' or 'latest') checkpoint of a run.

  Falls back from 'best' to 'latest' when no validation has happened yet.
  Raises FileNotFoundError naming the folder when there is none.
  """
  order = [which] + ([LATEST] if which == BEST else [])
  for name in order:
    path = checkpoint_dir(workdir, name)
    if os.path.isdir(path):
      manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
          read_only=True, create=False, save_interval_steps=0,
          multiprocessing_options=_multiprocessing_options(path)),
          item_handlers=ocp.StandardCheckpointHandler())
      step = manager.best_step() if name == BEST else manager.latest_step()
      step = manager.latest_step() if step is None else step
      if step is not None:
        return manager, step
  raise FileNotFoundError(
      f"no checkpoint found under {os.path.join(os.path.abspath(workdir), 'checkpoints')}; "
      "train first with --mode=train")


def restore_replicated(manager: ocp.CheckpointManager, step: int) -> Any:
  """Restores ``step`` replicated over all devices, whatever topology (number of processes
  or devices) saved it: the target comes from the checkpoint's own metadata."""
  sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), P())
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                        manager.item_metadata(step))
  return manager.restore(step, args=ocp.args.StandardRestore(target))
