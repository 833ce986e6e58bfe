"""Orbax checkpoints of a run: the latest (for resuming) and the best by validation loss.

Layout of a workdir::

    WORKDIR/checkpoints/latest/<step>/   the train state, saved every few hundred steps
    WORKDIR/checkpoints/best/<step>/     the train state with the lowest validation loss
    WORKDIR/checkpoints/unusable/        steps a resume could not restore, set aside
    WORKDIR/config.json, config_history.jsonl, run.lock   see ``rma_jax.workdir``

Every step carries the checkpoint format it was written in (``FORMAT``, in Orbax's custom
step metadata); a step without one was written before the format was recorded (format 0, the
same parameter and optimizer trees) and restores; a step of a newer format is refused with
the version that can read it.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save resumes from the last complete checkpoint. A step damaged afterwards (a truncated or
deleted array file, missing metadata, an empty step folder) is skipped by ``restore_newest``:
the resume falls back to the newest step that restores, and the bad one is moved to
``checkpoints/unusable/`` (never deleted) with a warning that says how to delete it.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from rma_jax import errors, parallel, paths

LATEST = "latest"
BEST = "best"
UNUSABLE = "unusable"

FORMAT = 1
"""The checkpoint format this version writes and the newest it reads. 1: the train state
(``steps.TrainState``: step, params, opt_state) with the format in the step's custom metadata;
0 (no format recorded): the same trees, written before the format was recorded."""
FORMAT_KEY = "rma_jax_checkpoint_format"


class CheckpointMismatchError(errors.UserError, ValueError):
  """A checkpoint holds other arrays (names or shapes) than the state it is restored into."""


class CorruptCheckpointError(errors.UserError, RuntimeError):
  """No step of a checkpoint folder can be restored."""


class CheckpointFormatError(errors.UserError, ValueError):
  """A checkpoint of a newer format than this version reads."""


def checkpoint_dir(workdir: str, which: str) -> str:
  return os.path.join(paths.absolute(workdir), "checkpoints", which)


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
      multiprocessing_options=_multiprocessing_options(path)),
      item_handlers=ocp.StandardCheckpointHandler())


def best_manager(workdir: str) -> ocp.CheckpointManager:
  """Manager keeping the single checkpoint with the lowest validation loss (paper §5.1)."""
  path = checkpoint_dir(workdir, BEST)
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
      max_to_keep=1, best_fn=lambda m: m["val_loss"], best_mode="min", create=True,
      multiprocessing_options=_multiprocessing_options(path)),
      item_handlers=ocp.StandardCheckpointHandler())


def has_steps(workdir: str, which: str = LATEST) -> bool:
  """Whether WORKDIR/checkpoints/<which> holds a step folder (complete or not); cheap."""
  path = checkpoint_dir(workdir, which)
  folder = paths.path(path)
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


class CheckpointSaveError(errors.StorageError):
  """A checkpoint could not be written (the message names the folder, the cause and the fix)."""


_CAUSES = (("RESOURCE_EXHAUSTED", "the disk is full"), ("No space left", "the disk is full"),
           ("Read-only file system", "the file system is read-only"),
           ("Permission denied", "permission denied"),
           ("PERMISSION_DENIED", "permission denied"))


def _save_error(manager: ocp.CheckpointManager, what: str, error: BaseException
                ) -> CheckpointSaveError:
  chain, seen, e = [], set(), error
  while e is not None and id(e) not in seen:  # the cause may sit deep in Orbax's chain
    seen.add(id(e))
    chain.append(f"{type(e).__name__}: {e}")
    e = e.__cause__ or e.__context__
  text = " ".join(chain)
  cause = next((c for key, c in _CAUSES if key in text), _first_line(error))
  good = [s for s in manager.all_steps() if paths.path(step_path(manager, s)).exists()]
  return CheckpointSaveError(
      f"{what} in {os.fspath(manager.directory)} failed: {cause}. Training stopped there; "
      f"the checkpoints written before it ({', '.join(map(str, sorted(good))) or 'none'}) "
      "are intact. Free space or make the folder writable, then run the same command to "
      "continue")


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         metrics: dict[str, float] | None = None) -> None:
  """Saves ``step`` (asynchronously); raises ``CheckpointSaveError`` when this save, or an
  earlier one still in the background, failed."""
  try:
    manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics,
                 custom_metadata={FORMAT_KEY: FORMAT})
  except Exception as e:  # pylint: disable=broad-except  # TensorStore/Orbax/OS errors
    raise _save_error(manager, f"checkpoint saving at step {step}", e) from e


def check_saves(*managers: ocp.CheckpointManager) -> None:
  """Raises ``CheckpointSaveError`` if a background save of one of ``managers`` failed
  (cheap: it looks at finished saves only)."""
  for manager in managers:
    try:
      manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise _save_error(manager, "a background checkpoint save", e) from e


def wait(*managers: ocp.CheckpointManager) -> None:
  """Waits for the saves of ``managers``; raises ``CheckpointSaveError`` if one failed."""
  for manager in managers:
    try:
      manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise _save_error(manager, "a checkpoint save", e) from e


def checkpoint_format(manager: ocp.CheckpointManager, step: int) -> int:
  """The format a step was written in (0 when it records none).

  Raises:
    CheckpointFormatError: the step is of a newer format than this version reads.
  """
  custom = getattr(manager.metadata(step), "custom_metadata", None) or {}
  version = int(custom.get(FORMAT_KEY, 0))
  if version > FORMAT:
    raise CheckpointFormatError(
        f"{step_path(manager, step)} is a checkpoint of format {version}, written by a newer "
        f"rma_jax; this one reads formats up to {FORMAT}: upgrade rma_jax to use it")
  return version


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> Any:
  """Restores ``step`` (default the latest) into the structure and shardings of
  ``abstract_state`` (e.g. ``jax.eval_shape`` of the state, or the state itself)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}")
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  return manager.restore(step, args=ocp.args.StandardRestore(target))


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def step_path(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(os.fspath(manager.directory), str(step))


def _missing_part(manager: ocp.CheckpointManager, step: int) -> str | None:
  """What a step misses that TensorStore would fail on, or None: checked on the files, so
  that a known damage is named without a TensorStore read (a failed one leaves callbacks
  that print "Event loop is closed" tracebacks when the process ends)."""
  item = paths.path(os.path.join(step_path(manager, step), "default"))
  if not item.exists():
    return None  # item_metadata says what is missing
  names = {p.name for p in item.iterdir()}
  if any(n.startswith("ocdbt.process_") for n in names) and "manifest.ocdbt" not in names:
    return "its OCDBT manifest default/manifest.ocdbt is missing"
  return None


def _check_same_arrays(metadata: Any, target: Any, path: str) -> None:
  """Raises CheckpointMismatchError unless the checkpoint's arrays are the target's."""
  def shapes(tree):
    return {"/".join(k): tuple(getattr(v, "shape", ()) or ())
            for k, v in ocp.tree.to_flat_dict(tree).items() if v is not None}
  saved, wanted = shapes(metadata), shapes(target)
  if saved == wanted:
    return
  order = lambda keys: sorted(keys, key=lambda k: (not k.startswith("params"), k))  # noqa: E731
  problems = [f"{k} missing from the checkpoint" for k in order(wanted.keys() - saved.keys())]
  problems += [f"{k} not in this config's state" for k in order(saved.keys() - wanted.keys())]
  problems += [f"{k} {saved[k]} in the checkpoint vs {wanted[k]} here"
               for k in order(saved.keys() & wanted.keys()) if saved[k] != wanted[k]]
  raise CheckpointMismatchError(
      f"{path} holds another model or optimizer than this config builds "
      f"({len(problems)} arrays differ, e.g. {'; '.join(problems[:3])}): resume with the "
      "config it was trained with, or use another --workdir")


def restore_newest(manager: ocp.CheckpointManager, abstract_state: Any,
                   check: Callable[[Any], str | None] | None = None) -> tuple[Any, int] | None:
  """Restores the newest step that is complete and restores; sets broken newer ones aside.

  A step whose metadata is missing or unreadable, whose arrays cannot be read (truncated
  or deleted files), or that ``check`` rejects is skipped with a warning; once an older
  step restores, the skipped ones are moved to ``checkpoints/unusable/`` (so the run can
  save those step numbers again) and the warning says how to delete them.

  Args:
    manager: e.g. ``latest_manager(workdir)``.
    abstract_state: the state to restore into (structure, shapes, shardings).
    check: ``check(state) -> reason or None``; a reason makes the step unusable.

  Returns:
    (state, step), or None when the folder has no step at all.

  Raises:
    CheckpointMismatchError: the checkpoint holds other arrays than ``abstract_state``
      (another config); nothing is set aside.
    CorruptCheckpointError: no step restores (the message names each and why); nothing is
      set aside.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  bad: list[tuple[str, str]] = []
  for step in steps:
    path = step_path(manager, step)
    metadata, reason = None, _missing_part(manager, step)
    try:
      if reason is None:
        metadata = manager.item_metadata(step)
    except Exception as e:  # pylint: disable=broad-except  # an empty folder, a bad file...
      reason = f"its metadata cannot be read ({_first_line(e)})"
    if metadata is None and reason is None:
      reason = "its metadata file default/_METADATA is missing"
    if reason is None:
      checkpoint_format(manager, step)
      _check_same_arrays(metadata, target, path)
      try:
        state = manager.restore(step, args=ocp.args.StandardRestore(target))
      except Exception as e:  # pylint: disable=broad-except  # TensorStore/asyncio errors
        reason = f"its arrays cannot be read ({_first_line(e)})"
      else:
        reason = check(state) if check is not None else None
    if reason is None:
      _set_aside(manager, bad, step)
      return state, step
    bad.append((path, reason))  # said once: where it is set aside, or in the error below
  raise CorruptCheckpointError(
      f"no checkpoint in {os.fspath(manager.directory)} can be restored: "
      + "; ".join(f"{p}: {r}" for p, r in bad)
      + ". Delete them (rm -r " + " ".join(p for p, _ in bad) + ") to start from scratch, or "
      "use another --workdir")


def _set_aside(manager: ocp.CheckpointManager, bad: list[tuple[str, str]], good: int) -> None:
  if not bad:
    return
  folder = os.path.join(os.path.dirname(os.fspath(manager.directory)), UNUSABLE)
  prefix = os.path.basename(os.fspath(manager.directory))
  moves = []
  for path, reason in bad:
    dest = os.path.join(folder, f"{prefix}_{os.path.basename(path)}")
    n = 1
    while paths.path(dest).exists():
      dest, n = os.path.join(folder, f"{prefix}_{os.path.basename(path)}.{n}"), n + 1
    moves.append((path, dest, reason))
  if jax.process_index() == 0:
    paths.path(folder).mkdir(parents=True, exist_ok=True)
    for path, dest, _ in moves:
      paths.path(path).rename(dest)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("rma_jax.checkpointing.set_aside")
  manager.reload()
  for path, dest, reason in moves:
    logging.warning("checkpoint %s is unusable (%s); resuming from step %d instead. It was "
                    "moved to %s; delete it with: rm -r %s", path, reason, good, dest, dest)


def find_checkpoint(workdir: str, which: str = BEST, fallback: bool = True
                    ) -> tuple[ocp.CheckpointManager, int]:
  """The manager and step of the ``which`` ('best' or 'latest') checkpoint of a run.

  Falls back from 'best' to 'latest' when no validation has happened yet (unless
  ``fallback`` is False). Raises FileNotFoundError naming the folder when there is none.
  """
  order = [which] + ([LATEST] if which == BEST and fallback else [])
  for name in order:
    path = checkpoint_dir(workdir, name)
    if paths.path(path).is_dir():
      manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
          read_only=True, create=False, save_interval_steps=0,
          multiprocessing_options=_multiprocessing_options(path)),
          item_handlers=ocp.StandardCheckpointHandler())
      step = manager.best_step() if name == BEST else manager.latest_step()
      step = manager.latest_step() if step is None else step
      if step is not None:
        return manager, step
  if not fallback:
    raise FileNotFoundError(
        f"no {which} checkpoint under {os.path.join(paths.absolute(workdir), 'checkpoints')}"
        " (one is kept from the run's first validation on); train or resume it with "
        "--mode=train first")
  raise FileNotFoundError(
      f"no checkpoint found under {os.path.join(paths.absolute(workdir), 'checkpoints')}; "
      "train first with --mode=train")


def restore_replicated(manager: ocp.CheckpointManager, step: int) -> Any:
  """Restores ``step`` replicated over all devices, whatever topology (number of processes
  or devices) saved it: the target comes from the checkpoint's own metadata."""
  sharding = parallel.replicated(parallel.make_mesh())
  path = step_path(manager, step)
  try:
    missing = _missing_part(manager, step)
    if missing:
      raise FileNotFoundError(missing)
    checkpoint_format(manager, step)
    metadata = manager.item_metadata(step)
    if metadata is None:
      raise FileNotFoundError("its metadata file default/_METADATA is missing")
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          metadata)
    return manager.restore(step, args=ocp.args.StandardRestore(target))
  except CheckpointFormatError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # TensorStore/asyncio errors
    raise CorruptCheckpointError(
        f"checkpoint {path} cannot be restored ({_first_line(e)}); it is damaged: delete it "
        f"(rm -r {path}) or restore it from a copy") from e


def load_params(workdir: str, which: str = BEST, fallback: bool = True) -> tuple[Any, int]:
  """The parameters of a run's best (or latest) checkpoint, replicated, and its step
  (``find_checkpoint``)."""
  manager, step = find_checkpoint(workdir, which, fallback)
  restored = restore_replicated(manager, step)
  params = restored["params"] if "params" in restored else restored
  return params, step
