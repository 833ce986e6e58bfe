"""What a person reads while a job runs: our own lines, and the libraries' only when asked.

**Library chatter.** Orbax logs a dozen INFO lines per checkpoint (manager option dumps,
"Renaming ... tmp", "Finished saving"), clu dumps the hyperparameters and every scalar, JAX
probes backends. ``quiet_library_logs`` drops every INFO line that does not come from
``rma_jax`` unless ``--verbosity=1`` (or higher); warnings and errors always pass. Orbax and
clu log through ``absl.logging`` (the logger ``absl``, whose records carry the calling file's
path), JAX and our data modules through standard ``logging`` loggers, and all of them reach
absl's one handler on the root logger, so one filter there sees every record: a record is
ours when its logger is ``rma_jax.*`` or its file is in this package. (The old filter in
``main`` compared ``record.levelno``, a Python level such as INFO = 20, with
``absl.logging.WARNING``, which is absl's verbosity -1, so it let every record through, on a
terminal or not.)

**Progress.** ``JobClock`` times a job (the training stages, then the final evaluation) and
writes the progress lines: steps/s, the stage's ETA and the whole job's. Step time is
measured on training alone (compilation and validation passes excluded), validation time per
pass separately, so the ETA does not jump after each validation. Costs not measured yet are
borrowed from what has been: a later stage's step from the current stage's (its model is at
least as large: the same trunk, plus the attention module), the final evaluation from the
validation's time per image and pass (ten-view passes cost more). Such an estimate is a
lower bound and the job ETA says so with ``>=``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Callable, Sequence

from absl import logging as absl_logging
import ml_collections

from rma_jax import optimizer

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


# Library warnings that are not, or that a run says in its own words: Orbax warns whenever a
# manager is opened read-only (how checkpoints are read for evaluation and initialisation),
# and several times per host at JAX's preemption sync point (rma_jax.preemption logs one line).
_NOT_WARNINGS = ("Given directory is read only", "Reached preemption sync point")


class LibraryChatterFilter(logging.Filter):
  """Keeps warnings, errors and ``rma_jax``'s own lines; the rest only at --verbosity >= 1."""

  def filter(self, record: logging.LogRecord) -> bool:
    if absl_logging.get_verbosity() >= 1:
      return True
    if record.name.startswith("rma_jax") or record.pathname.startswith(PACKAGE_DIR):
      return True
    # A library error keeps its line, not its traceback: a failed checkpoint write makes
    # Orbax log three, and the run's own message says what failed and what to do.
    record.exc_info, record.exc_text = None, None
    message = record.getMessage()
    if "\n" in message:
      record.msg, record.args = message.splitlines()[0] + " [...]", None
    return record.levelno >= logging.WARNING and not any(w in message for w in _NOT_WARNINGS)


def _quiet_unraisable(unraisable) -> None:
  """``sys.unraisablehook`` without asyncio's "Event loop is closed", which TensorStore's
  callbacks raise after Orbax closed the loop of a failed write (dozens per failure)."""
  if (absl_logging.get_verbosity() < 1 and isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == "Event loop is closed"):
    return
  sys.__unraisablehook__(unraisable)


def quiet_library_logs() -> None:
  """Installs ``LibraryChatterFilter`` on absl's handler (once; notebooks may call it too),
  and an unraisable-exception hook without TensorStore's "Event loop is closed" floods."""
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, LibraryChatterFilter) for f in handler.filters):
    handler.addFilter(LibraryChatterFilter())
  if sys.unraisablehook is sys.__unraisablehook__:
    sys.unraisablehook = _quiet_unraisable


def duration(seconds: float) -> str:
  """``3h05m``, ``4m07s`` or ``12s``."""
  seconds = max(0, int(round(seconds)))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# A forward pass costs about a third of a training step (forward + backward) per image: the
# validation estimate until the first validation is timed.
_FORWARD_SHARE = 1.0 / 3.0


@dataclasses.dataclass
class _Stage:
  name: str
  config: ml_collections.ConfigDict
  plan: optimizer.StepPlan | None = None  # once the training split's size is known
  step: int = 0
  train_seconds: float = 0.0  # measured steps only (after the first of a start)
  timed_steps: int = 0
  val_seconds: float | None = None  # the latest validation pass
  val_images: int = 0
  done: bool = False


