"""The training loop: one stage of training in one workdir (docs/design.md §3).

``train_stage`` builds the model and optimizer, starts from the state
``rma_jax.init.initial_state`` chooses (resume, stage-1 checkpoint, ImageNet weights or
scratch), then steps: metrics every ``log_every_steps``, a validation pass every
``eval_every_epochs`` (the best checkpoint by validation loss, paper §5.1; with
``optim.ema_decay > 0`` the plain parameters and their moving average are both validated and
the lower loss wins, ``select_on_validation``), the latest checkpoint every
``checkpoint_every_steps``. The steps themselves are ``rma_jax.steps``,
the validation pass ``rma_jax.evaluate.validation_fn``; ``train`` is one stage on its own,
and both stages of the paper's recipe and the final evaluation are ``rma_jax.run``.

Neither importing this module nor training imports TensorFlow: TensorBoard files are
written by ``rma_jax.metric_writer`` (TensorFlow is needed for TFDS data only).
"""

from __future__ import annotations

import time
from typing import Any

from absl import logging
from clu import parameter_overview
import jax
import ml_collections
import numpy as np
import optax

from rma_jax import (build, checkpointing, config_checks, console, context, errors, evaluate,
                     init, metric_writer, optimizer, parallel, preemption, steps)
from rma_jax import data as data_lib
from rma_jax import workdir as workdir_lib


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """One training run on its own, in one workdir: checks the config
  (``config_checks.validate_config``), holds the workdir (``rma_jax.workdir.hold``: a second
  run on it stops at once), checks a resume's config against the recorded one, opens the
  data and trains (``train_stage``).

  Returns:
    {'step', 'best_val_loss', 'best_step', 'best_ema', 'start_step'}: ``best_ema`` whether
    the best checkpoint's selected parameters are the moving average; ``start_step`` the step
    it started or resumed from.
  """
  config_checks.validate_config(config)
  with workdir_lib.hold(workdir), preemption.StopSignals() as stop:
    changes = check_resume(config, workdir)
    ctx = context.open_run(config, [workdir])
    return train_stage(config, workdir, ctx, changes, console.JobClock([("Training", config)]),
                       stop)


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> dict[str, tuple[Any, Any]]:
  """The config changes since the workdir's last recorded start; raises when a resume may
  not make them (``workdir.check_config``)."""
  return workdir_lib.check_config(config, workdir,
                                  checkpointing.has_steps(workdir, checkpointing.LATEST))


