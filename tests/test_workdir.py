"""The workdir lock and config record (rma_jax.workdir), the checkpoint fallback
(checkpointing.restore_newest) and the moving average's checkpoints (restored with or without
one, the best checkpoint's winner), in-process on tiny states; the CLI cases are in
test_train."""

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from rma_jax.configs import default
from rma_jax import checkpointing, steps, train
from rma_jax import workdir as workdir_lib

# --------------------------------------------------------------------------- the lock

_HOLDER = r"""
import fcntl, json, os, sys, time
fd = os.open(os.path.join(sys.argv[1], "run.lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, json.dumps({"host": "elsewhere", "pid": os.getpid(), "started": "then",
                         "command": "the other run"}).encode())
print("locked", flush=True)
time.sleep(600)
"""


def test_lock_refuses_a_second_holder_and_dies_with_it(tmp_path):
  wd = str(tmp_path)
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, wd], stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirInUseError,
                       match=f"host elsewhere, pid {holder.pid}, started then: the other run"):
      with workdir_lib.hold(wd):
        pass
  finally:
    holder.kill()
    holder.wait()
  # The holder is gone (killed): its lock went with it, its file stays and blocks nothing.
  with workdir_lib.hold(wd):
    with workdir_lib.hold(wd):  # re-entrant: train() inside train_and_evaluate()
      with open(os.path.join(wd, "run.lock")) as f:
        assert json.load(f)["pid"] == os.getpid()
    with open(os.path.join(wd, "run.lock")) as f:
      assert json.load(f)["pid"] == os.getpid()  # still held after the inner block
  assert os.path.getsize(os.path.join(wd, "run.lock")) == 0  # released


def test_remote_paths_are_not_locked_and_say_so(caplog):
  with workdir_lib.hold("gs://bucket/run"):
    pass
  assert "without POSIX locks" in caplog.text
  assert not os.path.exists("gs:")


# --------------------------------------------------------------------------- the record


def _config(**changes):
  c = default.get_config()
  for key, value in changes.items():
    *path, last = key.split(".")
    target = c
    for p in path:
      target = target[p]
    target[last] = value
  return c


def test_check_config_by_field_kind(tmp_path):
  wd = str(tmp_path)
  assert workdir_lib.check_config(_config(), wd, resuming=False) == {}
  workdir_lib.record_start(_config(), wd, {}, None)
  # Architecture: never.
  with pytest.raises(workdir_lib.ConfigChangeError, match=r"model.width \(1 -> 2\)"):
    workdir_lib.check_config(_config(**{"model.width": 2}), wd, resuming=True)
  with pytest.raises(workdir_lib.ConfigChangeError, match="another model"):
    workdir_lib.check_config(_config(**{"model.width": 2, "allow_config_change": True}), wd,
                             resuming=True)
  # Trajectory: only when allowed.
  with pytest.raises(workdir_lib.ConfigChangeError,
                     match=r"optim.batch_size \(16 -> 32\), seed \(0 -> 1\).*allow_config_change"):
    workdir_lib.check_config(_config(seed=1, **{"optim.batch_size": 32}), wd, resuming=True)
  allowed = _config(**{"optim.learning_rate": 1e-4, "allow_config_change": True})
  assert workdir_lib.check_config(allowed, wd, resuming=True) == {
      "allow_config_change": (False, True), "optim.learning_rate": (1e-5, 1e-4)}
  # Free: how long, how often, evaluation, threads.
  free = _config(max_steps=9, **{"eval.batch_size": 8, "data.num_workers": 7})
  assert set(workdir_lib.check_config(free, wd, resuming=True)) == {
      "max_steps", "eval.batch_size", "data.num_workers"}
  # A fresh start (no checkpoint) may change anything.
  assert "model.width" in workdir_lib.check_config(_config(**{"model.width": 2}), wd,
                                                   resuming=False)


