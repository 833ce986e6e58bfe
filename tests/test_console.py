"""The console: library INFO lines are dropped unless --verbosity=1 (our lines and every
warning stay), and the ETAs of ``console.JobClock`` equal the true time left once the costs
are measured, so they do not jump after a validation; the job's ETA is a lower bound while
any part of it is borrowed."""

import logging
import os

from absl import logging as absl_logging
import ml_collections
import pytest

from rma_jax import console, optimizer


def _record(pathname, level=logging.INFO, name="absl", msg="Saving checkpoint at step 2"):
  return logging.LogRecord(name, level, pathname, 1, msg, (), None)


@pytest.fixture
def verbosity():
  before = absl_logging.get_verbosity()
  yield absl_logging.set_verbosity
  absl_logging.set_verbosity(before)


def test_library_info_lines_only_at_verbosity_1(verbosity):
  orbax = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
  ours = os.path.join(console.PACKAGE_DIR, "train.py")
  keep = console.LibraryChatterFilter().filter
  verbosity(0)
  assert not keep(_record(orbax))
  assert not keep(_record("/venv/site-packages/clu/metric_writers/logging_writer.py"))
  assert not keep(_record("/venv/jax/_src/xla_bridge.py", name="jax._src.xla_bridge"))
  assert not keep(_record(orbax, logging.WARNING, msg="Given directory is read only=%s"))
  assert keep(_record(orbax, logging.WARNING, msg="checkpoint is damaged"))
  assert keep(_record(orbax, logging.ERROR))
  assert keep(_record(ours))  # absl.logging from an rma_jax module
  assert keep(_record("/anywhere/factory.py", name="rma_jax.data.factory"))  # std logger
  verbosity(1)
  assert keep(_record(orbax)) and keep(_record(orbax, logging.DEBUG))


def _config(epochs=10, batch=10, eval_every_epochs=2, max_steps=-1):
  c = ml_collections.ConfigDict()
  c.optim = ml_collections.ConfigDict({"num_epochs": epochs, "batch_size": batch})
  c.max_steps = max_steps
  c.eval_every_epochs = eval_every_epochs
  c.data = ml_collections.ConfigDict({"image_size": 64})
  c.eval = ml_collections.ConfigDict({"ten_view": True, "scales": (64, 80)})
  return c


class FakeTime:
  def __init__(self):
    self.t = 1000.0

  def __call__(self):
    return self.t


def _run_stage(clock, time, config, *, step_s, val_s, num_train, num_val, num_test, seen):
  """Steps through one stage: each step takes ``step_s``, each validation ``val_s``; records
  (step, stage ETA, job ETA, lower bound) after every step."""
  plan = optimizer.StepPlan.from_config(config, num_train)
  clock.start_stage(plan, 0, num_train=num_train, num_val=num_val, num_test=num_test)
  time.t += 7.0  # the first step compiles: not timed
  clock.step_done(1)
  for step in range(2, plan.total_steps + 1):
    time.t += step_s
    clock.step_done(step)
    seen.append((step, clock.stage_eta(), *clock.job_eta()))
    if plan.validates_at(step):
      time.t += val_s
      clock.validation_done(val_s, num_val)
  clock.stage_done()
  return plan


def test_stage_and_job_eta_are_the_time_left_once_measured():
  time = FakeTime()
  first, second = _config(), _config(epochs=5)
  clock = console.JobClock([("stage 1", first), ("stage 2", second)], eval_config=second,
                           now=time)
  n_val, n_test = 20, 30
  seen = []
  plan1 = _run_stage(clock, time, first, step_s=1.0, val_s=4.0, num_train=100,
                     num_val=n_val, num_test=n_test, seen=seen)
  assert (plan1.total_steps, plan1.eval_every) == (100, 20)
  eval_bound = console.evaluation_passes(second) * n_test * 4.0 / n_val  # 4 passes x 6 s
  for step, eta, job, lower_bound in seen:
    left = (100 - step) * 1.0 + plan1.validations_after(step) * 4.0
    if step > 20:  # the first validation is timed: exact, no jump at later ones
      assert eta == pytest.approx(left), step
      # Stage 2 borrows stage 1's costs (50 steps, 3 validations) and the evaluation is a
      # bound from the validation's time per image: the job ETA says ">=".
      assert job == pytest.approx(left + 50 * 1.0 + 3 * 4.0 + eval_bound), step
      assert lower_bound
    elif step < 20:
      # Before the first validation: its cost estimated from the step's (a forward pass is
      # a third of a step per image), the job ETA unknown (no time per image yet).
      assert eta == pytest.approx(left - 5 * 4.0 + 5 * (n_val / 10) * 1.0 / 3), step
      assert job is None
  seen.clear()
  _run_stage(clock, time, second, step_s=2.0, val_s=6.0, num_train=100, num_val=n_val,
             num_test=n_test, seen=seen)
  for step, eta, job, lower_bound in seen:
    vals = optimizer.StepPlan.from_config(second, 100).validations_after(step)
    left = (50 - step) * 2.0 + vals * (6.0 if step > 20 else 4.0)  # stage 1's until timed
    assert eta == pytest.approx(left), step
    assert job == pytest.approx(left + console.evaluation_passes(second) * n_test * 6.0 / n_val
                                if step > 20 else left + eval_bound), step
    assert lower_bound  # the evaluation is never timed before it runs
  line = clock.progress_line(0.1234)
  assert line.startswith("step 50/50 (100%): loss 0.1234, 0.5 steps/s, ETA 0s, job ETA >= ")


def test_a_training_run_alone_shows_no_job_eta():
  time = FakeTime()
  config = _config(epochs=2, eval_every_epochs=1)
  clock = console.JobClock([("Training", config)], now=time)
  seen = []
  _run_stage(clock, time, config, step_s=0.5, val_s=1.0, num_train=100, num_val=10,
             num_test=10, seen=seen)
  # Step 19 of 20: one step and the last validation left, both timed.
  assert seen[-2] == (19, pytest.approx(1.5), pytest.approx(1.5), False)
  assert "job ETA" not in clock.progress_line(1.0)


def test_durations():
  assert [console.duration(s) for s in (0, 12.4, 247, 11100)] == ["0s", "12s", "4m07s",
                                                                 "3h05m"]