def train_stage(config: ml_collections.ConfigDict, workdir: str, ctx: context.RunContext,
                changes: dict[str, tuple[Any, Any]], clock: console.JobClock,
                stop: preemption.StopSignals | None = None) -> dict[str, Any]:
  """One stage of a run whose config is checked (``changes``: ``check_resume``'s), whose
  workdir is held and whose data is open (``ctx``), as the next stage of ``clock``'s job;
  returns as ``train``. With ``stop`` (held by the caller), a SIGTERM or SIGINT saves the
  step in flight and raises ``preemption.Preempted``."""
  is_chief = jax.process_index() == 0
  mesh, sources = ctx.mesh, ctx.sources
  o = config.optim
  # Every step count (schedule, warm-up, max_steps, logging, checkpoints, the ETA) is in
  # optimizer steps: one global batch, however many micro-batches the step accumulates.
  plan = optimizer.StepPlan.from_config(config, len(sources.train))

  # Model, optimizer, state: resumed or initialised (the order is in rma_jax.init).
  model = build.build_model(config, len(ctx.class_names))
  schedule = optimizer.learning_rate_schedule(o.learning_rate, o, plan.steps_per_epoch,
                                              plan.total_steps)
  tx = optimizer.make_optimizer(o, schedule)
  crop = config.data.crop_size
  state = steps.create_train_state(model, tx, jax.random.key(config.seed), (crop, crop, 3),
                                   mesh, ema=o.ema_decay > 0)
  latest = checkpointing.latest_manager(workdir, config.max_to_keep)
  best = checkpointing.best_manager(workdir)
  # A fresh initialisation's scale: what a checkpoint a NaN advice names is compared with.
  # Jitted: eagerly, each of its per-array operations compiles on its own (seconds for a
  # ResNet's arrays).
  fresh_norm = float(jax.jit(optax.global_norm)(state.params))
  state, resumed = init.initial_state(config, state, tx, mesh, latest, changes)
  start_step = int(state.step)
  workdir_lib.record_start(config, workdir, changes, start_step if resumed else None)
  # Only now, so that a run refused before this point does not pin the next run's classes.
  ctx.record_classes(workdir, config.data.name)
  best_val = _best_metric(best)

  writer = metric_writer.create_writer(workdir, just_logging=not is_chief)
  if start_step == 0:
    logging.debug("Parameters:\n%s", parameter_overview.get_parameter_overview(state.params))
    writer.write_hparams({k: v for k, v in workdir_lib.flatten(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})

  loss_cfg = steps.LossConfig.from_config(config)
  anchor_weight = optimizer.anchor_weight_schedule(config.loss, plan.steps_per_epoch)
  step_fn = steps.jit_train_step(loss_cfg, mesh, o.grad_accum_steps, o.ema_decay,
                                 o.ema_warmup_steps)
  validate = evaluate.validation_fn(model, config, mesh)
  sharding = parallel.batch_sharding(mesh)
  batches = data_lib.device_put_batches(
      data_lib.train_batches(sources.train, global_batch_size=o.batch_size,
                             image_size=config.data.image_size, crop_size=crop,
                             seed=config.seed, start_step=start_step,
                             num_workers=config.data.num_workers,
                             random_flip=config.data.random_flip),
      sharding, prefetch=config.data.prefetch)

  clock.start_stage(plan, start_step, num_train=len(sources.train), num_val=len(sources.val),
                    num_test=len(sources.test))
  pending: list[dict[str, jax.Array]] = []
  step = start_step
  logging.info("Training %d steps (optimizer steps, %d per epoch; global batch %d in %d "
               "micro-batch(es) on %d devices; %s, %s parameters) from step %d",
               plan.total_steps, plan.steps_per_epoch, o.batch_size,
               max(1, o.grad_accum_steps), jax.device_count(), type(model).__name__,
               f"{parameter_overview.count_parameters(state.params):,}", start_step)

  def flush_metrics(step: int) -> dict[str, float]:
    # Called before every save: a state is saved only once its step's flags are checked.
    if not pending:
      return {}
    fetched = jax.device_get(pending)
    pending.clear()
    for i, m in enumerate(fetched):
      if m["nonfinite"] > 0 or m["nonfinite_state"] > 0:
        raise _nonfinite_error(m, step - len(fetched) + i + 1, latest, best, fresh_norm)
    means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]
             if k not in ("nonfinite", "nonfinite_state")}
    means["learning_rate"] = float(fetched[-1]["learning_rate"])  # as applied, from opt state
    writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
    return means

  def validate_and_select(step: int) -> None:
    nonlocal best_val
    clock.step_done(step)
    started = time.monotonic()
    sel = select_on_validation(validate, state, sources.val)
    val, ema_val = sel["plain"], sel["ema"]
    writer.write_scalars(step, {f"val/{k}": v for k, v in val.items()})
    if ema_val is not None:
      writer.write_scalars(step, {f"val_ema/{k}": v for k, v in ema_val.items()})
    improved = sel["val_loss"] < best_val
    if improved:
      best_val = sel["val_loss"]
      checkpointing.save(best, step, state, sel["record"])
    seconds = time.monotonic() - started
    clock.validation_done(seconds, len(sources.val))
    ema_words = "" if ema_val is None else (
        f" (EMA: val loss {ema_val['loss']:.5f}, val mAP {ema_val['mAP']:.4f}; "
        f"{'the EMA' if sel['ema_won'] else 'the plain parameters'} selected)")
    logging.info("step %d: val loss %.5f, val mAP %.4f%s%s (%s)", step, val["loss"],
                 val["mAP"], ", the best so far" if improved else "", ema_words,
                 console.duration(seconds))

  try:
    if resumed and checkpointing.validation_due(latest, start_step):
      validate_and_select(start_step)  # the one a stop skipped (below)
    while step < plan.total_steps:
      batch = next(batches)
      if anchor_weight is None:
        state, step_metrics = step_fn(state, batch)
      else:  # the validation loss keeps the final weight: one objective for model selection
        state, step_metrics = step_fn(
            state, batch, loss_cfg.replace(lambda_anchor=anchor_weight(step)))
        step_metrics = dict(step_metrics, lambda_anchor=np.float32(anchor_weight(step)))
      if step == start_step:  # the first step compiles: time the run from its end
        jax.block_until_ready(step_metrics)
      step += 1
      pending.append(step_metrics)
      if step % config.log_every_steps == 0 or step == plan.total_steps:
        means = flush_metrics(step)
        clock.step_done(step)
        if clock.steps_per_second() is not None:
          writer.write_scalars(step, {"steps_per_sec": clock.steps_per_second()})
        logging.info("%s", clock.progress_line(means["loss"]))
      else:
        clock.step_done(step)
      # Asked on every process after every step (JAX's sync point), before the validation:
      # a stopping run starts no validation pass (a preemption's grace is short); its
      # checkpoint says the validation is due, and the restart runs it first.
      stopping = stop is not None and stop.stop_at(step, latest)
      if plan.validates_at(step) and not stopping:
        flush_metrics(step)
        validate_and_select(step)
      if not stopping and (step % config.checkpoint_every_steps == 0
                           or step == plan.total_steps):
        flush_metrics(step)
        checkpointing.save(latest, step, state)
        writer.flush()  # TensorBoard shows what the checkpoint holds (on a bucket: a new file)
      checkpointing.check_saves(latest, best)  # a failed save stops the run at once
      if stopping:
        flush_metrics(step)
        checkpointing.save(latest, step, state, validation_due=plan.validates_at(step))
        checkpointing.wait(latest, best)
        writer.flush()
        raise stop.stopped(f"stopped after step {step} of {plan.total_steps}, saved in "
                           f"{latest.directory}", workdir)
    checkpointing.wait(latest, best)
    clock.stage_done()
    best_step = best.best_step()
    record = (best.metrics(best_step) or {}) if best_step is not None else {}
    result = {"step": step, "best_val_loss": best_val, "best_step": best_step,
              "best_ema": bool(record.get("ema", False)), "start_step": start_step}
    # close() waits for the asynchronous saves on every host, so that no host leaves while
    # another still waits for it at a checkpoint barrier.
    latest.close()
    best.close()
  finally:
    # The worker processes and the batches in flight end with the stage, whichever way it
    # ends (an error's traceback would keep the pipeline alive until the interpreter exits).
    batches.close()
    writer.close()  # what was logged reaches the event files (on a bucket: is uploaded)
  return result


