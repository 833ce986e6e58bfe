"""The jitted steps: the train state, one optimizer step, one evaluation batch (docs/design.md §3, §6).

``train_step`` is one pure function jitted over a ``Mesh`` (``rma_jax.parallel``) whose
single axis ``data`` spans every device of every host: the batch is sharded along it,
parameters and optimizer state are replicated, and XLA inserts the gradient all-reduce
because the loss is a mean over the global batch. ``LossConfig`` holds the loss settings
the steps need; ``TrainState`` holds, where ``optim.ema_decay > 0``, the exponential moving
average of the parameters too, updated by the step. Batch-norm statistics are
parameters that receive no gradient (``models.BatchNorm``): fine-tuned, the step computes
them over the global batch (synchronised batch norm, with no code of its own) and writes
their running averages into the parameters. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
from flax import struct
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from rma_jax import losses, models, optimizer, parallel


class TrainState(train_state.TrainState):
  """flax's train state (step, params, opt_state) and ``ema_params``: the exponential moving
  average of the parameters (``optimizer.update_ema``), a tree like ``params``, or None when
  ``optim.ema_decay`` is 0 (then the state, and its checkpoints, are flax's own)."""
  ema_params: Any = None


@struct.dataclass
class LossConfig:
  """The loss settings of the steps (``config.loss``).

  A pytree: the numbers and switches of Eq. 9-14 are its leaves, so a jitted step takes them
  as traced arguments and one compiled step serves every setting of the same structure (the
  ablations' loss variants; an anchor weight that changes by epoch). ``classification``
  (which loss function) is static.
  """
  classification: str = struct.field(pytree_node=False, default="softmax_euclidean")
  gamma: float = 0.1
  alpha: float = 0.5
  beta: float = 0.1
  lambda_anchor: float = 0.01
  lambda_positive: float = 0.1
  use_anchor: bool = True
  use_scale: bool = True
  use_positive: bool = True
  min_scale: float = 0.0
  # The asymmetric loss (classification='asl', losses.asymmetric_loss).
  gamma_pos: float = 0.0
  gamma_neg: float = 4.0
  clip: float = 0.05
  asl_detach_focus: bool = struct.field(pytree_node=False, default=True)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "LossConfig":
    # Fields missing from an older config keep their defaults (the paper's setting).
    return cls(**{f.name: config.loss.get(f.name, f.default) for f in dataclasses.fields(cls)})

  def total_loss(self, outputs: dict[str, jax.Array], labels: jax.Array,
                 mask: jax.Array | None = None,
                 denominators: dict[str, jax.Array] | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eq. 14 (``losses.total_loss``) with these settings on the model's outputs.

    Args:
      outputs: ``scores`` (B, C) and, for RMA, ``theta`` (B, K+1, 4) (index 0, the
        identity of step 0, is not a region and is left out).
      labels: (B, C); mask: optional (B,).
      denominators: see ``losses.total_loss`` (micro-batches of a larger batch).

    Returns:
      (loss, {'loss', 'cls_loss', 'loc_loss'}).
    """
    theta = outputs.get("theta")
    kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return losses.total_loss(outputs["scores"], labels,
                             None if theta is None else theta[:, 1:], mask=mask,
                             denominators=denominators, return_terms=True, **kwargs)

  def as_arrays(self) -> "LossConfig":
    """The same settings as NumPy leaves (float32; bool for the ``use_*`` switches): one
    input signature for a jitted step, whatever Python types the values were given as."""
    return self.replace(**{
        f.name: np.asarray(getattr(self, f.name),
                           np.bool_ if f.name.startswith("use_") else np.float32)
        for f in dataclasses.fields(self) if f.metadata.get("pytree_node", True)})


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       image_shape: tuple[int, ...], mesh: Mesh | None = None,
                       ema: bool = False) -> TrainState:
  """Initialises parameters and optimizer state, born replicated over ``mesh``.

  Args:
    model: the Flax module.
    tx: the optimizer.
    rng: a typed PRNG key.
    image_shape: (H, W, 3) of a training image.
    mesh: device mesh; default all devices on one ``data`` axis.
    ema: keep the moving average of the parameters (``ema_params``, starting at them).
  """
  mesh = parallel.make_mesh() if mesh is None else mesh

  def init(key):
    params = model.init(key, jnp.zeros((1, *image_shape), jnp.float32))["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                             ema_params=optimizer.copy_tree(params) if ema else None)

  return jax.jit(init, out_shardings=parallel.replicated(mesh))(rng)



def saved_arrays(state: TrainState) -> tuple[Any, Any, Any]:
  """The state's floating-point trees a checkpoint must hold finite: parameters, optimizer
  state, moving average (None when off)."""
  return state.params, state.opt_state, state.ema_params


def count_nonfinite(tree: Any) -> jax.Array:
  """The number of NaN/inf values in the floating-point leaves of ``tree`` (one fused
  reduction when jitted)."""
  counts = [jnp.sum(~jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return sum(counts, jnp.zeros((), jnp.int32))


def _micro_batches(x: jax.Array, num: int) -> jax.Array:
  """(B, ...) -> (num, B / num, ...): micro-batch j holds rows j, j + num, j + 2 num, ...

  Interleaved rather than contiguous so that, with the batch axis sharded over devices,
  every micro-batch keeps an equal share of rows on every device (no data moves)."""
  return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)


def train_step(state: TrainState, batch: dict[str, jax.Array], loss_cfg: LossConfig,
               grad_accum_steps: int = 1, ema_decay: float = 0.0,
               ema_warmup_steps: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a (global) batch, then the moving average of the parameters
  (where the state keeps one: ``optimizer.update_ema`` with ``optimizer.ema_decay_at``).

  With ``grad_accum_steps`` = n > 1 the batch is split into n micro-batches that run one
  after the other (``lax.scan``: activations of one micro-batch at a time) and their
  gradients are summed. Each micro-batch's loss divides by the whole batch's counts of
  images (``losses.total_loss(denominators=...)``), so the sum is exactly the gradient of
  the whole batch's loss, also when the label-less images are unevenly spread.

  Fine-tuned batch norm (``model.bn='finetune'``, ``models.BatchNorm``) normalises by the
  statistics of the global batch (of each micro-batch) and its running averages, kept among
  the parameters, are replaced after the update (``models.merge_batch_stats``).

  Args:
    state: the train state (replicated).
    batch: ``image`` uint8 (B, h, w, 3), ``labels`` (B, C), ``mask`` (B,) (sharded on B).
    loss_cfg: the loss settings (their numbers may be traced).
    grad_accum_steps: n, micro-batches per step (static; B / n a multiple of the devices).
    ema_decay, ema_warmup_steps: ``optim.ema_decay`` and ``optim.ema_warmup_steps``
      (static); used where ``state.ema_params`` is not None.

  Returns:
    The new state and scalar metrics: the loss terms of the whole batch, gradient and
    parameter norms, ``learning_rate`` (the rate this update applied), ``nonfinite`` (1 if
    the loss was not finite) and ``nonfinite_state`` (the number of non-finite values in the
    new parameters, optimizer state and moving average).
  """
  labels = batch["labels"]
  mask = batch.get("mask")
  if mask is None:
    mask = jnp.ones(labels.shape[:1], jnp.float32)
  batch = {"image": batch["image"], "labels": labels, "mask": mask}
  denominators = {k: jnp.sum(w) for k, w in losses.loss_weights(
      labels, mask, loss_cfg.classification).items()}

  def loss_fn(params, micro):
    # Fine-tuned batch norm normalises by the batch and reports its running averages in
    # BN_STATS (models.resnet); a model without it returns none.
    outputs, mutated = state.apply_fn({"params": params}, micro["image"],
                                      mutable=[models.BN_STATS])
    loss, terms = loss_cfg.total_loss(outputs, micro["labels"], micro["mask"], denominators)
    return loss, (terms, mutated.get(models.BN_STATS, {}))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum_steps <= 1:
    (loss, (terms, stats)), grads = grad_fn(state.params, batch)
  else:
    def accumulate(carry, micro):
      (_, aux), grads = grad_fn(state.params, micro)
      return jax.tree.map(jnp.add, carry, (grads, aux)), None

    micro = jax.tree.map(lambda x: _micro_batches(x, grad_accum_steps), batch)
    (_, aux_shape), grads_shape = jax.eval_shape(
        grad_fn, state.params, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (grads_shape, aux_shape))
    (grads, (terms, stats)), _ = jax.lax.scan(accumulate, zeros, micro)
    # Each micro-batch's running average starts from the same statistics: their mean is one
    # update by the mean of the micro-batches' statistics.
    stats = jax.tree.map(lambda s: s / grad_accum_steps, stats)
    loss = terms["loss"]
  state = state.apply_gradients(grads=grads)
  state = state.replace(params=models.merge_batch_stats(state.params, stats))
  if state.ema_params is not None:  # state.step is now this update's number (1 for the first)
    decay = optimizer.ema_decay_at(state.step, ema_decay, ema_warmup_steps)
    state = state.replace(ema_params=optimizer.update_ema(state.ema_params, state.params, decay))
  metrics = dict(terms, grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(state.params),
                 learning_rate=optimizer.applied_learning_rate(state.opt_state),
                 nonfinite=(~jnp.isfinite(loss)).astype(jnp.float32),
                 nonfinite_state=count_nonfinite(saved_arrays(state)))
  return state, metrics


def eval_step(variables: Any, batch: dict[str, jax.Array], *, apply_fn: Callable,
              loss_cfg: LossConfig) -> dict[str, jax.Array]:
  """Loss and scores on an evaluation batch (padding rows have ``mask`` 0).

  ``variables``: ``{'params': ...}``, and any further collection the model's building blocks
  read in evaluation.

  Returns ``loss`` (batch mean over real, labelled images), ``weight`` (their number, to
  average across batches), ``scores`` (B, C) raw scores.
  """
  outputs = apply_fn(variables, batch["image"])
  mask = batch["mask"]
  loss, _ = loss_cfg.total_loss(outputs, batch["labels"], mask)
  weight = jnp.sum(losses.loss_weights(batch["labels"], mask, loss_cfg.classification)["cls"])
  return {"loss": loss, "weight": weight, "scores": outputs["scores"]}


@dataclasses.dataclass(frozen=True)
class JittedTrainStep:
  """``train_step`` jitted over a mesh (``jit_train_step``), with default loss settings.

  ``step(state, batch, loss=None)`` runs it; ``step.lower(...)`` lowers it (cost analysis,
  ahead-of-time compilation). The loss settings are a traced argument (default
  ``loss_cfg``), so other values of them, e.g. the anchor weight of this epoch
  (``optimizer.anchor_weight_schedule``), reuse the compiled step.
  """
  jitted: Callable
  loss_cfg: LossConfig

  def _args(self, state, batch, loss):
    return state, batch, (self.loss_cfg if loss is None else loss).as_arrays()

  def __call__(self, state: TrainState, batch: dict[str, jax.Array],
               loss: LossConfig | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    return self.jitted(*self._args(state, batch, loss))

  def lower(self, state: TrainState, batch: dict[str, jax.Array],
            loss: LossConfig | None = None) -> Any:
    return self.jitted.lower(*self._args(state, batch, loss))


def jit_train_step(loss_cfg: LossConfig, mesh: Mesh, grad_accum_steps: int = 1,
                   ema_decay: float = 0.0, ema_warmup_steps: float = 0.0) -> JittedTrainStep:
  """``train_step`` jitted over ``mesh``: batch sharded on ``data``, state replicated and
  donated (updated in place), loss settings ``loss_cfg`` unless a call gives others."""
  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  jitted = jax.jit(functools.partial(train_step, grad_accum_steps=max(1, grad_accum_steps),
                                     ema_decay=float(ema_decay),
                                     ema_warmup_steps=float(ema_warmup_steps)),
                   in_shardings=(replicated, sharded, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))
  return JittedTrainStep(jitted, loss_cfg)


def jit_eval_step(apply_fn: Callable, loss_cfg: LossConfig, mesh: Mesh) -> Callable:
  """``eval_step`` jitted over ``mesh``: ``fn(variables, batch)``, variables replicated,
  batch and scores sharded."""
  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(functools.partial(eval_step, apply_fn=apply_fn, loss_cfg=loss_cfg),
                 in_shardings=(replicated, sharded),
                 out_shardings={"loss": replicated, "weight": replicated, "scores": sharded})