def test_record_is_append_only(tmp_path):
  wd = str(tmp_path)
  workdir_lib.record_start(_config(), wd, {}, None)
  with open(os.path.join(wd, "config.json")) as f:
    first = f.read()
  later = _config(**{"optim.learning_rate": 1e-4})
  changes = workdir_lib.check_config(later, wd, resuming=False)
  workdir_lib.record_start(later, wd, changes, 40)
  with open(os.path.join(wd, "config.json")) as f:
    assert f.read() == first  # the first start's record is never rewritten
  with open(os.path.join(wd, "config_history.jsonl")) as f:
    history = [json.loads(line) for line in f]
  assert [h["resumed_from_step"] for h in history] == [None, 40]
  assert history[1]["changed"] == {"optim.learning_rate": [1e-5, 1e-4]}
  assert workdir_lib.recorded_config(wd)["optim"]["learning_rate"] == 1e-4
  # A start killed while writing its line leaves half a line: ignored, not fatal.
  with open(os.path.join(wd, "config_history.jsonl"), "a") as f:
    f.write('{"started": "2025-')
  assert workdir_lib.recorded_config(wd)["optim"]["learning_rate"] == 1e-4


def test_workdir_of_an_older_version_compares_with_its_config_json(tmp_path):
  wd = str(tmp_path)
  old = _config().to_dict()
  del old["model"]["trunk_init"]  # a field added since: not compared
  with open(os.path.join(wd, "config.json"), "w") as f:
    json.dump(old, f)
  assert workdir_lib.check_config(_config(), wd, resuming=True) == {}
  with pytest.raises(workdir_lib.ConfigChangeError, match="optim.learning_rate"):
    workdir_lib.check_config(_config(**{"optim.learning_rate": 1.0}), wd, resuming=True)


# --------------------------------------------------------------------------- fallback


def _state(value=1.0, width=300):
  # Big enough for OCDBT to keep the values in data files (tiny arrays live in its manifest).
  noise = np.random.default_rng(0).normal(size=(256, width)).astype(np.float32)
  params = {"dense": {"kernel": jnp.asarray(value + noise), "bias": jnp.zeros((width,))}}
  return train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-3))


def _saved(workdir, states):
  manager = checkpointing.latest_manager(workdir, max_to_keep=5)
  for step, state in states.items():
    checkpointing.save(manager, step, state)
  manager.wait_until_finished()
  return checkpointing.checkpoint_dir(workdir, checkpointing.LATEST)


def _truncate_arrays(step_dir):
  for path in glob.glob(os.path.join(step_dir, "default", "ocdbt.process_0", "d", "*")):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _nonfinite(state):
  n = sum(int(np.sum(~np.isfinite(x))) for x in jax.tree.leaves((state.params, state.opt_state)))
  return f"it holds {n} non-finite values" if n else None


def test_restore_newest_skips_non_finite_and_damaged_steps(tmp_path):
  wd = str(tmp_path)
  folder = _saved(wd, {2: _state(2.0), 4: _state(np.nan), 6: _state(6.0)})
  _truncate_arrays(os.path.join(folder, "6"))
  manager = checkpointing.latest_manager(wd, max_to_keep=5)
  state, step = checkpointing.restore_newest(manager, _state(), check=_nonfinite)
  assert step == 2
  np.testing.assert_array_equal(state.params["dense"]["kernel"],
                                _state(2.0).params["dense"]["kernel"])
  assert manager.all_steps() == [2]
  assert sorted(os.listdir(os.path.join(wd, "checkpoints", "unusable"))) == ["latest_4",
                                                                            "latest_6"]


def test_restore_newest_with_no_usable_step_names_each_and_moves_nothing(tmp_path):
  wd = str(tmp_path)
  folder = _saved(wd, {2: _state(), 4: _state()})
  _truncate_arrays(os.path.join(folder, "2"))
  os.remove(os.path.join(folder, "4", "default", "_METADATA"))
  manager = checkpointing.latest_manager(wd)
  with pytest.raises(checkpointing.CorruptCheckpointError) as e:
    checkpointing.restore_newest(manager, _state())
  message = str(e.value)
  assert f"{folder}/4: its metadata file default/_METADATA is missing" in message
  assert f"{folder}/2: its arrays cannot be read" in message
  assert f"rm -r {folder}/4 {folder}/2" in message
  assert manager.all_steps() == [2, 4] and not os.path.exists(
      os.path.join(wd, "checkpoints", "unusable"))


