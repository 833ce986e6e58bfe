"""Training: the sharded step equals the 1-device step, the main job resumes (also after a
kill, after a damaged checkpoint), one run holds a workdir, resumes check the config,
non-finite states are never checkpointed, unusable splits fail before training, the loss goes
down on the demo data, the step's loss is Eq. 14 by hand, and gradient accumulation is exact
and counts optimizer steps."""

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import psutil
import pytest

from benchmarks.timing import CompileCounter
from rma_jax.configs import ablations, demo
from rma_jax import (build, checkpointing, config_checks, evaluate, losses, metric_writer,
                     models, optimizer, parallel, pixels, preemption, steps, train)
from rma_jax import init as init_lib
from rma_jax import workdir as workdir_lib
from rma_jax import data as data_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/demo.py:tiny (rma_jax.configs.default.tiny), one stage: these tests are about one
# training run and its workdir.
ONE_STAGE = {"stage1.num_epochs": 0}
TINY = [f"--config.{k}={v}" for k, v in ONE_STAGE.items()]


def tiny_config(**overrides):
  """configs/demo.py:tiny in-process with ONE_STAGE (the same run as ``_cmd``'s) and
  ``overrides`` (dotted keys)."""
  return ablations.apply_overrides(demo.get_config("tiny"), {**ONE_STAGE, **overrides})


def _cmd(workdir, *extra, config="configs/demo.py"):
  return [sys.executable, "-m", "rma_jax.main", f"--config={config}:tiny",
          f"--workdir={workdir}", *TINY, *extra]


_ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
    "--xla_force_host_platform_device_count=1 " + os.environ.get("RMA_TEST_XLA_FLAGS", "")))


def _main(workdir, *extra, config="configs/demo.py", **kw):
  return subprocess.run(_cmd(workdir, *extra, config=config), cwd=ROOT, env=_ENV,
                        capture_output=True, text=True, **kw)


def _history(workdir):
  with open(os.path.join(workdir, "config_history.jsonl")) as f:
    return [json.loads(line) for line in f]


def _steps(workdir):
  return checkpointing.latest_manager(workdir).all_steps()


def _finite_everywhere(workdir, step):
  """Every array (parameters and optimizer state) of latest/<step> is finite."""
  manager = checkpointing.latest_manager(workdir)
  restored = checkpointing.restore_replicated(manager, step)
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored)
             if np.issubdtype(np.asarray(x).dtype, np.inexact))


# The finished run's own flags, which every resume of it passes too (they change the state's
# structure). Without gradient clipping (which scales an overflowing gradient to zero) a
# resume of it can blow up (test_nonfinite_state_is_never_checkpointed). It keeps a moving
# average of its parameters, so the exact-restart tests check the average too.
SHARED_FLAGS = ("--config.optim.grad_clip_norm=0", "--config.optim.ema_decay=0.5")


@pytest.fixture(scope="module")
def finished_run(shared_once):
  """One 4-step run of the main job (checkpoints at steps 2 and 4, then the report), made
  once per session; tests copy it (``_copy``) and resume the copy. Its stderr goes to a file,
  as a log file would (not a terminal): ``result.stderr`` is that file's text."""
  def build(root):
    with open(root / "stderr.txt", "w") as err:
      result = subprocess.run(_cmd(str(root / "run"), "--config.max_steps=4", *SHARED_FLAGS),
                              cwd=ROOT, env=_ENV, stdout=subprocess.PIPE, stderr=err,
                              text=True, timeout=600)
    stderr = (root / "stderr.txt").read_text()
    assert result.returncode == 0, stderr[-3000:]
    return {"workdir": str(root / "run"), "stderr": stderr}
  run = shared_once("finished_run", build)
  return run["workdir"], types.SimpleNamespace(returncode=0, stderr=run["stderr"])


_OUR_FILES = {os.path.basename(p) for p in glob.glob(
    os.path.join(ROOT, "rma_jax", "**", "*.py"), recursive=True)}


@pytest.mark.slow
def test_console_of_the_main_job(finished_run):
  """What a person reads in the log file of a run: no library INFO line (Orbax's manager
  dumps, "Renaming ... tmp", "Finished saving", clu's hyperparameter and scalar dumps; these
  need --verbosity=1), and the start, progress, validation and summary lines."""
  wd, result = finished_run
  lines = result.stderr.splitlines()
  info = [m for m in (re.match(r"I\d{4} \S+ +\d+ (\S+?):\d+\] (.*)", line) for line in lines)
          if m]
  library = [m.group(0) for m in info if m.group(1) not in _OUR_FILES]
  assert not library, library[:5]
  text = "\n".join(m.group(2) for m in info)
  assert not re.search(r"Renaming|Finished saving|CheckpointManager|Hyperparameters", text)
  assert re.search(r"^Training 4 steps \(optimizer steps, 8 per epoch; .*RMA, [\d,]+ "
                   r"parameters\) from step 0", text, re.M)  # the stage starts
  for step, pct in ((2, 50), (4, 100)):
    assert re.search(rf"step {step}/4 \({pct}%\): loss [\d.]+, [\d.]+ steps/s, ETA \d", text)
  assert re.search(r"step 4: val loss [\d.]+, val mAP [\d.]+, the best so far", text)
  report_md = re.search(r"Done in \S+\. test ten_view@64: mAP [\d.]+ % \(all\), CF1 [\d.]+ "
                        r"%, OF1 [\d.]+ %\. Report: (\S+)$", text, re.M).group(1)
  assert report_md == os.path.join(wd, "report", "report.md") and os.path.isfile(report_md)
  assert len(lines) < 30, lines


def _copy(finished_run, tmp_path):
  wd = str(tmp_path / "run")
  shutil.copytree(finished_run[0], wd)
  return wd


@pytest.mark.slow
def test_sharded_step_equals_single_device_step():
  assert jax.device_count() >= 4, "conftest forces 4 host devices"
  config = tiny_config()
  sources = data_lib.get_sources(config.data, seed=0)
  model = build.build_model(config, 10)
  batches = list(zip(range(3), data_lib.train_batches(
      sources.train, global_batch_size=8, image_size=64, crop_size=48, seed=0)))
  loss_cfg = steps.LossConfig.from_config(config)
  # SGD, not the recipe's Adam: Adam normalises each gradient, so reduction-order noise in
  # a near-zero gradient becomes a step of O(lr), and how much depends on the CPU. SGD's
  # update is linear in the gradient, so this compares the gradients themselves.
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.05)  # the step logs the lr
  initial = jax.device_get(steps.create_train_state(
      model, tx, jax.random.key(0), (48, 48, 3), parallel.make_mesh(jax.devices()[:1])).params)
  finals = []
  for devices in (jax.devices()[:1], jax.devices()[:4]):
    mesh = parallel.make_mesh(devices)
    params = jax.device_put(initial, parallel.replicated(mesh))
    state = steps.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    step = steps.jit_train_step(loss_cfg, mesh)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    for _, batch in batches:
      batch = {k: jax.device_put(v, sharding) for k, v in batch.items()}
      state, metrics = step(state, batch)
    assert len(state.params["trunk"]["conv1_1"]["kernel"].sharding.device_set) == len(devices)
    finals.append(jax.device_get(state.params))
  for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), finals[0], initial))
  assert max(moved) > 1e-4


