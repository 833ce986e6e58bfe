"""What a run keeps in its workdir besides the checkpoints: the lock and the config record.

    WORKDIR/run.lock               locked (``fcntl.flock``) by process 0 while a run uses WORKDIR;
                                   it holds the host, pid, start time and command of that run
    WORKDIR/config.json            the config of the run's first start; never rewritten
    WORKDIR/config_history.jsonl   one JSON line per start: time, host, pid, the step it resumed
                                   from, the whole config and what changed since the last start

**One run per workdir.** A second run started on a workdir in use stops at once with
``WorkdirInUseError`` naming the holder. The kernel releases the lock when the holding
process ends, however it ends (``kill -9`` included), so a stale ``run.lock`` never blocks a
resume. On paths without POSIX locks (``gs://...`` and other remote URLs, or a file system
that refuses ``flock``) no lock is taken and a warning says so: there, keeping one run per
workdir is up to the user. (A bucket has no lock that its holder's death releases; a lease
with a heartbeat would need every start to wait out a dead holder's lease, so none is
kept.) The config record below is a bucket's objects like any other file.

**Resuming checks the config.** When WORKDIR already holds checkpoints, the new config is
compared with the last recorded one (``recorded_config``):

* ``ARCHITECTURE_FIELDS`` (the model the checkpoints hold) may never change;
* ``FREE_FIELDS`` (how long to train, logging/checkpoint intervals, evaluation settings,
  input threads, initialisation that only applies at step 0) may change; the change is
  recorded;
* every other field (seed, batch size, learning rate, loss weights, data ...) changes the
  run's trajectory: refused unless ``--config.allow_config_change=True``, then recorded.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Any, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np

from rma_jax import errors, paths

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"

ARCHITECTURE_FIELDS = (
    "data.name", "model.name", "model.trunk", "model.width", "model.resnet_stride",
    "model.num_regions", "model.sample_size", "model.region_pool", "model.x_dim",
    "model.hidden_dim", "model.z_dim", "model.standard_lstm", "model.fixed_regions")
"""Fields that define the model a checkpoint holds (data.name: the number of classes)."""

FREE_FIELDS = (
    "max_steps", "optim.num_epochs", "log_every_steps", "checkpoint_every_steps",
    "max_to_keep", "eval_every_epochs", "allow_config_change", "data.num_workers",
    "data.prefetch", "model.remat", "model.conv_impl", "init", "stage1", "eval")
"""Fields (or groups) a resume may change freely. ``init``/``stage1`` act before step 0 of
this workdir (a stage-1 run checks its own fields in WORKDIR/stage1); remat and conv_impl
give the same results."""


class WorkdirInUseError(errors.UserError, RuntimeError):
  """Another run holds the workdir."""


class ConfigChangeError(errors.UserError, ValueError):
  """A resume with a config the checkpoints were not trained with."""


class WorkdirPathError(errors.UserError, NotADirectoryError):
  """The workdir (or a folder above it) is a file."""


def check_path(workdir: str) -> None:
  """Raises ``WorkdirPathError`` when WORKDIR, or a folder on its path, exists as something
  other than a folder (a local path; a bucket has no such conflict)."""
  if paths.is_remote(workdir):
    return
  path = os.path.abspath(workdir)
  while True:
    if os.path.exists(path) and not os.path.isdir(path):
      what = "is" if path == os.path.abspath(workdir) else f"is inside {path}, which is"
      raise WorkdirPathError(f"--workdir={workdir} {what} a file, not a folder: choose "
                             "another --workdir")
    parent = os.path.dirname(path)
    if parent == path:
      return
    path = parent


_held: dict[str, int] = {}  # workdir -> depth of this process's (re-entrant) hold


def _holder_description(lock_path: str) -> str:
  try:
    with open(lock_path) as f:
      holder = json.load(f)
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, started "
            f"{holder.get('started')}: {holder.get('command')}")
  except (OSError, ValueError):
    return "holder unknown (its lock file is unreadable)"


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds WORKDIR/run.lock for the ``with`` block (re-entrant within a process).

  Process 0 takes an exclusive, non-blocking ``fcntl.flock`` and writes the holder's host,
  pid, start time and command into the file; the other processes of a multi-host run learn
  the outcome from it.

  Raises:
    WorkdirInUseError: another run holds the workdir (the message names it).
  """
  key = paths.absolute(workdir)
  if key in _held:
    _held[key] += 1
    try:
      yield
    finally:
      _held[key] -= 1
    return
  fd, refusal = None, ""
  if jax.process_index() == 0:
    fd, refusal = _try_lock(key)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if not bool(multihost_utils.broadcast_one_to_all(np.int32(not refusal))):
      refusal = refusal or f"{key} is in use by another run (see process 0's log)"
  if refusal:
    raise WorkdirInUseError(refusal)
  _held[key] = 1
  keep = False
  try:
    yield
  except errors.StorageError:
    keep = True  # a failed save's writers may still run: held until the process ends
    raise
  finally:
    del _held[key]
    if fd is not None and not keep:
      os.ftruncate(fd, 0)  # the file stays (deleting it would race with a new holder)
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)


def _try_lock(path: str) -> tuple[int | None, str]:
  """(fd holding the lock or None, refusal message or '')."""
  if paths.is_remote(path):
    logging.warning("%s is a remote path without POSIX locks: nothing stops a second run from "
                    "using it at the same time; start one run per workdir", path)
    return None, ""
  os.makedirs(path, exist_ok=True)
  lock_path = os.path.join(path, LOCK_FILE)
  fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      return None, (f"workdir {path} is in use by another run ({_holder_description(lock_path)}"
                    f"); wait for it to end, stop it, or choose another --workdir")
    logging.warning("cannot lock %s (%s): nothing stops a second run from using %s at the "
                    "same time", lock_path, e, path)
    return None, ""
  holder = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}
  os.ftruncate(fd, 0)
  os.write(fd, (json.dumps(holder) + "\n").encode())
  os.fsync(fd)
  return fd, ""