def select_on_validation(validate: Any, state: steps.TrainState, source: Any
                         ) -> dict[str, Any]:
  """One validation of a run: the plain parameters and, where the state keeps one, their
  moving average, each scored by ``validate(params, source) -> {'loss', 'mAP', ...}``
  (``evaluate.validation_fn``). The run's selection criterion, the lower validation loss
  (the paper's, §5.1; docs/training.md), picks one; the plain parameters on a tie.

  Returns:
    ``plain`` and ``ema`` (None without an average): the two validations; ``ema_won``;
    ``val_loss``: the selected one's loss; ``record``: the best checkpoint's metrics
    (``val_loss``, and with an average ``ema``, ``val_loss_plain``, ``val_loss_ema``).
  """
  plain = validate(state.params, source)
  ema = None if state.ema_params is None else validate(state.ema_params, source)
  won = ema is not None and ema["loss"] < plain["loss"]
  loss = ema["loss"] if won else plain["loss"]
  record = {"val_loss": loss}
  if ema is not None:
    record.update(ema=won, val_loss_plain=plain["loss"], val_loss_ema=ema["loss"])
  return {"plain": plain, "ema": ema, "ema_won": won, "val_loss": loss, "record": record}


class NonFiniteError(errors.UserError, FloatingPointError):
  """A non-finite loss or state stopped the run (the message names the last checkpoint)."""