@pytest.mark.slow
def test_anchor_weight_schedule_and_the_step_that_takes_it():
  import dataclasses
  config = tiny_config()
  assert optimizer.anchor_weight_schedule(config.loss, 10) is None  # off by default
  config.loss.anchor_schedule_epochs = 2
  config.loss.lambda_anchor_start = 1.0
  config.loss.lambda_anchor = 0.01
  weight = optimizer.anchor_weight_schedule(config.loss, 10)
  # Geometric, one value per epoch: 1 for epoch 0, sqrt(1 * 0.01) for epoch 1, then 0.01.
  assert [weight(s) for s in (0, 9, 10, 19, 20, 500)] == pytest.approx(
      [1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
  config_checks.validate_config(config, num_devices=1)
  config.loss.lambda_anchor_start = 0.0
  with pytest.raises(ValueError, match="lambda_anchor_start"):
    config_checks.validate_config(config, num_devices=1)

  # The step takes the loss settings as a traced argument: the anchor weight of each epoch
  # reaches the loss without a new compilation.
  model = build.build_model(config, 10)
  mesh = parallel.make_mesh(jax.devices()[:1])
  tx = optimizer.make_optimizer(config.optim, lambda _: 1e-3)
  batch = next(data_lib.train_batches(data_lib.get_sources(config.data, seed=0).train,
                                      global_batch_size=8, image_size=64, crop_size=48,
                                      seed=0))
  cfg = steps.LossConfig.from_config(config)
  step = steps.jit_train_step(cfg, mesh)
  fixed = steps.jit_train_step(cfg.replace(lambda_anchor=1.0), mesh)
  first = steps.create_train_state(model, tx, jax.random.key(0), (48, 48, 3), mesh)
  new_state = lambda: jax.tree.map(jnp.copy, first)  # the steps donate their input state
  a_state, a = step(new_state(), batch, cfg.replace(lambda_anchor=1.0))
  b_state, b = fixed(new_state(), batch)
  with CompileCounter() as compiles:
    _, c = step(new_state(), batch, cfg.replace(lambda_anchor=0.01))
    _, d = step(new_state(), batch, cfg.replace(use_anchor=False, gamma=0.5))
  assert compiles.count == 0
  assert float(a["loc_loss"]) == pytest.approx(float(b["loc_loss"]), rel=1e-6)
  assert float(a["loc_loss"]) > float(c["loc_loss"]) > float(d["loc_loss"]) > 0
  assert float(d["loss"]) == pytest.approx(float(d["cls_loss"]) + 0.5 * float(d["loc_loss"]),
                                           rel=1e-6)
  for x, y in zip(jax.tree.leaves(a_state.params), jax.tree.leaves(b_state.params)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_training_loop_with_the_anchor_schedule(tmp_path, monkeypatch):
  """The loop feeds the scheduled weight to the step and logs it: 1.0 in epoch 0 (8 steps
  of 8 images), then the final 0.01."""
  writer = _RecordingWriter()
  monkeypatch.setattr(metric_writer, "create_writer", lambda *a, **k: writer)
  config = tiny_config(**{"loss.anchor_schedule_epochs": 1, "loss.lambda_anchor_start": 1.0,
                          "max_steps": 10, "log_every_steps": 1})
  assert train.train(config, str(tmp_path))["step"] == 10
  weights = writer.scalars["train/lambda_anchor"]
  assert [weights[s] for s in range(1, 11)] == pytest.approx([1.0] * 8 + [0.01] * 2)


def test_main_job_resumes_and_writes_checkpoints_and_events(finished_run, tmp_path):
  first = finished_run[1]
  # The log says what the initialisation did: the demo's trunk is Dirac-initialised.
  line = next(l for l in first.stderr.splitlines() if "Initialised from scratch" in l)
  assert "Dirac" in line and "He/Xavier" not in line, line
  wd = _copy(finished_run, tmp_path)
  assert _steps(wd) == [2, 4]
  latest = checkpointing.latest_manager(wd)
  # Format 2: the run keeps a moving average of its parameters (SHARED_FLAGS).
  assert [checkpointing.checkpoint_format(latest, s) for s in (2, 4)] == [
      checkpointing.FORMAT] * 2 == [2, 2]
  # The best checkpoint records which of the two validated the better (the lower loss), and
  # the report evaluated that one and says so.
  best = checkpointing.best_manager(wd)
  record = best.metrics(best.best_step())
  assert record["ema"] == (record["val_loss_ema"] < record["val_loss_plain"])
  assert record["val_loss"] == min(record["val_loss_ema"], record["val_loss_plain"])
  report = json.load(open(os.path.join(wd, "report", "report.json")))
  assert report["results"]["ema"] == record["ema"] and report["results"]["has_ema"]
  assert ("moving average" in report["metric_card"]["parameters"]) and (
      report["metric_card"]["parameters"].startswith(
          "the exponential" if record["ema"] else "the plain"))
  assert glob.glob(os.path.join(wd, "events.out.tfevents.*"))
  assert os.path.exists(os.path.join(wd, "report", "report.json"))
  with open(os.path.join(wd, "config.json")) as f:
    first_record = f.read()
  second = _main(wd, "--config.max_steps=8", *SHARED_FLAGS, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Resumed from" in second.stderr and "at step 4" in second.stderr
  assert "Initialised" not in second.stderr  # no re-initialisation
  assert checkpointing.latest_manager(wd).latest_step() == 8
  # The first start's record is kept; each start is appended with what changed (max_steps
  # is free to change).
  with open(os.path.join(wd, "config.json")) as f:
    assert f.read() == first_record and json.loads(first_record)["max_steps"] == 4
  history = _history(wd)
  assert [h["resumed_from_step"] for h in history] == [None, 4]
  assert history[1]["changed"] == {"max_steps": [4, 8]}
  assert history[1]["config"]["max_steps"] == 8


@pytest.mark.slow
def test_killed_run_resumes_from_last_complete_checkpoint(tmp_path):
  """Killed at any moment (its lock is stale then), the run resumes; a resume with another
  learning rate is refused and leaves the record as it was."""
  wd = str(tmp_path / "killed")
  proc = subprocess.Popen(_cmd(wd, "--config.max_steps=400"), cwd=ROOT, env=_ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = os.path.join(wd, "checkpoints", "latest")
  deadline = time.time() + 300
  while time.time() < deadline:
    done = [d for d in glob.glob(os.path.join(ckpt, "*")) if os.path.basename(d).isdigit()]
    if len(done) >= 2:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = checkpointing.latest_manager(wd).latest_step()
  assert killed_at is not None and killed_at < 400
  with open(os.path.join(wd, "run.lock")) as f:
    assert json.load(f)["pid"] == proc.pid  # the dead run's lock file is still there
  with open(os.path.join(wd, "config.json")) as f:
    first_record = f.read()
  changed = _main(wd, "--config.max_steps=%d" % (killed_at + 6),
                  "--config.optim.learning_rate=0.01", timeout=600)
  assert changed.returncode != 0
  assert "optim.learning_rate (0.0003 -> 0.01)" in changed.stderr
  assert "--config.allow_config_change=True" in changed.stderr
  assert checkpointing.latest_manager(wd).latest_step() == killed_at  # nothing trained
  with open(os.path.join(wd, "config.json")) as f:
    assert f.read() == first_record
  assert len(_history(wd)) == 1 and _history(wd)[0]["config"]["optim"]["learning_rate"] == 3e-4
  resumed = _main(wd, "--config.max_steps=%d" % (killed_at + 6), timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"at step {killed_at}" in resumed.stderr
  assert checkpointing.latest_manager(wd).latest_step() == killed_at + 6
  assert [h["resumed_from_step"] for h in _history(wd)] == [None, killed_at]


def test_nonfinite_state_is_never_checkpointed(finished_run, tmp_path):
  """A resume whose first step makes the optimizer state non-finite while its loss is still
  finite (a huge loss weight: the squared gradients overflow in Adam's second moment): the
  run stops before saving that state and names the newest checkpoint, which is finite."""
  wd = _copy(finished_run, tmp_path)
  result = _main(wd, "--config.max_steps=8", "--config.loss.gamma=1e30", *SHARED_FLAGS,
                 "--config.checkpoint_every_steps=1", "--config.allow_config_change=True",
                 timeout=600)
  assert result.returncode != 0
  assert "non-finite parameters or optimizer state after step 5" in result.stderr
  latest_dir = checkpointing.checkpoint_dir(wd, checkpointing.LATEST)
  assert f"the newest checkpoint, step 4 in {latest_dir}, holds finite values" in result.stderr
  assert _steps(wd) == [2, 4]
  assert all(_finite_everywhere(wd, step) for step in (2, 4))
  # The allowed change is recorded with the start it belongs to.
  last = _history(wd)[-1]
  assert last["resumed_from_step"] == 4
  assert last["changed"]["loss.gamma"] == [0.1, 1e30]


def test_damaged_latest_checkpoint_falls_back_to_the_newest_that_restores(finished_run,
                                                                           tmp_path):
  wd = _copy(finished_run, tmp_path)
  latest_dir = checkpointing.checkpoint_dir(wd, checkpointing.LATEST)
  arrays = sorted(glob.glob(os.path.join(latest_dir, "4", "default", "ocdbt.process_0", "d",
                                         "*")), key=os.path.getsize)
  with open(arrays[-1], "r+b") as f:  # the largest array file of step 4, cut in half
    f.truncate(os.path.getsize(arrays[-1]) // 2)
  shutil.copytree(os.path.join(latest_dir, "2"), os.path.join(latest_dir, "3"))
  os.remove(os.path.join(latest_dir, "3", "default", "_METADATA"))  # metadata missing
  os.mkdir(os.path.join(latest_dir, "5"))  # an empty step folder
  result = _main(wd, "--config.max_steps=6", *SHARED_FLAGS, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "at step 2" in result.stderr
  unusable = os.path.join(wd, "checkpoints", "unusable")
  for step, why in ((5, "metadata cannot be read"), (4, "arrays cannot be read"),
                    (3, "_METADATA is missing")):
    path = os.path.join(latest_dir, str(step))
    warning = next(l for l in result.stderr.splitlines()
                   if f"checkpoint {path} is unusable" in l and "moved to" in l)
    assert why in warning and f"rm -r {unusable}/latest_{step}" in warning, warning
  assert sorted(os.listdir(unusable)) == ["latest_3", "latest_4", "latest_5"]  # kept
  assert _steps(wd) == [4, 6]
  assert all(_finite_everywhere(wd, step) for step in (4, 6))


def test_second_run_on_a_workdir_in_use_stops_at_once(tmp_path):
  wd = str(tmp_path / "shared")
  log = tmp_path / "first.log"
  with open(log, "w") as f:
    first = subprocess.Popen(_cmd(wd, "--config.max_steps=6"), cwd=ROOT, env=_ENV,
                             stdout=subprocess.DEVNULL, stderr=f)
  try:
    deadline = time.time() + 300
    while time.time() < deadline and not _steps_on_disk(wd):
      assert first.poll() is None, log.read_text()[-3000:]
      time.sleep(0.2)
    first.send_signal(signal.SIGSTOP)  # the first run holds the workdir, frozen mid-run
    assert first.poll() is None
    try:
      second = _main(wd, "--config.max_steps=10", timeout=300)
    finally:
      first.send_signal(signal.SIGCONT)
    assert second.returncode != 0
    assert f"workdir {os.path.abspath(wd)} is in use by another run" in second.stderr
    assert f"host {socket.gethostname()}, pid {first.pid}" in second.stderr
    first.wait(timeout=600)
  finally:
    first.kill()
  assert first.returncode == 0, log.read_text()[-3000:]
  # The first run's results are its own: its steps, its config, one recorded start.
  assert _steps(wd) == [4, 6]
  with open(os.path.join(wd, "config.json")) as f:
    assert json.load(f)["max_steps"] == 6
  assert [h["config"]["max_steps"] for h in _history(wd)] == [6]
  with open(os.path.join(wd, "report", "report.json")) as f:
    assert json.load(f)["results"]["step"] == 6


def _steps_on_disk(workdir):
  path = checkpointing.checkpoint_dir(workdir, checkpointing.LATEST)
  return os.path.isdir(path) and [d for d in os.listdir(path) if d.isdigit()]


def test_invalid_config_fails_before_compiling(tmp_path):
  result = _main(str(tmp_path / "bad"), "--config.data.crop_size=64",
                 "--config.checkpoint_every_steps=0", "--config.log_every_steps=0",
                 "--config.optim.learning_rate=-0.001", "--config.stage1.learning_rate=inf",
                 "--config.eval_every_epochs=0", "--config.max_to_keep=0",
                 "--config.data.name=voc2007", "--config.data.source=local",
                 "--config.data.val_fraction=0", timeout=120)
  assert result.returncode != 0
  for message in ("must be smaller than data.image_size", "checkpoint_every_steps=0 must be",
                  "log_every_steps=0 must be", "eval_every_epochs=0 must be > 0",
                  "max_to_keep=0 must be", "optim.learning_rate=-0.001 must be a finite",
                  "stage1.learning_rate=inf must be a finite",
                  "data.val_fraction=0 without a data.val_split"):
    assert message in result.stderr
  assert not os.path.exists(tmp_path / "bad" / "checkpoints")


def test_unusable_splits_fail_before_training(tmp_path):
  """An empty test split (it used to fail after all the training) and a validation split
  smaller than one evaluation batch stop the run before anything is compiled or saved."""
  wd = tmp_path / "splits"
  result = _main(str(wd), "--config.data.demo.num_test=0", "--config.data.demo.num_val=4",
                 "--config.max_steps=2", timeout=300)
  assert result.returncode != 0
  assert "the test split (demo:test) is empty" in result.stderr
  assert "has 4 examples, fewer than one evaluation batch (eval.batch_size=8)" in result.stderr
  assert "eval.allow_small_val=True" in result.stderr
  assert "Training" not in result.stderr
  assert not os.path.exists(wd / "checkpoints")


def _voc_tree(root, splits):
  """A VOCdevkit/VOC2007 folder: ``splits`` {name: (number of images, readable?)}; every
  image holds a dog."""
  from test_data_sources import _jpeg_bytes, _rgb, _write_voc_xml
  for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
    os.makedirs(os.path.join(root, sub))
  n = 0
  for split, (count, readable) in splits.items():
    ids = [f"{n + i:06d}" for i in range(count)]
    n += count
    for i, id_ in enumerate(ids):
      _write_voc_xml(os.path.join(root, "Annotations", f"{id_}.xml"),
                     [("dog", 0, (1, 2, 25, 20))])
      data = _jpeg_bytes(_rgb(40, 50, seed=i)) if readable else b"not an image" * 10
      with open(os.path.join(root, "JPEGImages", f"{id_}.jpg"), "wb") as f:
        f.write(data)
    with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
      f.write("\n".join(ids) + "\n")
  return root


@pytest.mark.slow
def test_validation_pass_that_scores_no_image_stops_the_run(tmp_path):
  """Every validation image unreadable: the validation loss used to be 0.00000, kept as the
  best, and the run ended with a report and exit 0."""
  root = _voc_tree(str(tmp_path / "VOCdevkit" / "VOC2007"),
                   {"train": (16, True), "val": (8, False), "test": (8, True)})
  wd = tmp_path / "run"
  # A VOC tree of 10 own classes: the tiny demo model (its compiled steps are the suite's).
  result = _main(str(wd), "--config.data.source=local", f"--config.data.data_dir={root}",
                 "--config.data.name=dogs", "--config.data.class_names=" + ",".join(
                     ["dog", "cat", "bird", "cow", "horse", "sheep", "car", "bus", "boat",
                      "train"]),
                 "--config.data.train_split=train", "--config.data.val_split=val",
                 "--config.eval_every_epochs=1", "--config.max_steps=4", timeout=600)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "validation pass over dogs:val: 0 of 8 images scored" in result.stderr
  assert "8 unreadable images" in result.stderr
  assert not checkpointing.has_steps(str(wd), checkpointing.BEST)
  assert not os.path.exists(wd / "report")


def test_evaluation_pass_that_scores_no_image_is_an_error(tmp_path):
  from rma_jax import evaluate
  from rma_jax.data import voc
  root = _voc_tree(str(tmp_path / "VOC2007"), {"test": (3, False)})
  source = voc.load_voc_split(root, "test")
  fn = jax.jit(lambda variables, images: {"scores": jnp.zeros((images.shape[0], 20))})
  with pytest.raises(ValueError, match="test: 0 of 3 images of .* could be scored"):
    evaluate.score_source(fn, {}, source, image_size=48, batch_size=4, desc="test",
                          mesh=parallel.make_mesh(jax.devices()[:1]))


def test_initialisation_log_says_what_was_done():
  notes = {init: init_lib.initial_params(tiny_config(**{"model.trunk_init": init}), {})[1]
           for init in ("he", "dirac")}
  assert "trunk convs He normal;" in notes["he"] and "Dirac" not in notes["he"]
  assert "trunk convs Dirac: identity" in notes["dirac"]


def test_check_sources_by_case():
  class Split:
    def __init__(self, n, name):
      self.n, self.name = n, name

    def __len__(self):
      return self.n

  def sources(train_n, val_n, test_n):
    return data_lib.Sources(Split(train_n, "tr"), Split(val_n, "va"), Split(test_n, "te"), ())

  config = tiny_config()
  config_checks.check_sources(config, sources(64, 8, 1))  # exactly one eval batch: fine
  for (n_train, n_val, n_test), needle in (((7, 8, 1), "fewer than one batch of 8"),
                                           ((64, 0, 1), "(va) is empty"),
                                           ((64, 7, 1), "eval.allow_small_val=True"),
                                           ((64, 8, 0), "(te) is empty")):
    with pytest.raises(ValueError, match=re.escape(needle)):
      config_checks.check_sources(config, sources(n_train, n_val, n_test))
  config.eval.allow_small_val = True
  config_checks.check_sources(config, sources(64, 1, 1))


@pytest.mark.slow
def test_baseline_learns_beyond_the_class_priors():
  """A real learning signal: the demo's baseline (its Dirac-initialised trunk included) fits
  32 canvases far below the loss of the best constant predictor, the training priors, which
  learning the head's biases alone would reach."""
  config = tiny_config(**{"model.name": "baseline", "loss.classification": "sigmoid_bce"})
  config.data.demo.num_train = 32
  sources = data_lib.get_sources(config.data, seed=0)
  labels = np.stack([sources.train[i]["labels"] for i in range(len(sources.train))])
  prior = labels.mean(0)
  prior_loss = -np.sum(prior * np.log(prior) + (1 - prior) * np.log(1 - prior))
  model = build.build_model(config, 10)
  mesh = parallel.make_mesh(jax.devices()[:1])
  tx = optimizer.make_optimizer(config.optim, lambda _: 1e-3)
  state = steps.create_train_state(model, tx, jax.random.key(0), (48, 48, 3), mesh)
  step = steps.jit_train_step(steps.LossConfig.from_config(config), mesh)
  losses = []
  it = data_lib.train_batches(sources.train, global_batch_size=8, image_size=64, crop_size=48,
                              seed=0, random_flip=False)
  for _, batch in zip(range(280), it):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  last = np.mean(losses[-40:])
  assert last < 0.8 * prior_loss, (prior_loss, losses[:5], last)


# --------------------------------------------------------------------------- loss and accumulation

NUM_REGIONS = 5
# The paper's anchors of regions 2..5 (§4.2), typed from the paper for the hand computation.
PAPER_ANCHORS = np.array([(0.5, 0.5), (0.5, -0.5), (-0.5, 0.5), (-0.5, -0.5)])


class _ScoresAndTheta(nn.Module):
  """A conv and two linear layers giving scores and K+1 transforms: the train step treats it
  like RMA, and it compiles in a fraction of the time. The transforms start far outside the
  constraints (sx > alpha, sy < beta, off the anchors), so L_loc is large."""

  @nn.compact
  def __call__(self, images):
    images = pixels.normalize(images, "unit")  # uint8 in, as the real models
    x = jnp.mean(nn.relu(nn.Conv(4, (3, 3), strides=2)(images)), axis=(1, 2))
    bias = jnp.tile(jnp.asarray([0.9, 0.05, 0.3, -0.2]), NUM_REGIONS + 1)
    theta = nn.Dense(4 * (NUM_REGIONS + 1), bias_init=lambda *_: bias)(x)
    return {"scores": nn.Dense(10)(x), "theta": theta.reshape(-1, NUM_REGIONS + 1, 4)}


def _uneven_batch():
  """8 uint8 images; rows 0, 2, 3 have no label and row 6 is padding (mask 0), so any split
  into two halves gives micro-batches with different numbers of counted images."""
  rng = np.random.default_rng(0)
  labels = (rng.random((8, 10)) < 0.3).astype(np.float32)
  labels[:, 7] = 1.0
  labels[[0, 2, 3]] = 0.0
  mask = np.ones(8, np.float32)
  mask[6] = 0.0
  return {"image": rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), "labels": labels,
          "mask": mask}


def _eq14_by_hand(scores, theta, labels, mask, gamma, alpha=0.5, beta=0.1, lambda1=0.01,
                  lambda2=0.1):
  """Eq. 7-14 written out from the paper (jnp, so that it can be differentiated too)."""
  num_pos = labels.sum(-1)
  counted = mask * (num_pos > 0)
  p = jax.nn.softmax(scores, axis=-1)
  per_cls = jnp.sum((p - labels / jnp.maximum(num_pos, 1)[:, None]) ** 2, axis=-1)
  l_cls = jnp.sum(per_cls * counted) / jnp.sum(counted)
  sx, sy, tx, ty = (theta[:, 1:, i] for i in range(4))  # regions 1..K
  l_s = jnp.sum(jnp.maximum(jnp.abs(sx) - alpha, 0) ** 2
                + jnp.maximum(jnp.abs(sy) - alpha, 0) ** 2, 1)
  l_a = 0.5 * jnp.sum((tx[:, 1:] - PAPER_ANCHORS[:, 0]) ** 2
                      + (ty[:, 1:] - PAPER_ANCHORS[:, 1]) ** 2, 1)  # regions 2..K
  l_p = jnp.sum(jnp.maximum(beta - sx, 0) + jnp.maximum(beta - sy, 0), 1)
  l_loc = jnp.sum((l_s + lambda1 * l_a + lambda2 * l_p) * mask) / jnp.sum(mask)
  return l_cls + gamma * l_loc, l_cls, l_loc


def _sgd_state(model, mesh):
  """SGD with rate 1: the parameter update of a step is minus the gradient it used."""
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
  return steps.create_train_state(model, tx, jax.random.key(0), (16, 16, 3), mesh)


def test_train_step_loss_and_gradient_are_eq14_by_hand():
  """The value the jitted train step reports and the gradient it applies are those of
  L_cls + gamma L_loc computed by hand (no torch): dropping gamma or L_loc would fail."""
  config = tiny_config(**{"loss.gamma": 0.5})
  loss_cfg = steps.LossConfig.from_config(config)
  mesh = parallel.make_mesh(jax.devices()[:1])
  model = _ScoresAndTheta()
  state = _sgd_state(model, mesh)
  params = jax.device_get(state.params)
  batch = _uneven_batch()
  new_state, metrics = steps.jit_train_step(loss_cfg, mesh)(state, batch)
  new_params = jax.device_get(new_state.params)

  def hand(p):
    out = model.apply({"params": p}, jnp.asarray(batch["image"]))
    return _eq14_by_hand(out["scores"], out["theta"], jnp.asarray(batch["labels"]),
                         jnp.asarray(batch["mask"]), gamma=0.5)

  loss, l_cls, l_loc = jax.jit(hand)(params)
  assert float(l_loc) > 0.5 and float(l_cls) > 0.01  # both terms matter
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["cls_loss"]), float(l_cls), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loc_loss"]), float(l_loc), rtol=1e-5)
  grads = jax.jit(jax.grad(lambda p: hand(p)[0]))(params)
  for g, p0, p1 in zip(jax.tree.leaves(grads), jax.tree.leaves(params),
                       jax.tree.leaves(new_params)):
    np.testing.assert_allclose(p0 - p1, g, rtol=1e-4, atol=1e-6)


def test_accumulated_gradient_equals_the_full_batch_gradient():
  """grad_accum_steps=2 on 4 devices gives the full-batch gradient and loss terms, though
  the two halves count different numbers of labelled and real images (a mean of the two
  halves' means would not). Clipping and Adam come after the accumulation, so they see the
  full-batch gradient."""
  config = tiny_config()
  loss_cfg = steps.LossConfig.from_config(config)
  mesh = parallel.make_mesh(jax.devices()[:4])
  model = _ScoresAndTheta()
  batch = _uneven_batch()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  batch = {k: jax.device_put(v, sharding) for k, v in batch.items()}
  init = jax.device_get(_sgd_state(model, mesh).params)
  results = {}
  for accum in (1, 2):
    state, metrics = steps.jit_train_step(loss_cfg, mesh, accum)(_sgd_state(model, mesh), batch)
    grads = jax.tree.map(lambda a, b: a - b, init, jax.device_get(state.params))
    results[accum] = grads, jax.device_get(metrics)
  (g1, m1), (g2, m2) = results[1], results[2]
  for key in ("loss", "cls_loss", "loc_loss", "grad_norm"):
    # float32 sums of the same terms in another order: relative differences ~1e-7.
    np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
    assert np.linalg.norm(b) > 0
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)


class _RecordingWriter(metric_writer.LoggingWriter):
  """The run's metric writer, keeping every scalar it is given."""

  def __init__(self):
    super().__init__()
    self.scalars = {}

  def write_scalars(self, step, scalars):
    for k, v in scalars.items():
      self.scalars.setdefault(k, {})[int(step)] = float(v)


@pytest.mark.slow
def test_accumulated_run_decays_at_the_first_optimizer_step_of_the_epoch(tmp_path, monkeypatch):
  """grad_accum_steps=2, a step decay at epoch 3: 32 images in global batches of 8 are 4
  optimizer steps per epoch, so the learning rate the optimizer applied (logged from its
  state) is 1e-3 for steps 1..12 and 1e-4 from step 13, the first of epoch 3; max_steps and
  the checkpoints count optimizer steps too."""
  writer = _RecordingWriter()
  monkeypatch.setattr(metric_writer, "create_writer", lambda *a, **k: writer)
  config = tiny_config(**{"model.name": "baseline", "loss.classification": "sigmoid_bce"})
  config.data.demo.num_train = 32
  config.optim.update(grad_accum_steps=2, schedule="step", decay_epochs=(3,),
                      decay_factor=0.1, learning_rate=1e-3, num_epochs=10)
  config.update(max_steps=14, log_every_steps=1, checkpoint_every_steps=1000)
  wd = str(tmp_path / "accum")
  result = train.train(config, wd)
  assert result["step"] == 14
  assert checkpointing.latest_manager(wd).latest_step() == 14
  lr = writer.scalars["train/learning_rate"]
  assert sorted(lr) == list(range(1, 15))
  np.testing.assert_allclose([lr[s] for s in range(1, 13)], 1e-3, rtol=1e-6)
  np.testing.assert_allclose([lr[13], lr[14]], 1e-4, rtol=1e-6)
  # The latest checkpoint's optimizer state holds the rate of its last update.
  restored = checkpointing.restore_replicated(*checkpointing.find_checkpoint(
      wd, checkpointing.LATEST))
  np.testing.assert_allclose(
      float(restored["opt_state"]["hyperparams"]["learning_rate"]), 1e-4, rtol=1e-6)


def test_train_step_differentiates_losses_total_loss(monkeypatch):
  """One Eq. 14: the loss the train step reports and differentiates is losses.total_loss
  (a change there, here a factor 3, reaches the step)."""
  config = tiny_config()
  loss_cfg = steps.LossConfig.from_config(config)
  mesh = parallel.make_mesh(jax.devices()[:1])
  model = _ScoresAndTheta()
  batch = _uneven_batch()
  plain = jax.device_get(steps.jit_train_step(loss_cfg, mesh)(_sgd_state(model, mesh), batch)[1])
  original = losses.total_loss

  def tripled(*args, **kwargs):
    loss, terms = original(*args, **kwargs)
    return 3 * loss, dict(terms, loss=3 * loss)

  monkeypatch.setattr(losses, "total_loss", tripled)
  scaled = jax.device_get(steps.jit_train_step(loss_cfg, mesh)(_sgd_state(model, mesh), batch)[1])
  np.testing.assert_allclose(scaled["loss"], 3 * plain["loss"], rtol=1e-6)
  np.testing.assert_allclose(scaled["grad_norm"], 3 * plain["grad_norm"], rtol=1e-5)


def _fixed_step(learning_rate):
  """An optimizer that ignores the gradient and adds -learning_rate to every parameter: a run
  whose gradient is fixed at 1 (under SGD with that rate)."""
  return optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (
          jax.tree.map(lambda u: jnp.full_like(u, -learning_rate), updates), state))


def test_moving_average_after_n_steps_of_a_fixed_gradient_is_the_closed_form():
  """The train step updates the moving average after each optimizer step: with p_k = p_0 - k
  (a fixed update) and decay d it is p_0 - (n - d (1 - d^n) / (1 - d)) after n steps; with
  the warm-up (w steps) the same recursion with d_k = d (1 - exp(-k / w)), here summed in
  float64. The parameters themselves are those of the same run without an average."""
  n, d, w = 5, 0.8, 3.0
  loss_cfg = steps.LossConfig.from_config(tiny_config())
  mesh = parallel.make_mesh(jax.devices()[:1])
  model = _ScoresAndTheta()
  batch = _uneven_batch()
  tx = optax.inject_hyperparams(_fixed_step)(learning_rate=1.0)
  for warmup in (0.0, w):
    state = steps.create_train_state(model, tx, jax.random.key(0), (16, 16, 3), mesh, ema=True)
    p0 = jax.device_get(state.params)
    for e, init in zip(jax.tree.leaves(jax.device_get(state.ema_params)), jax.tree.leaves(p0)):
      np.testing.assert_array_equal(e, init)  # the average starts at the parameters
    step = steps.jit_train_step(loss_cfg, mesh, ema_decay=d, ema_warmup_steps=warmup)
    for _ in range(n):
      state, _ = step(state, batch)
    if warmup == 0:
      shift = n - d * (1 - d ** n) / (1 - d)
    else:
      shift = 0.0
      for k in range(1, n + 1):
        dk = d * (1 - np.exp(-k / warmup))
        shift = dk * shift + (1 - dk) * k
    for p, e, init in zip(jax.tree.leaves(jax.device_get(state.params)),
                          jax.tree.leaves(jax.device_get(state.ema_params)),
                          jax.tree.leaves(p0)):
      np.testing.assert_allclose(p, init - n, rtol=1e-6, atol=1e-5)
      np.testing.assert_allclose(e, init - shift, rtol=1e-6, atol=1e-5)
  assert n - d * (1 - d ** n) / (1 - d) < shift < n  # the warm-up follows the parameters faster


# --------------------------------------------------------------------------- checkpoint format

FIXTURE_WORKDIR = os.path.join(ROOT, "tests", "fixtures", "workdir_dd9a62e")


@pytest.mark.slow
def test_a_workdir_of_checkpoint_format_0_restores_and_evaluates(tmp_path):
  """tests/fixtures/workdir_dd9a62e: a two-stage run written before checkpoints recorded
  their format and before the kernels became a building block. Its stage-2 train state
  restores as a resume restores it (parameters, Adam state, step) into this version's state;
  its stage-1 baseline initialises this version's attention model; its best checkpoint
  evaluates; and a step of a newer format is refused with both versions named. (What this
  version saves records format 1: test_main_job_resumes_and_writes_checkpoints_and_events.)"""
  wd = str(tmp_path / "run")
  shutil.copytree(FIXTURE_WORKDIR, wd)
  recorded = json.load(open(os.path.join(wd, "config.json")))
  config = tiny_config(**{f"model.{k}": recorded["model"][k]
                          for k in ("width", "x_dim", "hidden_dim", "z_dim")})
  config.eval.ten_view = False
  model = build.build_model(config, 10)
  mesh = parallel.make_mesh(jax.devices()[:1])
  tx = optimizer.make_optimizer(config.optim, lambda _: 1e-3)
  replicated = parallel.replicated(mesh)
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                        jax.eval_shape(lambda: steps.TrainState.create(
                            apply_fn=model.apply, tx=tx, params=model.init(
                                jax.random.key(0), jnp.zeros((1, 48, 48, 3)))["params"])))
  latest = checkpointing.latest_manager(wd)
  assert checkpointing.checkpoint_format(latest, 2) == 0
  state, step = checkpointing.restore_newest(latest, target)
  assert step == 2 and int(state.step) == 2
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(state.opt_state)) > 0  # Adam's

  stage1, step = checkpointing.load_params(os.path.join(wd, "stage1"))
  assert step == 2 and set(stage1) == set(models.vgg16_layer_names()) | {"head"}
  new = init_lib.init_rma_from_baseline(jax.device_get(state.params), stage1)
  for name in models.vgg16_layer_names():
    np.testing.assert_array_equal(new["trunk"][name]["kernel"], stage1[name]["kernel"])

  results = evaluate.evaluate_and_report(config, wd)
  assert results["step"] == 2 and 0 <= results["protocols"]["single_view@48"]["mAP"] <= 1

  newer = str(tmp_path / "newer")
  manager = checkpointing.latest_manager(newer)
  manager.save(5, args=checkpointing.ocp.args.StandardSave({"params": stage1}),
               custom_metadata={checkpointing.FORMAT_KEY: checkpointing.FORMAT + 1})
  manager.wait_until_finished()
  with pytest.raises(checkpointing.CheckpointFormatError,
                     match=rf"format {checkpointing.FORMAT + 1}, .* up to {checkpointing.FORMAT}"):
    checkpointing.load_params(newer, checkpointing.LATEST)


# --------------------------------------------------------------------------- user errors


def test_a_refused_config_is_one_line_and_exit_status_2(tmp_path):
  """A config refused for one cause: at most 3 lines on stderr, the cause naming its field,
  exit status 2, nothing written; --verbosity=1 adds the traceback."""
  wd = tmp_path / "refused"
  result = _main(str(wd), "--config.optim.schedule=linear", timeout=300)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-2000:]
  assert len(lines) <= 3, lines
  assert lines[-1] == ("error: invalid config: optim.schedule='linear': 'step', 'cosine' or "
                       "'constant'")
  assert "Traceback" not in result.stderr
  assert not os.path.exists(wd / "checkpoints")
  verbose = _main(str(wd), "--config.optim.schedule=linear", "--verbosity=1", timeout=300)
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr
  assert "ConfigError: invalid config: optim.schedule='linear'" in verbose.stderr


# --------------------------------------------------------------------------- a new trunk


class _TestTrunk(nn.Module):
  """A trunk added as docs/architecture.md says: ``trunk(images)`` is the feature map, and
  ``stride`` says how many input pixels a cell of it spans."""
  stride: ClassVar[int] = 16

  @nn.compact
  def __call__(self, images):
    x = nn.relu(nn.Conv(8, (3, 3), strides=4, name="stem")(images))
    return nn.relu(nn.Conv(16, (3, 3), strides=4, name="cells")(x))


@pytest.mark.parametrize("head", ["rma", "baseline"])
def test_a_trunk_added_by_the_documented_steps_trains_one_step(monkeypatch, head):
  """docs/architecture.md, "Add a trunk": a module, its builder in ``build.TRUNKS`` (one line),
  ``--config.model.trunk`` naming it. The config is valid, both heads build on it (the
  baseline with the trunk's layers at its top level), and one train step moves every
  parameter."""
  monkeypatch.setitem(build.TRUNKS, "test_trunk", lambda m: _TestTrunk())
  config = tiny_config(**{"model.trunk": "test_trunk", "model.name": head})
  config_checks.validate_config(config, num_devices=1)
  model = build.build_model(config, 10)
  mesh = parallel.make_mesh(jax.devices()[:1])
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  state = steps.create_train_state(model, tx, jax.random.key(0), (48, 48, 3), mesh)
  trunk = state.params["trunk"] if head == "rma" else state.params
  assert {"stem", "cells"} <= set(trunk)
  batch = next(data_lib.train_batches(data_lib.get_sources(config.data, seed=0).train,
                                      global_batch_size=8, image_size=64, crop_size=48,
                                      seed=0))
  before = jax.device_get(state.params)
  state, metrics = steps.jit_train_step(steps.LossConfig.from_config(config), mesh)(state, batch)
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       jax.device_get(state.params), before)
  assert min(jax.tree.leaves(moved)) > 0, moved
  config.model.trunk = "no_such_trunk"
  with pytest.raises(ValueError, match="model.trunk='no_such_trunk': one of"):
    config_checks.validate_config(config, num_devices=1)


