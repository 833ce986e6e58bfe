"""Orbax checkpoints of a run: the latest (for resuming) and the best by validation loss.

Layout of a workdir::

    WORKDIR/checkpoints/latest/<step>/   the train state, saved every few hundred steps
    WORKDIR/checkpoints/best/<step>/     the train state with the lowest validation loss
    WORKDIR/checkpoints/unusable/        steps a resume could not restore, set aside
    WORKDIR/config.json, config_history.jsonl, run.lock   see ``rma_jax.workdir``

Every step carries the checkpoint format it was written in (``FORMAT``, in Orbax's custom
step metadata); a step without one was written before the format was recorded (format 0, the
same parameter and optimizer trees) and restores; a step of a newer format is refused with
the version that can read it. A step saved by a stop before its validation says so
(``validation_due``): the resume validates it first.

A run with ``optim.ema_decay > 0`` keeps the moving average of its parameters in every
checkpoint (``ema_params``, format 2), and its best checkpoint records whether the average or
the plain parameters had the lower validation loss (``ema`` in the step's metrics).
``load_selected_params`` is the one place that reads "the parameters of a run's checkpoint":
the winner, and which one it is. A checkpoint without an average restores into a state with
one (the average starts at its parameters: a resume that switches the average on, or a
checkpoint of an older version), and one with an average into a state without.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save resumes from the last complete checkpoint. A step damaged afterwards (a truncated or
deleted array file, missing metadata, an empty step folder) is skipped by ``restore_newest``:
the resume falls back to the newest step that restores, and the bad one is moved to
``checkpoints/unusable/`` (never deleted) with a warning that says how to delete it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from rma_jax import errors, optimizer, parallel, paths

LATEST = "latest"
BEST = "best"
UNUSABLE = "unusable"

FORMAT = 2
"""The newest checkpoint format this version writes and reads. 2: format 1 and the moving
average of the parameters (``ema_params``); written only by runs that keep one, the others
write 1, which older versions read. 1: the train state (``steps.TrainState``: step, params,
opt_state) with the format in the step's custom metadata; 0 (no format recorded): the same
trees, written before the format was recorded."""
FORMAT_KEY = "rma_jax_checkpoint_format"
VALIDATION_DUE_KEY = "rma_jax_validation_due"
EMA = "ema_params"
"""The moving average's entry in a checkpoint (``steps.TrainState.ema_params``)."""


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


def _tree(state: Any) -> Any:
  """What a checkpoint holds of ``state``: a train state as the dict {step, params,
  opt_state} (the same tree a flax TrainState saves as) with ``ema_params`` where it keeps
  an average; anything else as it is."""
  if not hasattr(state, "opt_state"):
    return state
  tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
  if getattr(state, EMA, None) is not None:
    tree[EMA] = getattr(state, EMA)
  return tree


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         metrics: dict[str, Any] | None = None, validation_due: bool = False) -> None:
  """Saves ``step`` (asynchronously); raises ``CheckpointSaveError`` when this save, or an
  earlier one still in the background, failed. ``validation_due``: a stop skipped the step's
  validation; a resume from the step runs it first (the function ``validation_due``)."""
  tree = _tree(state)
  version = FORMAT if isinstance(tree, dict) and EMA in tree else 1
  custom = {FORMAT_KEY: version, **({VALIDATION_DUE_KEY: True} if validation_due else {})}
  try:
    manager.save(step, args=ocp.args.StandardSave(tree), metrics=metrics,
                 custom_metadata=custom)
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


def validation_due(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether ``step`` was saved with its validation skipped (``save``'s ``validation_due``)."""
  custom = getattr(manager.metadata(step), "custom_metadata", None) or {}
  return bool(custom.get(VALIDATION_DUE_KEY, False))


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> Any:
  """Restores ``step`` (default the latest) into the structure and shardings of
  ``abstract_state`` (e.g. ``jax.eval_shape`` of the state, or the state itself)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}")
  target = _target(abstract_state, manager.item_metadata(step))
  return _as_state(abstract_state, manager.restore(step, args=ocp.args.StandardRestore(target)))


def _target(abstract_state: Any, metadata: Any) -> Any:
  """The restore target of ``abstract_state`` (shapes, dtypes, shardings), with a moving
  average exactly where the checkpoint (``metadata``) has one: a missing one is made by
  ``_as_state``, an unwanted one dropped there."""
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _tree(abstract_state))
  if not isinstance(target, dict) or "opt_state" not in target:
    return target
  saved = metadata is not None and EMA in metadata.keys() and metadata[EMA] is not None
  target.pop(EMA, None)
  if saved:
    target[EMA] = target["params"]  # the average has the parameters' shapes and shardings
  return target


def _as_state(abstract_state: Any, restored: Any) -> Any:
  """``restored`` (a ``_tree``) as ``abstract_state``'s type, its moving average there iff
  that state keeps one (started at the restored parameters where the checkpoint has none)."""
  if not hasattr(abstract_state, "opt_state"):
    return restored
  fields = dict(restored)
  ema = fields.pop(EMA, None)
  if hasattr(abstract_state, EMA):
    wanted = getattr(abstract_state, EMA) is not None
    fields[EMA] = (ema if ema is not None else optimizer.copy_tree(fields["params"])
                   ) if wanted else None
  return abstract_state.replace(**fields)


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
      target = _target(abstract_state, metadata)
      _check_same_arrays(metadata, target, path)
      try:
        state = _as_state(abstract_state,
                          manager.restore(step, args=ocp.args.StandardRestore(target)))
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


@dataclasses.dataclass(frozen=True)
class SelectedParams:
  """The parameters of a run's checkpoint that evaluation, prediction and export use.

  Attributes:
    params: the parameter tree, replicated over all devices.
    step: the checkpoint's step.
    which: the folder it came from, 'best' or 'latest' (a 'best' asked for before any
      validation falls back to 'latest').
    ema: whether ``params`` is the moving average of the parameters: the best checkpoint of a
      run with ``optim.ema_decay > 0`` where the average had the lower validation loss.
    has_ema: whether the checkpoint keeps a moving average at all.
  """
  params: Any
  step: int
  which: str
  ema: bool
  has_ema: bool


def load_selected_params(workdir: str, which: str = BEST, fallback: bool = True
                         ) -> SelectedParams:
  """The parameters of a run's best (or latest) checkpoint: where its validation chose the
  moving average over the plain parameters (the step's ``ema`` metric), the average; the plain
  parameters otherwise (a latest checkpoint: no validation chose). The one place that
  answers "which parameters did this run select". ``fallback``: as ``find_checkpoint``."""
  manager, step = find_checkpoint(workdir, which, fallback)
  restored = restore_replicated(manager, step)
  ema = bool((manager.metrics(step) or {}).get("ema", False))
  if ema and EMA not in restored:
    path = step_path(manager, step)
    raise CorruptCheckpointError(
        f"checkpoint {path} records that its moving average was selected but holds none; it "
        f"is damaged: delete it (rm -r {path}) or restore it from a copy")
  params = restored[EMA] if ema else restored["params"] if "params" in restored else restored
  return SelectedParams(params=params, step=step,
                        which=os.path.basename(os.fspath(manager.directory)), ema=ema,
                        has_ema=EMA in restored)


def load_params(workdir: str, which: str = BEST, fallback: bool = True) -> tuple[Any, int]:
  """(params, step) of ``load_selected_params``: the selected parameters, replicated."""
  selected = load_selected_params(workdir, which, fallback)
  return selected.params, selected.step