SANE_GROWTH = 100.0
"""A checkpoint is a sane start after a non-finite step when it is finite and its parameters'
global norm is at most this many times a fresh initialisation's (a rate that blew up
multiplies it by orders of magnitude; training moves it by a few times at most)."""


def _sanity(manager: Any, step: int, fresh_norm: float) -> tuple[bool, str]:
  """(whether checkpoint ``step`` is a sane start, what was checked, in words)."""
  try:
    params = checkpointing.restore_replicated(manager, step)["params"]
  except checkpointing.CorruptCheckpointError:
    return False, "it cannot be restored"
  nonfinite = int(steps.count_nonfinite(params))
  if nonfinite:
    return False, f"{nonfinite} non-finite values"
  norm = float(optax.global_norm(params))
  ratio = norm / max(fresh_norm, 1e-30)
  words = f"finite, parameter norm {norm:.3g}, {ratio:.3g}x a fresh initialisation's"
  return ratio <= SANE_GROWTH, words


def _nonfinite_error(metrics_: dict[str, Any], step: int, latest: Any, best: Any,
                     fresh_norm: float) -> NonFiniteError:
  """The error that stops a run at a non-finite loss or state. It advises resuming only from
  a checkpoint that is a sane start (``SANE_GROWTH``; it says what was checked), else a
  fresh workdir: a checkpoint the diverging rate already blew up would diverge again."""
  if metrics_["nonfinite"] > 0:
    what = f"non-finite loss at step {step}"
  else:
    what = (f"non-finite parameters or optimizer state after step {step} "
            f"({int(metrics_['nonfinite_state'])} values; the loss was finite)")
  latest.wait_until_finished()  # the newest saves are complete before they are named
  best.wait_until_finished()
  fix = "Lower optim.learning_rate or set optim.grad_clip_norm"
  saved = sorted(latest.all_steps(), reverse=True)
  if not saved:
    return NonFiniteError(f"{what}: the run stops here. No checkpoint was written yet. {fix} "
                          "and start again.")
  rejected = []
  for s in saved:
    sane, checked = _sanity(latest, s, fresh_norm)
    if not sane:
      rejected.append(f"step {s}: {checked}")
      continue
    if not rejected:
      where = (f"Nothing of it was saved; the newest checkpoint, step {s} in "
               f"{latest.directory}, holds finite values ({checked}).")
    else:
      newer = " ".join(checkpointing.step_path(latest, r) for r in saved if r > s)
      where = (f"The newer checkpoints had already diverged ({'; '.join(rejected)}); step {s} "
               f"in {latest.directory} is sane ({checked}): delete the newer ones (rm -r "
               f"{newer}), then {fix[0].lower()}{fix[1:]}")
      return NonFiniteError(f"{what}: the run stops here. {where} and resume from step {s} "
                            "with --config.allow_config_change=True.")
    return NonFiniteError(f"{what}: the run stops here. {where} {fix} and resume from it with "
                          "--config.allow_config_change=True.")
  return NonFiniteError(
      f"{what}: the run stops here. No checkpoint in {latest.directory} is a sane start "
      f"({'; '.join(rejected)}; a sane one is within {SANE_GROWTH:g}x): {fix} and start "
      "again in a fresh --workdir.")


def _best_metric(manager) -> float:
  step = manager.best_step()
  if step is None:
    return float("inf")
  return float((manager.metrics(step) or {}).get("val_loss", float("inf")))