# --------------------------------------------------------------------------- config record


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def recorded_config(workdir: str) -> dict[str, Any] | None:
  """The config of the last start recorded in WORKDIR (history, else config.json), or None."""
  history = _read_history(workdir)
  if history:
    return history[-1]["config"]
  path = paths.path(os.path.join(workdir, CONFIG_FILE))
  if not path.exists():
    return None
  return json.loads(path.read_text())


def _read_history(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, HISTORY_FILE)
  if not paths.path(path).exists():
    return []
  entries = []
  for n, line in enumerate(paths.path(path).read_text().splitlines(), 1):
    if line.strip():
      try:
        entries.append(json.loads(line))
      except ValueError:  # a start killed while writing its line
        logging.warning("%s line %d is incomplete; ignored", path, n)
  return entries


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """``{field: (old, new)}`` for every field set in both (JSON form) to different values.

  Fields only one side has (added or removed by a newer version of the code) are not
  compared."""
  a, b = flatten(old), flatten(new)
  return {k: (a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k]}


def _architecture_changes(changes: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
  return {k: v for k, v in changes.items() if k in ARCHITECTURE_FIELDS}


def _is_free(field: str) -> bool:
  return any(field == f or field.startswith(f + ".") for f in FREE_FIELDS)


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
  return ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in changes.items())


def check_config(config: ml_collections.ConfigDict, workdir: str,
                 resuming: bool) -> dict[str, tuple[Any, Any]]:
  """Compares a (re)start's config with the last recorded one; writes nothing.

  Args:
    config: this start's config.
    workdir: the run's folder.
    resuming: whether WORKDIR holds checkpoints this start resumes from.

  Returns:
    the changes since the last recorded start, ``{field: (old, new)}`` (for ``record_start``).

  Raises:
    ConfigChangeError: resuming with a changed architecture field, or with another changed
      field that is not free while ``config.allow_config_change`` is False.
  """
  old = recorded_config(workdir)
  changes = config_changes(old, _as_json(config)) if old is not None else {}
  history_path = os.path.join(workdir, HISTORY_FILE)
  if resuming and changes:
    arch = _architecture_changes(changes)
    if arch:
      raise ConfigChangeError(
          f"{workdir} holds checkpoints of another model: changed {describe_changes(arch)}. "
          "The checkpoints cannot be resumed with them: use the recorded values (the last "
          f"line of {history_path}) or another --workdir")
    gated = {k: v for k, v in changes.items() if not _is_free(k)}
    if gated and not config.get("allow_config_change", False):
      raise ConfigChangeError(
          f"resuming {workdir} with a config it was not trained with: changed "
          f"{describe_changes(gated)}. Use the recorded values (the last line of "
          f"{history_path}), another --workdir, or --config.allow_config_change=True to "
          "resume with the change (it is recorded)")
    logging.warning("resuming with a changed config (recorded in %s): %s", history_path,
                    describe_changes(changes))
  return changes


def architecture(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``{field: value}`` of every ``ARCHITECTURE_FIELDS`` field the config has (JSON form)."""
  flat = flatten(_as_json(config))
  return {k: flat[k] for k in ARCHITECTURE_FIELDS if k in flat}


def check_architecture(config: ml_collections.ConfigDict, workdir: str, purpose: str) -> None:
  """Refuses to ``purpose`` (evaluate, predict) a trained WORKDIR with a config whose model
  differs from the one its checkpoints hold (the last recorded start); writes nothing.

  Raises:
    ConfigChangeError: naming each differing architecture field, recorded -> given.
  """
  old = recorded_config(workdir)
  if old is None:  # no record (a run of an older version, or converted weights): nothing to compare
    return
  arch = _architecture_changes(config_changes(old, _as_json(config)))
  if arch:
    raise ConfigChangeError(
        f"cannot {purpose} {workdir} with another model than it trained: "
        f"{describe_changes(arch)} (recorded -> given). Drop these overrides (the trained "
        f"config is the last line of {os.path.join(workdir, HISTORY_FILE)})")


def record_start(config: ml_collections.ConfigDict, workdir: str,
                 changes: dict[str, tuple[Any, Any]], resumed_from: int | None) -> None:
  """Appends this start to WORKDIR/config_history.jsonl (and writes config.json if it is
  the first); call once the state is restored or initialised, before training."""
  if jax.process_count() > 1:
    # Every process has read the record (check_config) before process 0 appends to it.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("rma_jax.workdir.record_start")
  if jax.process_index() != 0:
    return
  paths.path(workdir).mkdir(parents=True, exist_ok=True)
  first = paths.path(os.path.join(workdir, CONFIG_FILE))
  if not first.exists():
    first.write_text(config.to_json_best_effort(indent=2))
  entry = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
           "host": socket.gethostname(), "pid": os.getpid(), "resumed_from_step": resumed_from,
           "changed": {k: [a, b] for k, (a, b) in changes.items()},
           "config": _as_json(config)}
  _append_line(os.path.join(workdir, HISTORY_FILE), json.dumps(entry))


def _append_line(path: str, line: str) -> None:
  """Appends a line to a text file; on a bucket (objects cannot be appended to) the object is
  rewritten whole, which one run per workdir makes safe."""
  if paths.is_remote(path):
    p = paths.path(path)
    old = p.read_text() if p.exists() else ""
    p.write_text(old + line + "\n")
    return
  with open(path, "a") as f:
    f.write(line + "\n")
    f.flush()
    os.fsync(f.fileno())
