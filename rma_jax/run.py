r"""The main job: the paper's two-step recipe, then the final evaluation (paper §5.1).

    python -m rma_jax.main --config=configs/demo.py --workdir=/tmp/rma_demo

``train_and_evaluate`` trains, when ``config.stage1.num_epochs > 0``, stage 1 (the VGG-16
baseline, ``stage1_config``) in ``WORKDIR/stage1``, then the config's model in WORKDIR with
its trunk from stage 1; it then evaluates the best checkpoint on the test split and writes
``WORKDIR/report/report.md``. The console shows one line at the start of each stage,
progress with steps/s and ETAs (``rma_jax.console``), one line per validation, and a
summary naming the report.

**The stage-1 recipe.** The paper (§5.1) fine-tunes the ImageNet VGG-16 on the target data
before the attention model is built from it, and gives one optimisation recipe: Adam,
batch 16, lr 1e-5 divided by 10 after 30 of 45 epochs. It gives no other for stage 1, so
stage 1 uses the same recipe, shortened: the base config's optimizer settings (schedule
kind, warm-up, clipping, batch) with ``stage1.learning_rate`` for ``stage1.num_epochs``
epochs, a step decay at the same fraction of the run (``optim.decay_epochs`` scaled by
``stage1.num_epochs / optim.num_epochs``: 30 of 45 becomes 13.3 of 20), and the loss
``stage1.classification``. ``configs/voc_baseline.py`` and the ablations use this function.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import ml_collections

from rma_jax import config_checks, console, context, evaluate, preemption, train
from rma_jax import workdir as workdir_lib

STAGE1_DIR = "stage1"


def stage1_config(config: ml_collections.ConfigDict,
                  num_epochs: float | None = None) -> ml_collections.ConfigDict:
  """The stage-1 baseline run of the two-step recipe (module docstring), from ``config``.

  Args:
    config: the attention model's config.
    num_epochs: the run's length; default ``config.stage1.num_epochs`` (the equal-budget
      baselines of the ablations train longer with the same recipe).

  Returns:
    A new config: ``model.name='baseline'``, the stage-1 learning rate, epochs and loss,
    no stage 1 of its own and no ``init.from_checkpoint`` (``init.pretrained`` is kept).
  """
  epochs = config.stage1.num_epochs if num_epochs is None else num_epochs
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.name = "baseline"
  c.optim.num_epochs = epochs
  c.optim.learning_rate = config.stage1.learning_rate
  if config.optim.schedule == "step" and config.optim.num_epochs > 0:
    scale = epochs / config.optim.num_epochs
    c.optim.decay_epochs = tuple(e * scale for e in config.optim.decay_epochs)
  c.loss.classification = config.stage1.classification
  c.stage1.num_epochs = 0
  c.init.from_checkpoint = ""
  return c


def stages(config: ml_collections.ConfigDict, workdir: str
           ) -> list[tuple[str, ml_collections.ConfigDict, str]]:
  """(name, config, workdir) of each training stage of ``train_and_evaluate``."""
  if config.model.name != "rma" or config.stage1.num_epochs <= 0:
    return [("Training", config, workdir)]
  stage1_dir = os.path.join(workdir, STAGE1_DIR)
  second = ml_collections.ConfigDict(config.to_dict())
  second.init.from_checkpoint = stage1_dir
  return [("Stage 1 of 2: the baseline", stage1_config(config), stage1_dir),
          ("Stage 2 of 2: the attention model", second, workdir)]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains every stage (resuming from ``workdir`` where checkpoints are), then evaluates
  the best checkpoint on the test split and writes the report.

  The config is checked once, the workdir held once for the whole job (both stages and the
  report), each stage's resume checked against its record before anything is opened, and
  the data opened once (``context.open_run``): the stages and the evaluation share the splits
  and the class list.

  Returns:
    the last stage's ``train.train`` summary with ``test``, the results of
    ``evaluate.evaluate_and_report``, and ``report``, the path of report.md.
  """
  config_checks.validate_config(config)
  plan = stages(config, workdir)
  final = plan[-1][1]
  clock = console.JobClock([(name, c) for name, c, _ in plan], eval_config=final)
  with workdir_lib.hold(workdir), preemption.StopSignals() as stop:
    changes = [train.check_resume(c, stage_dir) for _, c, stage_dir in plan]
    ctx = context.open_run(config, [stage_dir for _, _, stage_dir in reversed(plan)])
    for (name, stage_config, stage_dir), stage_changes in zip(plan, changes):
      if len(plan) > 1:  # a single stage starts with the loop's "Training N steps" line
        logging.info("%s in %s", name, stage_dir)
      summary = train.train_stage(stage_config, stage_dir, ctx, stage_changes, clock, stop)
    # The test split is touched only here, after training.
    summary["test"] = evaluate.evaluate_and_report(final, workdir, ctx=ctx, stop=stop)
  summary["report"] = os.path.join(evaluate.report_dir(workdir), "report.md")
  test = summary["test"]
  h = test["protocols"][test["headline"]]
  logging.info("Done in %s. %s %s: mAP %.1f %% (%s), CF1 %.1f %%, OF1 %.1f %%. Report: %s",
               console.duration(clock.elapsed()), test["split"], test["headline"],
               100 * h["mAP"], h["ap_mode"], 100 * h["CF1"], 100 * h["OF1"],
               summary["report"])
  return summary