class JobClock:
  """Times a job's training stages and final evaluation; formats its progress lines.

  Args:
    stages: (name, config) of each training stage, in order (e.g. the baseline, then RMA).
    eval_config: the config of the final evaluation, or None when the job has none.
    now: the clock, in seconds.
  """

  def __init__(self, stages: Sequence[tuple[str, ml_collections.ConfigDict]],
               eval_config: ml_collections.ConfigDict | None = None, *,
               now: Callable[[], float] = time.monotonic):
    self._stages = [_Stage(name, config) for name, config in stages]
    self._eval_config = eval_config
    self._now = now
    self._index = -1
    self._num_test = 0
    self._num_val = 0
    self._started = now()
    self._mark: float | None = None

  @property
  def stage(self) -> _Stage:
    return self._stages[self._index]

  def start_stage(self, plan: optimizer.StepPlan, start_step: int, *, num_train: int,
                  num_val: int, num_test: int) -> None:
    """The next stage begins (its data is open and its state restored or initialised)."""
    self._index += 1
    self._num_val, self._num_test = num_val, num_test
    for later in self._stages[self._index + 1:]:
      later.plan = optimizer.StepPlan.from_config(later.config, num_train)
    stage = self.stage
    stage.plan, stage.step = plan, start_step
    self._mark = None

  def step_done(self, step: int) -> None:
    """Call after each step; the first of a start (compilation) is not timed."""
    now = self._now()
    stage = self.stage
    if self._mark is not None:
      stage.train_seconds += now - self._mark
      stage.timed_steps += step - stage.step
    stage.step = step
    self._mark = now

  def validation_done(self, seconds: float, num_images: int) -> None:
    self.stage.val_seconds, self.stage.val_images = seconds, num_images
    self._mark = self._now()  # the pass is not training time

  def stage_done(self) -> None:
    self.stage.done = True

  # ------------------------------------------------------------------------- estimates

  def _step_seconds(self, index: int) -> tuple[float | None, bool]:
    """(seconds per step of stage ``index``, whether it is measured)."""
    stage = self._stages[index]
    if stage.timed_steps:
      return stage.train_seconds / stage.timed_steps, True
    measured = [s for s in self._stages if s.timed_steps]
    if not measured:
      return None, False
    return measured[-1].train_seconds / measured[-1].timed_steps, False

  def _val_seconds(self, index: int) -> tuple[float | None, bool]:
    """(seconds per validation pass of stage ``index``, whether it is measured)."""
    stage = self._stages[index]
    if stage.val_seconds is not None:
      return stage.val_seconds, True
    measured = [s for s in self._stages if s.val_seconds is not None]
    if measured:  # the same validation split through a model at least as large
      return measured[-1].val_seconds, False
    step, _ = self._step_seconds(index)
    if step is None or stage.plan is None:
      return None, False
    in_train_batches = self._num_val / max(1, stage.config.optim.batch_size)
    return in_train_batches * step * _FORWARD_SHARE, False

  def _stage_left(self, index: int) -> tuple[float | None, bool]:
    stage = self._stages[index]
    if stage.done:
      return 0.0, True
    if stage.plan is None:
      return None, False
    step_s, step_known = self._step_seconds(index)
    val_s, val_known = self._val_seconds(index)
    if step_s is None or val_s is None:
      return None, False
    steps = stage.plan.total_steps - stage.step
    vals = stage.plan.validations_after(stage.step)
    return steps * step_s + vals * val_s, step_known and val_known

  def _evaluation_left(self) -> float | None:
    """A lower bound: each pass over the test split costs what a validation image did."""
    if self._eval_config is None:
      return 0.0
    measured = [s for s in self._stages if s.val_seconds is not None and s.val_images]
    if not measured:
      return None
    per_image = measured[-1].val_seconds / measured[-1].val_images
    return evaluation_passes(self._eval_config) * self._num_test * per_image

  def stage_eta(self) -> float | None:
    return self._stage_left(self._index)[0]

  def job_eta(self) -> tuple[float | None, bool]:
    """(seconds left in the whole job, whether a part of it is borrowed from elsewhere or
    bounded from below; the line then says '>=')."""
    total, exact = 0.0, True
    for i in range(self._index, len(self._stages)):
      left, known = self._stage_left(i)
      if left is None:
        return None, True
      total, exact = total + left, exact and known
    evaluation = self._evaluation_left()
    if evaluation is None:
      return None, True
    return total + evaluation, not exact or self._eval_config is not None

  # ------------------------------------------------------------------------- lines

  def progress_line(self, loss: float) -> str:
    """``step 50/744 (7%): loss 2.1034, 12.3 steps/s, ETA 1m00s, job ETA >= 2m30s``."""
    stage = self.stage
    total = stage.plan.total_steps
    parts = [f"step {stage.step}/{total} ({100 * stage.step / max(1, total):.0f}%): "
             f"loss {loss:.4f}"]
    if self.steps_per_second() is not None:
      parts.append(f"{self.steps_per_second():.1f} steps/s")
    eta = self.stage_eta()
    if eta is not None:
      parts.append(f"ETA {duration(eta)}")
    if len(self._stages) > 1 or self._eval_config is not None:
      job, lower_bound = self.job_eta()
      if job is not None:
        parts.append(f"job ETA {'>= ' if lower_bound else ''}{duration(job)}")
    return ", ".join(parts)

  def steps_per_second(self) -> float | None:
    stage = self.stage
    return stage.timed_steps / stage.train_seconds if stage.timed_steps else None

  def elapsed(self) -> float:
    return self._now() - self._started


def evaluation_passes(config: ml_collections.ConfigDict) -> int:
  """Passes over the test split the final evaluation makes (``evaluate_and_report``)."""
  e = config.eval
  return len(tuple(e.get("scales", ()) or (config.data.image_size,))) * (
      2 if e.ten_view else 1)