# ------------------------------------------------------------------- what a run checks first


def test_evaluate_and_predict_refuse_another_architecture_than_trained(finished_run, tmp_path):
  """Evaluate and predict take the model the workdir trained: an override of an architecture
  field (K, the LSTM kind, the width) is refused in one line naming each field, recorded ->
  given, before a checkpoint is read, and the run's report is left as it was; the report
  records every architecture field."""
  wd = _copy(finished_run, tmp_path)
  report_json = os.path.join(wd, "report", "report.json")
  before = open(report_json, "rb").read()
  recorded = json.loads(before)["results"]["architecture"]
  trained = workdir_lib.flatten(_history(wd)[-1]["config"])
  assert recorded == {f: trained[f] for f in workdir_lib.ARCHITECTURE_FIELDS}
  k = recorded["model.num_regions"]
  result = _main(wd, "--mode=evaluate", f"--config.model.num_regions={k + 1}",
                 "--config.model.standard_lstm=True", timeout=300)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-2000:]
  assert lines[-1].startswith(f"error: cannot evaluate {wd} with another model than it "
                              "trained: ") and len(lines) <= 3, lines
  assert f"model.num_regions ({k} -> {k + 1})" in lines[-1]
  assert "model.standard_lstm (False -> True)" in lines[-1]
  assert open(report_json, "rb").read() == before
  image = tmp_path / "one.png"
  Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
  width = recorded["model.width"]
  result = _main(wd, "--mode=predict", f"--inputs={image}", f"--config.model.width={width // 2}",
                 timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert f"error: cannot predict with {wd} with another model than it trained: model.width " \
         f"({width} -> {width // 2})" in result.stderr
  assert "ScopeParamShapeError" not in result.stderr
  assert not os.path.exists(os.path.join(wd, "predictions"))


def test_a_workdir_that_is_a_file_is_refused_in_one_line(tmp_path):
  a_file = tmp_path / "notes.txt"
  a_file.write_text("not a folder")
  for workdir, mode in ((a_file, "train"), (a_file / "run", "evaluate")):
    result = _main(str(workdir), f"--mode={mode}", timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --workdir={workdir} ") and "a file, not a folder" in last
    assert "Traceback" not in result.stderr
  assert a_file.read_text() == "not a folder"


def test_a_run_refused_before_training_records_no_class_list(tmp_path):
  """classes.json pins the class list of every later run on the workdir: a run refused
  before its first step (here: ImageNet weights that are not there) does not write it."""
  wd = tmp_path / "refused"
  result = _main(str(wd), f"--config.init.pretrained={tmp_path / 'missing.npz'}", timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "missing.npz" in result.stderr.strip().splitlines()[-1]
  assert not os.path.exists(wd / data_lib.RUN_CLASSES_FILE)


def test_nan_advice_names_only_a_sane_checkpoint(finished_run, tmp_path):
  """After a rate that blows up (1e6), the checkpoints saved on the way are finite but
  already diverged: the advice names the newest sane one (step 4, the finished run's) and
  says what was checked, never a blown-up one."""
  wd = _copy(finished_run, tmp_path)
  result = _main(wd, "--config.max_steps=10", "--config.optim.learning_rate=1e6", *SHARED_FLAGS,
                 "--config.checkpoint_every_steps=1", "--config.max_to_keep=10",
                 "--config.allow_config_change=True", timeout=600)
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  latest_dir = checkpointing.checkpoint_dir(wd, checkpointing.LATEST)
  assert "the run stops here" in last
  assert f"step 4 in {latest_dir} is sane (finite, parameter norm" in last, last
  blown = [s for s in _steps(wd) if s > 4]
  assert blown, "the rate saved at least one finite, diverged checkpoint"
  for s in blown:
    assert re.search(rf"step {s}: (finite, parameter norm \S+, \S+x a fresh|\d+ non-finite)",
                     last), (s, last)
    assert os.path.join(latest_dir, str(s)) in last  # the ones to delete
  assert "and resume from step 4 with --config.allow_config_change=True" in last


def test_a_deleted_manifest_is_named_in_one_line_without_tracebacks(finished_run, tmp_path):
  """A step whose OCDBT manifest was deleted: a resume falls back to the step before it with
  one warning line naming the cause; evaluating a best checkpoint so damaged is refused in
  one line naming it. No TensorStore read is attempted, so no "Event loop is closed"
  tracebacks follow when the process ends."""
  wd = _copy(finished_run, tmp_path)
  latest_dir = checkpointing.checkpoint_dir(wd, checkpointing.LATEST)
  os.remove(os.path.join(latest_dir, "4", "default", "manifest.ocdbt"))
  result = _main(wd, *SHARED_FLAGS, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  said = [line for line in result.stderr.splitlines() if "latest/4" in line]
  assert len(said) == 1 and "is unusable (its OCDBT manifest default/manifest.ocdbt is " \
      "missing); resuming from step 2 instead" in said[0], said
  assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
  best_step = os.path.join(checkpointing.checkpoint_dir(wd, checkpointing.BEST), "4")
  os.remove(os.path.join(best_step, "default", "manifest.ocdbt"))
  result = _main(wd, "--mode=evaluate", timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: checkpoint {best_step} cannot be restored (FileNotFoundError: its OCDBT "
      f"manifest default/manifest.ocdbt is missing); it is damaged: delete it (rm -r "
      f"{best_step}) or restore it from a copy")
  assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr


# --------------------------------------------------------------------------- preemption


def _run_until(workdir, pattern, signum, *extra, timeout=300):
  """Starts the main job, sends ``signum`` once a stderr line matches ``pattern``, and
  returns (exit status, stderr, seconds from the signal to the exit)."""
  proc = subprocess.Popen(_cmd(workdir, *extra), cwd=ROOT, env=_ENV, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  lines, sent = [], None
  deadline = time.time() + timeout
  for line in proc.stderr:
    lines.append(line)
    if sent is None and re.search(pattern, line):
      proc.send_signal(signum)
      sent = time.time()
    assert time.time() < deadline, "".join(lines[-20:])
  proc.wait(timeout=60)
  assert sent is not None, "".join(lines[-20:])
  return proc.returncode, "".join(lines), time.time() - sent


def _arrays(workdir, step):
  restored = checkpointing.restore_replicated(checkpointing.latest_manager(workdir), step)
  return jax.tree.map(np.asarray, restored)


def test_sigterm_saves_the_step_in_flight_and_the_restart_is_exact(finished_run, tmp_path):
  """SIGTERM while training (checkpoints every 1,000 steps): the step in flight is saved, the
  run says where it stopped and exits 143 within 30 s; SIGTERM during the final evaluation
  stops it before any report file is written (exit 143); the restart finishes both, and its
  parameters, optimizer state, moving average of the parameters and scores equal the
  uninterrupted run's bitwise."""
  wd = str(tmp_path / "run")
  rc, stderr, seconds = _run_until(wd, r"\] Training 4 steps", signal.SIGTERM, *SHARED_FLAGS,
                                   "--config.max_steps=4", "--config.checkpoint_every_steps=1000")
  assert rc == 143 and seconds < 30, stderr[-3000:]
  saved = checkpointing.latest_manager(wd).all_steps()
  assert len(saved) == 1 and 1 <= saved[0] < 4, saved
  latest_dir = checkpointing.checkpoint_dir(wd, checkpointing.LATEST)
  assert stderr.strip().splitlines()[-1] == (
      f"SIGTERM: stopped after step {saved[0]} of 4, saved in {latest_dir}. Run the same "
      f"command to continue in {wd} (exit status 143: requeue the job)")
  assert "Traceback" not in stderr

  rc, stderr, seconds = _run_until(wd, r"Evaluating best checkpoint", signal.SIGTERM,
                                   *SHARED_FLAGS, "--config.max_steps=4",
                                   "--config.checkpoint_every_steps=1000")
  assert rc == 143 and seconds < 30, stderr[-3000:]
  assert f"at step {saved[0]}" in stderr and "Traceback" not in stderr
  assert stderr.strip().splitlines()[-1].startswith("SIGTERM: stopped during the evaluation")
  assert not os.path.exists(os.path.join(wd, "report"))
  reference = finished_run[0]
  ours, theirs = _arrays(wd, 4), _arrays(reference, 4)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs) and checkpointing.EMA in ours
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(a, b)

  done = _main(wd, *SHARED_FLAGS, "--config.max_steps=4", "--config.checkpoint_every_steps=1000",
               timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  with np.load(os.path.join(wd, "report", "scores.npz")) as a, \
      np.load(os.path.join(reference, "report", "scores.npz")) as b:
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _dev_shm():
  return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def test_sigterm_to_the_process_group_with_worker_processes_saves_and_leaves_nothing(
    tmp_path, monkeypatch):
  """SIGTERM to the whole process group (a scheduler's way, or Ctrl-C's), with 2 Grain worker
  processes, as the training starts them: they survive it (a worker killed while it started
  used to hang the run for ever), the step in flight is saved, the run starts no validation
  though every step validates (8 training images: 1 step per epoch; its checkpoint says the
  validation is due), exits 143 within 60 s and leaves no process, no /dev/shm entry and no
  leaked-shared-memory warning. The restart runs the due validation first: the best
  checkpoint is that step, with the loss the restart logs."""
  wd = str(tmp_path / "run")
  flags = ("--config.data.num_workers=2", "--config.data.demo.num_train=8",
           "--config.eval_every_epochs=1", "--config.checkpoint_every_steps=1000")
  shm_before = _dev_shm()
  proc = subprocess.Popen(_cmd(wd, *flags), cwd=ROOT, env=_ENV, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  run, seen, lines = psutil.Process(proc.pid), {}, []  # seen: pid -> (process, command line)
  reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
  reader.start()
  sent, deadline = None, time.time() + 300
  try:
    while proc.poll() is None and time.time() < deadline:
      for child in run.children(recursive=True):  # every process of the run, while it runs
        if child.pid not in seen:
          try:
            seen[child.pid] = (child, " ".join(child.cmdline()))
          except psutil.Error:
            pass
      if sent is None and any("] Training 4 steps" in line for line in lines):
        os.killpg(proc.pid, signal.SIGTERM)
        sent, deadline = time.time(), time.time() + 60
      time.sleep(0.05)
  finally:
    if proc.poll() is None:  # hung: nothing is left behind, and the test fails below
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  reader.join(30)  # the end of stderr: every process of the run has closed it
  stderr = "".join(lines)
  assert sent is not None and proc.returncode == 143, stderr[-3000:]  # else killed at 60 s
  assert sum("spawn_main" in cmd for _, cmd in seen.values()) >= 2, seen  # the workers
  assert not [p for p, _ in seen.values() if _alive(p)]
  # New entries of another test's pipelines come and go; the run's would stay.
  left = _dev_shm() - shm_before
  for _ in range(100):
    left &= _dev_shm()
    if not left:
      break
    time.sleep(0.2)
  assert not left
  assert "leaked" not in stderr and "Traceback" not in stderr, stderr[-3000:]

  latest = checkpointing.latest_manager(wd)
  saved = latest.all_steps()
  assert len(saved) == 1 and 1 <= saved[0] < 4, saved
  step = saved[0]
  assert checkpointing.validation_due(latest, step)
  assert "val loss" not in stderr and not checkpointing.best_manager(wd).all_steps()
  assert stderr.strip().splitlines()[-1] == (
      f"SIGTERM: stopped after step {step} of 4, saved in {latest.directory}. Run the same "
      f"command to continue in {wd} (exit status 143: requeue the job)")

  # The restart, in this process and up to that step only: the due validation alone.
  writer = _RecordingWriter()
  monkeypatch.setattr(metric_writer, "create_writer", lambda *a, **k: writer)
  config = tiny_config(**{"data.demo.num_train": 8, "eval_every_epochs": 1,
                          "checkpoint_every_steps": 1000, "max_steps": step})
  assert train.train(config, wd)["best_step"] == step
  best = checkpointing.best_manager(wd)
  assert best.all_steps() == [step] and list(writer.scalars["val/loss"]) == [step]
  assert best.metrics(step)["val_loss"] == pytest.approx(writer.scalars["val/loss"][step])


def _alive(process, wait_s=10.0):
  """Whether ``process`` still runs ``wait_s`` seconds on (a zombie is not running)."""
  deadline = time.time() + wait_s
  while time.time() < deadline:
    try:
      if not process.is_running() or process.status() == psutil.STATUS_ZOMBIE:
        return False
    except psutil.NoSuchProcess:
      return False
    time.sleep(0.1)
  return True


def test_sigint_is_recorded_once_and_a_second_one_interrupts_at_once():
  """Ctrl-C: the first SIGINT is recorded (the run stops after saving, exit status 130), the
  second raises KeyboardInterrupt at once; leaving restores the previous handler."""
  # Python's own SIGINT handler, as in a terminal: a process started in the background by a
  # shell without job control (`cmd &` in a script) inherits SIGINT ignored, and the second
  # signal then goes to that (ignoring) handler.
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    _sigint_twice()
  finally:
    signal.signal(signal.SIGINT, outer)


def _sigint_twice():
  before = signal.getsignal(signal.SIGINT)
  with preemption.StopSignals() as stop:
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested and stop.signum == signal.SIGINT
    error = stop.stopped("stopped after step 3 of 4, saved in C", "W")
    assert error.exit_status == 130 and str(error) == (
        "SIGINT: stopped after step 3 of 4, saved in C. Run the same command to continue in W "
        "(exit status 130: requeue the job)")
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)  # the handler runs at once; this is never reached
  assert signal.getsignal(signal.SIGINT) is before


# --------------------------------------------------------------------------- storage faults


@pytest.fixture
def mounts():
  """Mounts a test asks for (a small tmpfs, a read-only bind), unmounted at its end; skips
  where this process may not mount (CI runs as root)."""
  made = []

  def mount(*args):
    if os.geteuid() != 0 or shutil.which("mount") is None:
      pytest.skip("mounting needs root")
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
      pytest.skip(f"cannot mount here: {r.stderr.strip()}")
    made.append(args[-1])

  yield mount
  for target in reversed(made):
    subprocess.run(["umount", "-l", target], capture_output=True)


def _stderr_after_training_started(stderr):
  lines = stderr.strip().splitlines()
  start = next(i for i, line in enumerate(lines) if "] Training " in line)
  return lines[start + 1:]


def test_a_full_disk_stops_the_run_in_one_message_and_the_restart_is_exact(
    finished_run, tmp_path, mounts):
  """A 3 MB file system holds three of the tiny run's checkpoints: the save that runs out of
  space stops the run with one message naming the folder and the cause (Orbax's own error
  lines without their tracebacks), every earlier checkpoint intact; with space freed, the
  same command finishes with the uninterrupted run's parameters, bitwise."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mounts("-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk))
  wd = str(disk / "run")
  args = (*SHARED_FLAGS, "--config.checkpoint_every_steps=1", "--config.max_to_keep=100")
  full = _main(wd, *args, timeout=300)
  assert full.returncode == 2, full.stderr[-3000:]
  tail = _stderr_after_training_started(full.stderr)
  latest_dir = checkpointing.checkpoint_dir(wd, checkpointing.LATEST)
  assert tail[-1].startswith("error: ") and f"in {latest_dir} failed: the disk is full. " \
      "Training stopped there" in tail[-1], tail
  assert "Traceback" not in full.stderr and "Event loop is closed" not in full.stderr
  library = [line for line in tail if not re.search(r"\] (step \d+|Training|Resumed)", line)]
  assert len(library) <= 12, library  # a line per failed Orbax operation (no traceback), ours
  good = _steps(wd)
  assert 1 <= len(good) < 4 and good == list(range(1, len(good) + 1)), good
  assert all(_finite_everywhere(wd, s) for s in good)
  subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
  done = _main(wd, *args, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"at step {good[-1]}" in done.stderr
  ours, theirs = _arrays(wd, 4), _arrays(finished_run[0], 4)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_read_only_checkpoint_folder_stops_the_run_at_once(tmp_path, mounts):
  """The checkpoint folder turns read-only mid-run: the run stops within a minute (no thread
  left waiting on the failed save keeps it alive), in one message naming the cause, and the
  workdir can be used again once it ended."""
  wd = str(tmp_path / "run")
  log = open(tmp_path / "stderr.txt", "w")  # a file: a pipe nobody reads could fill and block
  proc = subprocess.Popen(_cmd(wd, "--config.max_steps=400", "--config.checkpoint_every_steps=1",
                               "--config.max_to_keep=100"),
                          cwd=ROOT, env=_ENV, stdout=subprocess.DEVNULL, stderr=log)
  ckpts = os.path.join(wd, "checkpoints")
  deadline = time.time() + 300
  while len([d for d in glob.glob(os.path.join(ckpts, "latest", "*"))
             if os.path.basename(d).isdigit()]) < 2:
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.1)
  mounts("--bind", ckpts, ckpts)
  # A remount read-only is refused (busy) while a file on it is open for writing: retry
  # until it falls between two of the run's writes.
  deadline = time.time() + 30
  while subprocess.run(["mount", "-o", "remount,ro,bind", ckpts],
                       capture_output=True).returncode != 0:
    assert time.time() < deadline and proc.poll() is None, "could not remount read-only"
    time.sleep(0.01)
  started = time.time()
  try:
    proc.wait(timeout=60)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail("the run hung after its checkpoint folder became read-only")
  finally:
    log.close()
  assert time.time() - started < 60
  stderr = (tmp_path / "stderr.txt").read_text()
  assert proc.returncode == 2, stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "failed: the file system is read-only" in last, last
  assert "Traceback" not in stderr
  with workdir_lib.hold(wd):  # the lock died with the process
    pass


# The main job with every checkpoint's last act (Orbax's rename of the finished temporary
# folder to its step's name) put off by RMA_TEST_FINALIZE_SECONDS: a save is then surely in
# progress while its temporary folder exists.
_SLOW_SAVE_MAIN = r"""
import asyncio, os, runpy, sys
from orbax.checkpoint._src.path import atomicity

_finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize(self):
  await asyncio.sleep(float(os.environ["RMA_TEST_FINALIZE_SECONDS"]))
  await _finalize(self)

atomicity.AtomicRenameTemporaryPath.finalize = finalize
sys.argv = ["rma_jax.main"] + sys.argv[1:]
runpy.run_module("rma_jax.main", run_name="__main__", alter_sys=True)
"""


def test_a_second_sigterm_during_the_save_leaves_a_restorable_workdir(finished_run, tmp_path):
  """Two SIGTERMs: the second comes while the first one's save is being written (its
  temporary folder exists; the save is slowed) and ends the process at once (default
  action). The checkpoint is absent, not partial, and the same command then finishes with
  the uninterrupted run's parameters."""
  wd = str(tmp_path / "run")
  args = (*SHARED_FLAGS, "--config.max_steps=4", "--config.checkpoint_every_steps=1000")
  proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE_MAIN, *_cmd(wd, *args)[3:]],
                          cwd=ROOT, env=dict(_ENV, RMA_TEST_FINALIZE_SECONDS="5"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if re.search(r"\] Training 4 steps", line):
      proc.send_signal(signal.SIGTERM)
      break
  latest = checkpointing.checkpoint_dir(wd, checkpointing.LATEST)
  deadline = time.time() + 60
  while not glob.glob(os.path.join(latest, "*.orbax-checkpoint-tmp*")):
    assert time.time() < deadline and proc.poll() is None, "".join(lines[-20:])
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGTERM, "".join(lines[-20:])
  assert _steps(wd) == [] and glob.glob(os.path.join(latest, "*.orbax-checkpoint-tmp*"))
  done = _main(wd, *args, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "from step 0" in done.stderr
  for a, b in zip(jax.tree.leaves(_arrays(wd, 4)), jax.tree.leaves(_arrays(finished_run[0], 4)),
                  strict=True):
    np.testing.assert_array_equal(a, b)
