"""The learning-rate and anchor-weight schedules, the optimizer (Adam, paper §5.1) and the
exponential moving average of the parameters.

Every step count here is in optimizer steps (one global batch each, whatever
``optim.grad_accum_steps``: gradient accumulation happens inside the train step).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from rma_jax import models


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """The length of a training run in optimizer steps, and when it validates.

  Attributes:
    steps_per_epoch: global batches per epoch of the training split (at least 1).
    total_steps: ``optim.num_epochs`` epochs, at most ``max_steps`` when that is > 0.
    eval_every: steps between validations (``eval_every_epochs`` epochs, at least 1);
      the last step validates too.
  """
  steps_per_epoch: int
  total_steps: int
  eval_every: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_train: int) -> "StepPlan":
    steps_per_epoch = max(1, num_train // config.optim.batch_size)
    total = int(config.optim.num_epochs * steps_per_epoch)
    if config.max_steps > 0:
      total = min(total, config.max_steps)
    return cls(steps_per_epoch, total,
               max(1, int(config.eval_every_epochs * steps_per_epoch)))

  def validates_at(self, step: int) -> bool:
    return step % self.eval_every == 0 or step == self.total_steps

  def validations_after(self, step: int) -> int:
    """How many steps in (step, total_steps] validate."""
    if step >= self.total_steps:
      return 0
    n = self.total_steps // self.eval_every - step // self.eval_every
    return n + (1 if self.total_steps % self.eval_every else 0)


def learning_rate_schedule(lr: float, optim: ml_collections.ConfigDict,
                           steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Step decay (the paper: /10 after 30 epochs), cosine, or constant; optional warm-up.

  The schedule's argument, ``steps_per_epoch``, ``total_steps`` and ``optim.warmup_steps``
  count optimizer steps (one global batch each, whatever ``optim.grad_accum_steps``): a decay
  at epoch e applies from optimizer step ``e * steps_per_epoch`` (0-based), the first step
  of epoch e.
  """
  if optim.schedule == "step":
    boundaries = {int(e * steps_per_epoch): optim.decay_factor for e in optim.decay_epochs}
    main = optax.piecewise_constant_schedule(lr, boundaries)
  elif optim.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(1, total_steps - optim.warmup_steps))
  else:
    main = optax.constant_schedule(lr)
  if optim.warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, lr, optim.warmup_steps)
  return optax.join_schedules([warmup, main], [optim.warmup_steps])


def anchor_weight_schedule(loss: ml_collections.ConfigDict, steps_per_epoch: int
                           ) -> Callable[[int], float] | None:
  """The anchor weight lambda1 by step, or None when ``loss.anchor_schedule_epochs`` is 0.

  Epoch ``e = step // steps_per_epoch`` uses
  ``lambda_anchor_start * (lambda_anchor / lambda_anchor_start) ** (e / E)`` for
  ``e < E = anchor_schedule_epochs``, then ``lambda_anchor`` (the paper's 0.01): a strong
  pull towards the anchors while the regions are placed, decaying geometrically, one value
  per epoch, to the paper's weight.
  """
  epochs = int(loss.get("anchor_schedule_epochs", 0))
  if epochs <= 0:
    return None
  start, final = float(loss.lambda_anchor_start), float(loss.lambda_anchor)
  spe = max(1, int(steps_per_epoch))

  def weight(step: int) -> float:
    e = int(step) // spe
    return final if e >= epochs else start * (final / start) ** (e / epochs)
  return weight


def make_optimizer(optim: ml_collections.ConfigDict, schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
  """Adam (b1, b2) with optional global-norm clipping and a trunk learning-rate multiplier.

  The learning rate is ``schedule(count)``, ``count`` the number of optimizer steps before
  this one; ``optax.inject_hyperparams`` keeps the rate of the latest update in the state,
  ``opt_state.hyperparams['learning_rate']`` (see ``applied_learning_rate``). Gradient
  accumulation happens inside the train step (``steps.train_step``), so every step this optimizer
  takes is one optimizer step of the schedule.
  """
  def adam_with_options(learning_rate: jax.Array) -> optax.GradientTransformation:
    def adam(scale: float) -> optax.GradientTransformation:
      return optax.adam(scale * learning_rate, b1=optim.b1, b2=optim.b2)

    if optim.trunk_lr_multiplier != 1.0:
      tx = optax.multi_transform(
          {"trunk": adam(optim.trunk_lr_multiplier), "head": adam(1.0)},
          lambda params: jax.tree_util.tree_map_with_path(
              lambda p, _: "trunk" if models.is_trunk_param(p) else "head", params))
    else:
      tx = adam(1.0)
    if optim.grad_clip_norm > 0:
      tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), tx)
    return tx

  return optax.inject_hyperparams(adam_with_options)(learning_rate=schedule)


def applied_learning_rate(opt_state: Any) -> jax.Array:
  """The learning rate of the latest update (the trunk's is ``trunk_lr_multiplier`` times
  it), read from the state of ``make_optimizer``'s optimizer."""
  return opt_state.hyperparams["learning_rate"]


def ema_decay_at(step: jax.Array, decay: float, warmup_steps: float = 0.0) -> jax.Array:
  """The decay of the moving average's update that makes optimizer step ``step`` (1 for the
  first update): ``decay`` (ASL's ``ModelEma``), or with ``warmup_steps`` > 0 the warm-up of
  YOLOv5's ``ModelEMA``, ``decay * (1 - exp(-step / warmup_steps))``, so that the first
  updates follow the fast early changes instead of averaging them with the initialisation."""
  if warmup_steps <= 0:
    return jnp.asarray(decay, jnp.float32)
  return decay * (1.0 - jnp.exp(-jnp.asarray(step, jnp.float32) / warmup_steps))


def update_ema(ema: Any, params: Any, decay: jax.Array) -> Any:
  """``decay * ema + (1 - decay) * params``, leaf by leaf (in the leaves' dtype): the moving
  average after an update of the parameters. (``optax.ema`` averages updates, not
  parameters.)"""
  return optax.incremental_update(params, ema, 1.0 - decay)


def copy_tree(tree: Any) -> Any:
  """A copy of every array of ``tree``: a moving average that starts at the parameters must
  not share their buffers (the train step donates both)."""
  return jax.tree.map(jnp.copy, tree)
