"""Training: state, the jitted data-parallel steps, and the loop (SPEC §3, §7).

The train step is one pure function jitted over a ``Mesh`` whose single axis ``data`` spans
every device of every host: the batch is sharded along it, parameters and optimizer state are
replicated, and XLA inserts the gradient all-reduce because the loss is a mean over the global
batch. Nothing here imports TensorFlow: the TensorBoard writer (``clu.metric_writers``) and the
input pipeline are imported inside ``train_and_evaluate``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Iterator

from absl import logging
import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from rma_jax import checkpointing, losses, models
from rma_jax import data as data_lib
from rma_jax import workdir as workdir_lib

# Data sets with a fixed class list; any other data.name takes its classes from the data.
NUM_CLASSES = {name: len(names) for name, names in data_lib.BUILTIN_CLASSES.items()}
SOURCES = data_lib.SOURCES
PIXEL_CONVENTIONS = ("caffe", "torch", "unit")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

TrainState = train_state.TrainState


# --------------------------------------------------------------------------- config checks


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ValueError for config values that cannot work, before anything is compiled."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  d, m, o = config.data, config.model, config.optim
  errors = data_lib.config_errors(d)
  if d.crop_size >= d.image_size:
    errors.append(f"data.crop_size={d.crop_size} must be smaller than data.image_size="
                  f"{d.image_size} (the paper crops N-64 from N)")
  for name in ("image_size", "crop_size"):
    if d[name] <= 0 or d[name] % models.VGG16_STRIDE:
      errors.append(f"data.{name}={d[name]} must be a positive multiple of "
                    f"{models.VGG16_STRIDE} (the conv5_3 stride) for the ten-view crops")
  if d.pixel_convention not in PIXEL_CONVENTIONS:
    errors.append(f"data.pixel_convention={d.pixel_convention!r}: one of {PIXEL_CONVENTIONS}")
  if m.name not in ("rma", "baseline"):
    errors.append(f"model.name={m.name!r}: 'rma' or 'baseline'")
  if m.num_regions < 1:
    errors.append(f"model.num_regions (K)={m.num_regions} must be >= 1")
  if m.sample_size < 1:
    errors.append(f"model.sample_size (S)={m.sample_size} must be >= 1")
  if m.width < 1 or 64 % m.width:
    errors.append(f"model.width={m.width} must divide 64")
  if m.dtype not in DTYPES:
    errors.append(f"model.dtype={m.dtype!r}: one of {sorted(DTYPES)}")
  if m.conv_impl not in ("auto", "xla", "patches"):
    errors.append(f"model.conv_impl={m.conv_impl!r}: 'auto', 'xla' or 'patches'")
  if m.baseline_pool not in ("avg", "max"):
    errors.append(f"model.baseline_pool={m.baseline_pool!r}: 'avg' or 'max'")
  if m.get("trunk_init", "he") not in models.TRUNK_INITS:
    errors.append(f"model.trunk_init={m.trunk_init!r}: one of {models.TRUNK_INITS}")
  if m.fixed_regions not in ("", "anchors"):
    errors.append(f"model.fixed_regions={m.fixed_regions!r}: '' or 'anchors'")
  if m.get("region_init", "") not in ("", "anchors"):
    errors.append(f"model.region_init={m.region_init!r}: '' or 'anchors'")
  lo = config.loss
  if lo.get("min_scale", 0.0) < 0 or lo.get("min_scale", 0.0) >= lo.alpha:
    errors.append(f"loss.min_scale={lo.min_scale} must be in [0, loss.alpha={lo.alpha})")
  if lo.get("anchor_schedule_epochs", 0) < 0:
    errors.append(f"loss.anchor_schedule_epochs={lo.anchor_schedule_epochs} must be >= 0")
  if lo.get("anchor_schedule_epochs", 0) > 0 and not (
      lo.get("lambda_anchor_start", 0.0) > 0 and lo.lambda_anchor > 0):
    errors.append("loss.anchor_schedule_epochs > 0 needs loss.lambda_anchor_start > 0 and "
                  "loss.lambda_anchor > 0 (the decay is geometric)")
  if config.loss.classification not in ("softmax_euclidean", "sigmoid_bce"):
    errors.append(f"loss.classification={config.loss.classification!r}: "
                  "'softmax_euclidean' or 'sigmoid_bce'")
  if o.schedule not in ("step", "cosine", "constant"):
    errors.append(f"optim.schedule={o.schedule!r}: 'step', 'cosine' or 'constant'")
  accum = max(1, o.grad_accum_steps)
  if o.batch_size <= 0 or o.batch_size % accum or (o.batch_size // accum) % num_devices:
    errors.append(f"optim.batch_size={o.batch_size} must split into grad_accum_steps={accum} "
                  f"micro-batches divisible by the {num_devices} devices")
  if config.eval.batch_size <= 0 or config.eval.batch_size % num_devices:
    errors.append(f"eval.batch_size={config.eval.batch_size} must be divisible by the "
                  f"{num_devices} devices")
  for name, value in (("optim.learning_rate", o.learning_rate),
                      ("stage1.learning_rate", config.stage1.learning_rate),
                      ("optim.trunk_lr_multiplier", o.trunk_lr_multiplier),
                      ("optim.decay_factor", o.decay_factor)):
    if not (math.isfinite(value) and value >= 0):
      errors.append(f"{name}={value} must be a finite number >= 0")
  for name in ("log_every_steps", "checkpoint_every_steps", "max_to_keep"):
    if config[name] < 1:
      errors.append(f"{name}={config[name]} must be >= 1")
  if not (math.isfinite(config.eval_every_epochs) and config.eval_every_epochs > 0):
    errors.append(f"eval_every_epochs={config.eval_every_epochs} must be > 0")
  if not 0 <= d.val_fraction < 1:
    errors.append(f"data.val_fraction={d.val_fraction} must be in [0, 1)")
  elif d.source != "demo" and d.val_fraction == 0 and not d.get("val_split", ""):
    errors.append("data.val_fraction=0 without a data.val_split leaves no validation split "
                  "to choose the best checkpoint on: set data.val_fraction > 0 or "
                  "data.val_split")
  if errors:
    raise ValueError("invalid config:\n  " + "\n  ".join(errors))


def check_sources(config: ml_collections.ConfigDict, sources: Any) -> None:
  """Raises ValueError for splits a run cannot use, right after they are opened.

  An empty validation or test split, a validation split smaller than one evaluation batch
  (unless ``eval.allow_small_val``), a training split smaller than one batch.
  """
  o, e = config.optim, config.eval
  micro_batch = o.batch_size // max(1, o.grad_accum_steps)
  errors = []
  if len(sources.train) < micro_batch:
    errors.append(f"the training split ({sources.train.name}) has {len(sources.train)} "
                  f"examples, fewer than one batch of {micro_batch} (optim.batch_size)")
  if len(sources.val) == 0:
    errors.append(f"the validation split ({sources.val.name}) is empty: the best checkpoint "
                  "would be chosen on nothing; set data.val_split or data.val_fraction > 0 "
                  "(demo: data.demo.num_val)")
  elif len(sources.val) < e.batch_size and not e.get("allow_small_val", False):
    errors.append(f"the validation split ({sources.val.name}) has {len(sources.val)} "
                  f"examples, fewer than one evaluation batch (eval.batch_size={e.batch_size}):"
                  " the best checkpoint would be chosen on very few images. Use a larger "
                  "validation split, or set eval.allow_small_val=True to accept it")
  if len(sources.test) == 0:
    errors.append(f"the test split ({sources.test.name}) is empty: the final report would "
                  "have no image; check data.test_split (demo: data.demo.num_test)")
  if errors:
    raise ValueError("unusable data splits:\n  " + "\n  ".join(errors))


# --------------------------------------------------------------------------- model and loss


def build_model(config: ml_collections.ConfigDict, num_classes: int | None = None) -> nn.Module:
  """The module named by ``config.model.name``: ``RMA`` or the ``VGG16`` baseline."""
  m = config.model
  if num_classes is None:
    if config.data.name not in NUM_CLASSES:
      raise ValueError(f"data.name={config.data.name!r} has no fixed class list: pass "
                       "num_classes (a run's classes are in WORKDIR/classes.json)")
    num_classes = NUM_CLASSES[config.data.name]
  dtype = DTYPES[m.dtype]
  trunk_init = m.get("trunk_init", "he")  # configs saved before the field existed: He
  if m.name == "baseline":
    return models.VGG16(width=m.width, num_classes=num_classes, dtype=dtype, remat=m.remat,
                        head_pool=m.baseline_pool, conv_impl=m.conv_impl,
                        init_scheme=trunk_init)
  fixed = step_init = None
  if m.fixed_regions == "anchors":
    fixed = tuple(map(tuple, models.fixed_region_thetas(m.num_regions).tolist()))
  if m.get("region_init", "") == "anchors":
    step_init = tuple(map(tuple, models.anchor_step_offsets(
        m.num_regions, tuple(m.theta_bias)).tolist()))
  return models.RMA(
      num_classes=num_classes, num_regions=m.num_regions, sample_size=m.sample_size,
      width=m.width, x_dim=m.x_dim, hidden_dim=m.hidden_dim, z_dim=m.z_dim,
      standard_lstm=m.standard_lstm, theta_bias=tuple(m.theta_bias),
      theta_kernel_scale=m.theta_kernel_scale, fixed_regions=fixed, step_theta_init=step_init,
      dtype=dtype, remat=m.remat, conv_impl=m.conv_impl, trunk_init=trunk_init)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The hashable part of the config the steps need (a static argument of ``jax.jit``)."""
  classification: str = "softmax_euclidean"
  gamma: float = 0.1
  alpha: float = 0.5
  beta: float = 0.1
  lambda_anchor: float = 0.01
  lambda_positive: float = 0.1
  use_anchor: bool = True
  use_scale: bool = True
  use_positive: bool = True
  min_scale: float = 0.0
  pixel_convention: str = "caffe"

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "LossConfig":
    # Fields missing from an older config keep their defaults (the paper's setting).
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    del fields["pixel_convention"]
    return cls(pixel_convention=config.data.pixel_convention,
               **{k: config.loss.get(k, d) for k, d in fields.items()})

  def total_loss(self, outputs: dict[str, jax.Array], labels: jax.Array,
                 mask: jax.Array | None = None,
                 denominators: dict[str, jax.Array] | None = None,
                 lambda_anchor: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eq. 14 (``losses.total_loss``) with these settings on the model's outputs.

    Args:
      outputs: ``scores`` (B, C) and, for RMA, ``theta`` (B, K+1, 4) (index 0, the
        identity of step 0, is not a region and is left out).
      labels: (B, C); mask: optional (B,).
      denominators: see ``losses.total_loss`` (micro-batches of a larger batch).
      lambda_anchor: a scalar (e.g. ``anchor_weight_schedule(step)``, may be traced) that
        replaces ``self.lambda_anchor``; None keeps it.

    Returns:
      (loss, {'loss', 'cls_loss', 'loc_loss'}).
    """
    theta = outputs.get("theta")
    kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
              if f.name != "pixel_convention"}
    if lambda_anchor is not None:
      kwargs["lambda_anchor"] = lambda_anchor
    return losses.total_loss(outputs["scores"], labels,
                             None if theta is None else theta[:, 1:], mask=mask,
                             denominators=denominators, return_terms=True, **kwargs)


def model_outputs(params: Any, apply_fn: Callable, images: jax.Array,
                  pixel_convention: str, **kwargs) -> dict[str, jax.Array]:
  """Normalises uint8 images on device and runs the model; always returns a dict."""
  from rma_jax.data import preprocess  # pure jnp; TF-free
  out = apply_fn({"params": params}, preprocess.normalize(images, pixel_convention), **kwargs)
  return out if isinstance(out, dict) else {"scores": out}


# --------------------------------------------------------------------------- optimizer/state


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


def _is_trunk(path: tuple[Any, ...]) -> bool:
  name = str(getattr(path[0], "key", path[0]))
  return name == "trunk" or name.startswith("conv")


def make_optimizer(optim: ml_collections.ConfigDict, schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
  """Adam (b1, b2) with optional global-norm clipping and a trunk learning-rate multiplier.

  The learning rate is ``schedule(count)``, ``count`` the number of optimizer steps before
  this one; ``optax.inject_hyperparams`` keeps the rate of the latest update in the state,
  ``opt_state.hyperparams['learning_rate']`` (see ``applied_learning_rate``). Gradient
  accumulation happens inside the train step (``train_step``), so every step this optimizer
  takes is one optimizer step of the schedule.
  """
  def adam_with_options(learning_rate: jax.Array) -> optax.GradientTransformation:
    def adam(scale: float) -> optax.GradientTransformation:
      return optax.adam(scale * learning_rate, b1=optim.b1, b2=optim.b2)

    if optim.trunk_lr_multiplier != 1.0:
      tx = optax.multi_transform(
          {"trunk": adam(optim.trunk_lr_multiplier), "head": adam(1.0)},
          lambda params: jax.tree_util.tree_map_with_path(
              lambda p, _: "trunk" if _is_trunk(p) else "head", params))
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


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       image_shape: tuple[int, ...], mesh: Mesh | None = None) -> TrainState:
  """Initialises parameters and optimizer state, born replicated over ``mesh``.

  Args:
    model: the Flax module.
    tx: the optimizer.
    rng: a typed PRNG key.
    image_shape: (H, W, 3) of a training image.
    mesh: device mesh; default all devices on one ``data`` axis.
  """
  mesh = make_mesh() if mesh is None else mesh

  def init(key):
    params = model.init(key, jnp.zeros((1, *image_shape), jnp.float32))["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  return jax.jit(init, out_shardings=NamedSharding(mesh, P()))(rng)


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh ``('data',)`` over all devices of all hosts (SPEC §7)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


# --------------------------------------------------------------------------- steps


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
               grad_accum_steps: int = 1, lambda_anchor: jax.Array | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a (global) batch.

  With ``grad_accum_steps`` = n > 1 the batch is split into n micro-batches that run one
  after the other (``lax.scan``: activations of one micro-batch at a time) and their
  gradients are summed. Each micro-batch's loss divides by the whole batch's counts of
  images (``losses.total_loss(denominators=...)``), so the sum is exactly the gradient of
  the whole batch's loss, also when the label-less images are unevenly spread.

  Args:
    state: the train state (replicated).
    batch: ``image`` uint8 (B, h, w, 3), ``labels`` (B, C), ``mask`` (B,) (sharded on B).
    loss_cfg: static loss settings.
    grad_accum_steps: n, micro-batches per step (static; B / n a multiple of the devices).
    lambda_anchor: optional scalar anchor weight of this step (``anchor_weight_schedule``);
      None uses ``loss_cfg.lambda_anchor``.

  Returns:
    The new state and scalar metrics: the loss terms of the whole batch, gradient and
    parameter norms, ``learning_rate`` (the rate this update applied), ``nonfinite`` (1 if
    the loss was not finite) and ``nonfinite_state`` (the number of non-finite values in the
    new parameters and optimizer state).
  """
  labels = batch["labels"]
  mask = batch.get("mask")
  if mask is None:
    mask = jnp.ones(labels.shape[:1], jnp.float32)
  batch = {"image": batch["image"], "labels": labels, "mask": mask}
  denominators = {k: jnp.sum(w) for k, w in losses.loss_weights(
      labels, mask, loss_cfg.classification).items()}

  def loss_fn(params, micro):
    outputs = model_outputs(params, state.apply_fn, micro["image"], loss_cfg.pixel_convention)
    return loss_cfg.total_loss(outputs, micro["labels"], micro["mask"], denominators,
                               lambda_anchor=lambda_anchor)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum_steps <= 1:
    (loss, terms), grads = grad_fn(state.params, batch)
  else:
    def accumulate(carry, micro):
      (_, terms), grads = grad_fn(state.params, micro)
      return jax.tree.map(jnp.add, carry, (grads, terms)), None

    micro = jax.tree.map(lambda x: _micro_batches(x, grad_accum_steps), batch)
    (_, terms_shape), grads_shape = jax.eval_shape(
        grad_fn, state.params, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (grads_shape, terms_shape))
    (grads, terms), _ = jax.lax.scan(accumulate, zeros, micro)
    loss = terms["loss"]
  state = state.apply_gradients(grads=grads)
  metrics = dict(terms, grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(state.params),
                 learning_rate=applied_learning_rate(state.opt_state),
                 nonfinite=(~jnp.isfinite(loss)).astype(jnp.float32),
                 nonfinite_state=count_nonfinite((state.params, state.opt_state)))
  if lambda_anchor is not None:
    metrics["lambda_anchor"] = jnp.asarray(lambda_anchor, jnp.float32)
  return state, metrics


def eval_step(params: Any, batch: dict[str, jax.Array], apply_fn: Callable,
              loss_cfg: LossConfig) -> dict[str, jax.Array]:
  """Loss and scores on an evaluation batch (padding rows have ``mask`` 0).

  Returns ``loss`` (batch mean over real, labelled images), ``weight`` (their number, to
  average across batches), ``scores`` (B, C) raw scores.
  """
  outputs = model_outputs(params, apply_fn, batch["image"], loss_cfg.pixel_convention)
  mask = batch["mask"]
  loss, _ = loss_cfg.total_loss(outputs, batch["labels"], mask)
  weight = jnp.sum(losses.loss_weights(batch["labels"], mask, loss_cfg.classification)["cls"])
  return {"loss": loss, "weight": weight, "scores": outputs["scores"]}


def jit_train_step(loss_cfg: LossConfig, mesh: Mesh, grad_accum_steps: int = 1, *,
                   scheduled_anchor: bool = False) -> Callable:
  """``train_step`` jitted over ``mesh``: batch sharded on ``data``, state replicated and
  donated (updated in place). With ``scheduled_anchor`` the step takes a third argument,
  the scalar anchor weight of the step (``fn(state, batch, lambda_anchor)``)."""
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  in_shardings = (replicated, sharded) + ((replicated,) if scheduled_anchor else ())
  accum = max(1, grad_accum_steps)

  def step(state, batch, *lambda_anchor):
    return train_step(state, batch, loss_cfg, accum, *lambda_anchor)
  return jax.jit(step, in_shardings=in_shardings, out_shardings=(replicated, replicated),
                 donate_argnums=(0,))


def jit_eval_step(apply_fn: Callable, loss_cfg: LossConfig, mesh: Mesh) -> Callable:
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(functools.partial(eval_step, apply_fn=apply_fn, loss_cfg=loss_cfg),
                 in_shardings=(replicated, sharded),
                 out_shardings={"loss": replicated, "weight": replicated, "scores": sharded})


# --------------------------------------------------------------------------- the loop


def _stage1_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The baseline run of the two-step recipe, derived from the attention model's config."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.name = "baseline"
  c.optim.num_epochs = config.stage1.num_epochs
  c.optim.learning_rate = config.stage1.learning_rate
  c.optim.schedule = "constant" if config.optim.schedule == "constant" else "cosine"
  c.loss.classification = config.stage1.classification
  c.stage1.num_epochs = 0
  c.init.from_checkpoint = ""
  return c


def load_params(workdir: str, which: str = checkpointing.BEST) -> tuple[Any, int]:
  """The parameters of a run's best (or latest) checkpoint, as host arrays, and its step."""
  manager, step = checkpointing.find_checkpoint(workdir, which)
  restored = checkpointing.restore_replicated(manager, step)
  params = restored["params"] if "params" in restored else restored
  return params, step


def _initial_params(config: ml_collections.ConfigDict, params: Any) -> tuple[Any, str]:
  """Applies ImageNet weights and/or a stage-1 checkpoint to freshly initialised params.

  ImageNet weights go to the trunk (and fc6 -> W_fx when the shapes are the paper's); a
  stage-1 checkpoint then replaces the trunk (paper §5.1); other layers keep their init.
  """
  from rma_jax import pretrained
  note = f"from scratch ({_scratch_init_note(config)})"
  if config.init.pretrained:
    imagenet, _ = pretrained.load_pretrained(
        config.init.pretrained, pixel_convention=config.data.pixel_convention)
    params = pretrained.init_trunk_from_pretrained(params, imagenet, width=config.model.width)
    note = f"trunk from ImageNet weights {config.init.pretrained}"
  if config.init.from_checkpoint:
    _check_pixel_convention(config.init.from_checkpoint, config.data.pixel_convention)
    stage1, step = load_params(config.init.from_checkpoint)
    if config.model.name == "rma":
      params = pretrained.init_rma_from_baseline(params, stage1)
    else:
      params = pretrained.init_trunk_from_pretrained(params, stage1, width=config.model.width)
    note = f"trunk from stage-1 checkpoint {config.init.from_checkpoint} (step {step})"
  return params, note


def _scratch_init_note(config: ml_collections.ConfigDict) -> str:
  """What a from-scratch initialisation does, for the log."""
  if config.model.get("trunk_init", "he") == "dirac":
    trunk = ("trunk convs Dirac: identity + 0.1 x He normal where C_in = C_out, He normal "
             "where the channel count changes")
  else:
    trunk = "trunk convs He normal"
  return trunk + "; other layers Xavier uniform (W_zm x model.theta_kernel_scale)"


def _check_pixel_convention(workdir: str, convention: str) -> None:
  """A trunk must be fed pixels the way it was trained: compare with the run's config."""
  recorded = workdir_lib.recorded_config(workdir)
  if recorded is None:
    return
  trained = recorded.get("data", {}).get("pixel_convention")
  if trained and trained != convention:
    raise ValueError(f"{workdir} was trained with data.pixel_convention={trained!r}, this run "
                     f"uses {convention!r}; set them equal")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (both stages of the two-step recipe when ``config.stage1.num_epochs > 0``),
  resuming from ``workdir`` if a checkpoint is there, then evaluates the best checkpoint on
  the test split and writes the report. Returns the final summary."""
  validate_config(config)
  # One run per workdir, for the whole job (both stages and the report).
  with workdir_lib.hold(workdir):
    if config.model.name == "rma" and config.stage1.num_epochs > 0:
      stage1_dir = os.path.join(workdir, "stage1")
      logging.info("Stage 1 of 2: baseline in %s", stage1_dir)
      train(_stage1_config(config), stage1_dir)
      config = ml_collections.ConfigDict(config.to_dict())
      config.init.from_checkpoint = stage1_dir
      logging.info("Stage 2 of 2: attention model in %s", workdir)
    summary = train(config, workdir)
    from rma_jax import evaluate  # after training: the test split is touched only here
    summary["test"] = evaluate.evaluate_and_report(config, workdir)
  return summary


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """One training run; returns {'step', 'best_val_loss', 'best_step', 'start_step'} (the
  step it started or resumed from).

  Holds the workdir (``rma_jax.workdir.hold``: a second run on it stops at once) and, when
  it resumes, checks the config against the recorded one before anything else.
  """
  validate_config(config)
  with workdir_lib.hold(workdir):
    changes = workdir_lib.check_config(config, workdir,
                                       checkpointing.has_steps(workdir, checkpointing.LATEST))
    return _train(config, workdir, changes)


def _nonfinite_reason(state: TrainState) -> str | None:
  n = int(jax.jit(count_nonfinite)((state.params, state.opt_state)))
  return f"it holds {n} non-finite values" if n else None


def _train(config: ml_collections.ConfigDict, workdir: str,
           changes: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
  """``train`` once the workdir is held and the config checked (``changes`` since the last
  recorded start)."""
  # Imported here so that importing rma_jax.train never pulls in TensorFlow.
  from clu import metric_writers, parameter_overview, periodic_actions
  from rma_jax import data as data_lib
  from rma_jax import metrics as metrics_lib

  is_chief = jax.process_index() == 0

  # Mesh and data. A workdir keeps the class list of its first run (WORKDIR/classes.json).
  mesh = make_mesh()
  recorded = data_lib.load_run_classes(workdir)
  sources = data_lib.get_sources(
      config.data, seed=config.seed, class_names=recorded,
      class_origin=os.path.join(workdir, data_lib.RUN_CLASSES_FILE) + " (this workdir's run)")
  if is_chief and recorded is None:
    data_lib.save_run_classes(workdir, sources.class_names, origin=sources.class_origin,
                              dataset=config.data.name)
  check_sources(config, sources)
  o = config.optim
  # Every step count (schedule, warm-up, max_steps, logging, checkpoints, the ETA) is in
  # optimizer steps: one global batch, however many micro-batches the step accumulates.
  steps_per_epoch = max(1, len(sources.train) // o.batch_size)
  total_steps = int(o.num_epochs * steps_per_epoch)
  if config.max_steps > 0:
    total_steps = min(total_steps, config.max_steps)
  eval_every = max(1, int(config.eval_every_epochs * steps_per_epoch))

  # Model, optimizer, state.
  model = build_model(config, len(sources.class_names))
  schedule = learning_rate_schedule(o.learning_rate, o, steps_per_epoch, total_steps)
  tx = make_optimizer(o, schedule)
  rng = jax.random.key(config.seed)
  crop = config.data.crop_size
  state = create_train_state(model, tx, rng, (crop, crop, 3), mesh)
  latest = checkpointing.latest_manager(workdir, config.max_to_keep)
  best = checkpointing.best_manager(workdir)
  try:
    restored = checkpointing.restore_newest(latest, state, check=_nonfinite_reason)
  except checkpointing.CheckpointMismatchError as e:
    if not changes:
      raise
    raise checkpointing.CheckpointMismatchError(
        f"{e}. Changed since the last start: {workdir_lib.describe_changes(changes)}") from None
  if restored is not None:
    state, _ = restored
    logging.info("Resumed from %s at step %d", latest.directory, int(state.step))
  else:
    params, note = _initial_params(config, jax.device_get(state.params))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    state = state.replace(params=params, opt_state=jax.jit(
        tx.init, out_shardings=NamedSharding(mesh, P()))(params))
    logging.info("Initialised %s", note)
  start_step = int(state.step)
  workdir_lib.record_start(config, workdir, changes, start_step if restored else None)
  best_val = _best_metric(best)

  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  if start_step == 0:
    logging.info("Parameters:\n%s", parameter_overview.get_parameter_overview(state.params))
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})

  loss_cfg = LossConfig.from_config(config)
  anchor_weight = anchor_weight_schedule(config.loss, steps_per_epoch)
  step_fn = jit_train_step(loss_cfg, mesh, o.grad_accum_steps,
                           scheduled_anchor=anchor_weight is not None)
  eval_fn = jit_eval_step(model.apply, loss_cfg, mesh)
  sharding = NamedSharding(mesh, P("data"))
  batches = data_lib.device_put_batches(
      data_lib.train_batches(sources.train, global_batch_size=o.batch_size,
                             image_size=config.data.image_size, crop_size=crop,
                             seed=config.seed, start_step=start_step,
                             num_workers=config.data.num_workers,
                             random_flip=config.data.random_flip),
      sharding, prefetch=config.data.prefetch)

  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps)
  pending: list[dict[str, jax.Array]] = []
  step = start_step
  logging.info("Training %d steps (optimizer steps, %d per epoch; global batch %d in %d "
               "micro-batch(es) on %d devices) from step %d", total_steps, steps_per_epoch,
               o.batch_size, max(1, o.grad_accum_steps), jax.device_count(), start_step)

  def flush_metrics(step: int) -> None:
    # Called before every save: a state is saved only once its step's flags are checked.
    if not pending:
      return
    fetched = jax.device_get(pending)
    pending.clear()
    for i, m in enumerate(fetched):
      if m["nonfinite"] > 0 or m["nonfinite_state"] > 0:
        raise _nonfinite_error(m, step - len(fetched) + i + 1, latest, best)
    means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]
             if k not in ("nonfinite", "nonfinite_state")}
    means["learning_rate"] = float(fetched[-1]["learning_rate"])  # as applied, from opt state
    writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})

  while step < total_steps:
    batch = next(batches)
    if anchor_weight is None:
      state, metrics = step_fn(state, batch)
    else:  # the validation loss keeps the final weight: one objective for model selection
      state, metrics = step_fn(state, batch, np.float32(anchor_weight(step)))
    step += 1
    pending.append(metrics)
    report(step)
    if step % config.log_every_steps == 0 or step == total_steps:
      flush_metrics(step)
    if step % eval_every == 0 or step == total_steps:
      flush_metrics(step)
      val = evaluate_loss(eval_fn, state.params, sources.val, config, sharding,
                          metrics_lib=metrics_lib)
      writer.write_scalars(step, {f"val/{k}": v for k, v in val.items()})
      logging.info("step %d: val loss %.5f, val mAP %.4f", step, val["loss"], val["mAP"])
      if val["loss"] < best_val:
        best_val = val["loss"]
        checkpointing.save(best, step, state, {"val_loss": val["loss"]})
    if step % config.checkpoint_every_steps == 0 or step == total_steps:
      flush_metrics(step)
      checkpointing.save(latest, step, state)
  best.wait_until_finished()
  result = {"step": step, "best_val_loss": best_val, "best_step": best.best_step(),
            "start_step": start_step}
  # close() waits for the asynchronous saves on every host, so that no host leaves while
  # another still waits for it at a checkpoint barrier.
  latest.close()
  best.close()
  writer.flush()
  return result


def _nonfinite_error(metrics: dict[str, Any], step: int, latest: Any,
                     best: Any) -> FloatingPointError:
  """The error that stops a run at a non-finite loss or state, naming the last checkpoint."""
  if metrics["nonfinite"] > 0:
    what = f"non-finite loss at step {step}"
  else:
    what = (f"non-finite parameters or optimizer state after step {step} "
            f"({int(metrics['nonfinite_state'])} values; the loss was finite)")
  latest.wait_until_finished()  # the newest saves are complete before they are named
  best.wait_until_finished()
  last = latest.latest_step()
  if last is None:
    where = "No checkpoint was written yet. Lower optim.learning_rate or set "
    where += "optim.grad_clip_norm and start again."
  else:
    where = (f"Nothing of it was saved; the newest checkpoint, step {last} in "
             f"{latest.directory}, holds finite values. Lower optim.learning_rate or set "
             "optim.grad_clip_norm and resume from it with --config.allow_config_change=True.")
  return FloatingPointError(f"{what}: the run stops here. {where}")


def evaluate_loss(eval_fn: Callable, params: Any, source: Any, config: ml_collections.ConfigDict,
                  sharding: NamedSharding, *, metrics_lib: Any) -> dict[str, float]:
  """Validation loss (the paper's model-selection criterion) and single-view mAP."""
  from rma_jax import data as data_lib
  batches = data_lib.device_put_batches(
      data_lib.eval_batches(source, global_batch_size=config.eval.batch_size,
                            image_size=config.data.crop_size,
                            num_workers=config.data.num_workers),
      sharding, prefetch=config.data.prefetch)
  total, weight = 0.0, 0.0
  scores, labels, masks = [], [], []
  for batch in batches:
    out = eval_fn(params, batch)
    w = float(out["weight"])
    total += float(out["loss"]) * w
    weight += w
    scores.append(to_host(out["scores"]))
    labels.append(to_host(batch["labels"]))
    masks.append(to_host(batch["mask"]) > 0)
  keep = np.concatenate(masks)
  if weight == 0:
    # A loss of 0/0 would be kept as the best one: the model would be chosen on nothing.
    raise ValueError(
        f"validation pass over {source.name}: 0 of {len(source)} images scored ({int(keep.sum())}"
        f" read, none with a label the loss counts); no checkpoint can be chosen on it. "
        f"{source.skipped.summary()}")
  s = metrics_lib.score_transform(np.concatenate(scores)[keep], config.eval.score_transform)
  y = np.concatenate(labels)[keep]
  return {"loss": total / weight,
          "mAP": float(metrics_lib.mean_average_precision(s, y, mode="all"))}


def to_host(x: jax.Array) -> np.ndarray:
  """A global (possibly multi-host, batch-sharded) array as one NumPy array on every host."""
  if jax.process_count() == 1 or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _best_metric(manager) -> float:
  step = manager.best_step()
  if step is None:
    return float("inf")
  metrics = manager.metrics(step) or {}
  return float(metrics.get("val_loss", float("inf")))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
