"""Stopping on a signal without losing work: SIGTERM (a preempted or maintained VM, SLURM's
``--signal=TERM@60``) and SIGINT (Ctrl-C).

``StopSignals`` is held around a run (``rma_jax.run``, ``rma_jax.train.train``). The training
loop asks it after every step (``stop_at``); when a stop is due it saves that step, waits for
the save, writes the metrics and raises ``Preempted``, which ``rma_jax.main`` turns into one
line and the exit status schedulers read as "requeue" (``EXIT_STATUS``: 143 for SIGTERM, 130
for SIGINT, 128 + the signal as a shell reports a killed process). Running the same command
again resumes from that step exactly. A stop starts no validation pass: a step's validation
it skips is run by the restart first. Evaluation stops before it starts or between batches
and writes no report; the restart evaluates again.

* **One process**: a handler of ours records SIGTERM and SIGINT.
* **Several processes**: every host must save the same step. ``jax.distributed.initialize``
  installs JAX's own SIGTERM notifier, and JAX's preemption sync point (Orbax's
  ``CheckpointManager.reached_preemption``) becomes true on every process at the same step.
  A Python SIGTERM handler would replace JAX's notifier (the sync point would never come), so
  none is installed there; SIGINT, which JAX's notifier does not cover, keeps Python's
  default (the hosts could not agree on a step for it).

After the first signal the previous handler is back: a second SIGTERM or SIGINT ends the
process at once. A checkpoint being written then is absent, never partial (Orbax writes into a
temporary folder and renames it when complete), and the restart takes the newest complete one.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from absl import logging
import jax

EXIT_STATUS = {signal.SIGTERM: 143, signal.SIGINT: 130}
"""The exit status of a run stopped by each signal (128 + the signal's number)."""


class Preempted(Exception):
  """A run stopped by a signal; the message says where it stopped and how to continue."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.exit_status = EXIT_STATUS.get(signum, 128 + int(signum))


class StopSignals:
  """Records SIGTERM / SIGINT while held (``with StopSignals() as stop:``); see the module
  docstring for which signals a multi-process run handles itself."""

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():  # signals reach it only
      wanted = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
      for signum in wanted:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      if signal.getsignal(signum) == self._handle:
        signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    self.signum = signum
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second one acts
    logging.warning("%s received: stopping once the current step is saved (send it again to "
                    "stop at once)", signal.Signals(signum).name)

  @property
  def requested(self) -> bool:
    """Whether this process received a signal to stop (evaluation checks it per batch)."""
    return self.signum is not None

  def stop_at(self, step: int, manager: Any) -> bool:
    """Whether training stops after ``step``: on every process at the same step (call it on
    every process after every step). ``manager``: the checkpoint manager whose
    ``reached_preemption`` is JAX's sync point."""
    if jax.process_count() > 1 and manager.reached_preemption(step):
      if self.signum is None:
        logging.warning("SIGTERM reached a process of %d: every process stops after step %d "
                        "once it is saved (JAX's preemption sync point)", jax.process_count(),
                        step)
      self.signum = self.signum or signal.SIGTERM
      return True
    return self.signum is not None and jax.process_count() == 1

  def stopped(self, what: str, workdir: str | None = None) -> Preempted:
    """The ``Preempted`` error of a run in ``workdir`` that ``what`` says how it stopped
    (e.g. 'stopped after step 15, saved in ...')."""
    signum = self.signum or signal.SIGTERM
    where = f" in {workdir}" if workdir else ""
    return Preempted(signum, f"{signal.Signals(signum).name}: {what}. Run the same command "
                     f"to continue{where} (exit status {EXIT_STATUS.get(signum)}: requeue "
                     "the job)")