def test_restore_newest_into_another_model_is_a_mismatch_not_a_corruption(tmp_path):
  wd = str(tmp_path)
  _saved(wd, {2: _state(width=300)})
  manager = checkpointing.latest_manager(wd)
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"params/dense/kernel \(256, 300\) in the checkpoint vs \(256, 500\)"):
    checkpointing.restore_newest(manager, _state(width=500))
  assert manager.all_steps() == [2]
  assert checkpointing.restore_newest(checkpointing.latest_manager(str(tmp_path / "none")),
                                      _state()) is None


# --------------------------------------------------------------------------- the moving average


def _with_ema(state, value):
  """``state`` (flax's TrainState) as rma_jax's, keeping a moving average of ``value``."""
  return steps.TrainState.create(apply_fn=None, params=state.params, tx=optax.adam(1e-3),
                                 ema_params=jax.tree.map(lambda x: x * 0 + value,
                                                         state.params)).replace(
                                                             opt_state=state.opt_state)


def test_a_checkpoint_without_a_moving_average_restores_with_one_started_at_its_parameters(
    tmp_path):
  """A step saved by flax's TrainState (before the average existed, format 1) restores into a
  state that keeps one: parameters and optimizer state as saved, the average equal to the
  parameters (in buffers of its own). A step with an average (format 2) restores it, and
  into a state without one drops it."""
  wd = str(tmp_path)
  old = _state(2.0)
  folder = _saved(wd, {2: old, 4: _with_ema(_state(4.0), 0.5)})
  manager = checkpointing.latest_manager(wd, max_to_keep=5)
  assert [checkpointing.checkpoint_format(manager, s) for s in (2, 4)] == [1, 2]
  target = _with_ema(_state(), 0.0)
  restored = checkpointing.restore(manager, target, step=2)
  kernel = old.params["dense"]["kernel"]
  np.testing.assert_array_equal(restored.params["dense"]["kernel"], kernel)
  np.testing.assert_array_equal(restored.ema_params["dense"]["kernel"], kernel)
  assert restored.ema_params["dense"]["kernel"] is not restored.params["dense"]["kernel"]
  for a, b in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(old.opt_state)):
    np.testing.assert_array_equal(a, b)
  state, step = checkpointing.restore_newest(manager, target)
  assert step == 4 and float(state.ema_params["dense"]["bias"][0]) == 0.5
  plain, _ = checkpointing.restore_newest(manager, _state())
  assert not hasattr(plain, "ema_params")
  np.testing.assert_array_equal(plain.params["dense"]["kernel"],
                                _state(4.0).params["dense"]["kernel"])
  assert os.listdir(folder) and manager.all_steps() == [2, 4]


def test_the_best_checkpoint_records_which_parameters_won_and_they_are_the_ones_loaded(
    tmp_path):
  """train.select_on_validation keeps the lower validation loss (the plain parameters on a
  tie); the best checkpoint records it, and checkpointing.load_selected_params returns the
  winner and says which."""
  losses_by_value = {}
  validate = lambda params, source: {"loss": losses_by_value[  # noqa: E731
      float(params["dense"]["bias"][0])], "mAP": 0.5}
  state = _with_ema(_state(0.0), 1.0)  # plain bias 0, average bias 1
  for plain_loss, ema_loss, ema_wins in ((0.3, 0.2, True), (0.2, 0.3, False),
                                         (0.2, 0.2, False)):
    losses_by_value.update({0.0: plain_loss, 1.0: ema_loss})
    sel = train.select_on_validation(validate, state, None)
    assert sel["ema_won"] == ema_wins and sel["val_loss"] == min(plain_loss, ema_loss)
    assert sel["record"] == {"val_loss": min(plain_loss, ema_loss), "ema": ema_wins,
                             "val_loss_plain": plain_loss, "val_loss_ema": ema_loss}
    wd = str(tmp_path / f"{plain_loss}_{ema_loss}")
    best = checkpointing.best_manager(wd)
    checkpointing.save(best, 3, state, sel["record"])
    best.wait_until_finished()
    selected = checkpointing.load_selected_params(wd)
    assert (selected.step, selected.which, selected.ema, selected.has_ema) == (
        3, "best", ema_wins, True)
    assert float(selected.params["dense"]["bias"][0]) == (1.0 if ema_wins else 0.0)
  # Without an average: the plain parameters, and a record as before.
  no_ema = train.select_on_validation(validate, state.replace(ema_params=None), None)
  assert no_ema["record"] == {"val_loss": 0.2} and no_ema["ema"] is None
