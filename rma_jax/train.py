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
import json
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

from rma_jax import checkpointing, conv, losses, models

NUM_CLASSES = {"voc2007": 20, "coco2014": 80, "demo": 10}
SOURCES = ("tfds", "local", "demo")
PIXEL_CONVENTIONS = ("caffe", "torch", "unit")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

TrainState = train_state.TrainState


# --------------------------------------------------------------------------- config checks


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ValueError for config values that cannot work, before anything is compiled."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  d, m, o = config.data, config.model, config.optim
  errors = []
  if d.name not in NUM_CLASSES:
    errors.append(f"data.name={d.name!r}: unknown data set (one of {sorted(NUM_CLASSES)})")
  if d.source not in SOURCES:
    errors.append(f"data.source={d.source!r}: one of {SOURCES}")
  if (d.name == "demo") != (d.source == "demo"):
    errors.append("data.name='demo' goes with data.source='demo' and only with it")
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
  if m.conv_impl not in conv.IMPLS:
    errors.append(f"model.conv_impl={m.conv_impl!r}: one of {conv.IMPLS}")
  if m.baseline_pool not in ("avg", "max"):
    errors.append(f"model.baseline_pool={m.baseline_pool!r}: 'avg' or 'max'")
  if m.get("trunk_init", "he") not in models.TRUNK_INITS:
    errors.append(f"model.trunk_init={m.trunk_init!r}: one of {models.TRUNK_INITS}")
  if m.fixed_regions not in ("", "anchors"):
    errors.append(f"model.fixed_regions={m.fixed_regions!r}: '' or 'anchors'")
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
  if errors:
    raise ValueError("invalid config:\n  " + "\n  ".join(errors))


# --------------------------------------------------------------------------- model and loss


def build_model(config: ml_collections.ConfigDict, num_classes: int | None = None) -> nn.Module:
  """The module named by ``config.model.name``: ``RMA`` or the ``VGG16`` baseline."""
  m = config.model
  num_classes = NUM_CLASSES[config.data.name] if num_classes is None else num_classes
  dtype = DTYPES[m.dtype]
  trunk_init = m.get("trunk_init", "he")  # configs saved before the field existed: He
  if m.name == "baseline":
    return models.VGG16(width=m.width, num_classes=num_classes, dtype=dtype, remat=m.remat,
                        head_pool=m.baseline_pool, conv_impl=m.conv_impl,
                        init_scheme=trunk_init)
  fixed = None
  if m.fixed_regions == "anchors":
    fixed = tuple(map(tuple, models.fixed_region_thetas(m.num_regions).tolist()))
  return models.RMA(
      num_classes=num_classes, num_regions=m.num_regions, sample_size=m.sample_size,
      width=m.width, x_dim=m.x_dim, hidden_dim=m.hidden_dim, z_dim=m.z_dim,
      standard_lstm=m.standard_lstm, theta_bias=tuple(m.theta_bias),
      theta_kernel_scale=m.theta_kernel_scale, fixed_regions=fixed, dtype=dtype, remat=m.remat,
      conv_impl=m.conv_impl, trunk_init=trunk_init)


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
  pixel_convention: str = "caffe"

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "LossConfig":
    names = {f.name for f in dataclasses.fields(cls)} - {"pixel_convention"}
    return cls(pixel_convention=config.data.pixel_convention,
               **{k: config.loss[k] for k in names})


def model_outputs(params: Any, apply_fn: Callable, images: jax.Array,
                  pixel_convention: str, **kwargs) -> dict[str, jax.Array]:
  """Normalises uint8 images on device and runs the model; always returns a dict."""
  from rma_jax.data import preprocess  # pure jnp; TF-free
  out = apply_fn({"params": params}, preprocess.normalize(images, pixel_convention), **kwargs)
  return out if isinstance(out, dict) else {"scores": out}


def compute_loss(outputs: dict[str, jax.Array], labels: jax.Array, mask: jax.Array | None,
                 cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Eq. 14 (or sigmoid cross-entropy + gamma L_loc). Returns (loss, its terms)."""
  if cfg.classification == "sigmoid_bce":
    cls = losses.sigmoid_cross_entropy_loss(outputs["scores"], labels, mask)
  else:
    cls = losses.classification_loss(outputs["scores"], labels, mask)
  loc = jnp.zeros((), jnp.float32)
  if "theta" in outputs:
    loc = losses.localization_loss(
        outputs["theta"][:, 1:], alpha=cfg.alpha, beta=cfg.beta,
        lambda_anchor=cfg.lambda_anchor, lambda_positive=cfg.lambda_positive,
        use_anchor=cfg.use_anchor, use_scale=cfg.use_scale, use_positive=cfg.use_positive,
        mask=mask)
  loss = cls + cfg.gamma * loc
  return loss, {"loss": loss, "cls_loss": cls, "loc_loss": loc}


# --------------------------------------------------------------------------- optimizer/state


def learning_rate_schedule(lr: float, optim: ml_collections.ConfigDict,
                           steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Step decay (the paper: /10 after 30 epochs), cosine, or constant; optional warm-up."""
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


def _is_trunk(path: tuple[Any, ...]) -> bool:
  name = str(getattr(path[0], "key", path[0]))
  return name == "trunk" or name.startswith("conv")


def make_optimizer(optim: ml_collections.ConfigDict, schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
  """Adam (b1, b2) with optional global-norm clipping, a trunk learning-rate multiplier
  and gradient accumulation over ``grad_accum_steps`` micro-batches."""
  def adam(scale: float) -> optax.GradientTransformation:
    return optax.adam(lambda step: scale * schedule(step), b1=optim.b1, b2=optim.b2)

  if optim.trunk_lr_multiplier != 1.0:
    tx = optax.multi_transform(
        {"trunk": adam(optim.trunk_lr_multiplier), "head": adam(1.0)},
        lambda params: jax.tree_util.tree_map_with_path(
            lambda p, _: "trunk" if _is_trunk(p) else "head", params))
  else:
    tx = adam(1.0)
  if optim.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), tx)
  if optim.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=optim.grad_accum_steps)
  return tx


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


def train_step(state: TrainState, batch: dict[str, jax.Array], loss_cfg: LossConfig
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a (global) batch.

  Args:
    state: the train state (replicated).
    batch: ``image`` uint8 (B, h, w, 3), ``labels`` (B, C), ``mask`` (B,) (sharded on B).
    loss_cfg: static loss settings.

  Returns:
    The new state and scalar metrics (loss terms, gradient and parameter norms, and
    ``nonfinite`` = 1 if the loss was not finite).
  """
  def loss_fn(params):
    outputs = model_outputs(params, state.apply_fn, batch["image"], loss_cfg.pixel_convention)
    return compute_loss(outputs, batch["labels"], batch.get("mask"), loss_cfg)

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads)
  metrics = dict(terms, grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(state.params),
                 nonfinite=(~jnp.isfinite(loss)).astype(jnp.float32))
  return state, metrics


def eval_step(params: Any, batch: dict[str, jax.Array], apply_fn: Callable,
              loss_cfg: LossConfig) -> dict[str, jax.Array]:
  """Loss and scores on an evaluation batch (padding rows have ``mask`` 0).

  Returns ``loss`` (batch mean over real, labelled images), ``weight`` (their number, to
  average across batches), ``scores`` (B, C) raw scores.
  """
  outputs = model_outputs(params, apply_fn, batch["image"], loss_cfg.pixel_convention)
  mask = batch["mask"]
  loss, _ = compute_loss(outputs, batch["labels"], mask, loss_cfg)
  if loss_cfg.classification == "softmax_euclidean":
    weight = jnp.sum(mask * (jnp.sum(batch["labels"], -1) > 0))
  else:
    weight = jnp.sum(mask)
  return {"loss": loss, "weight": weight, "scores": outputs["scores"]}


def jit_train_step(loss_cfg: LossConfig, mesh: Mesh) -> Callable:
  """``train_step`` jitted over ``mesh``: batch sharded on ``data``, state replicated and
  donated (updated in place)."""
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(functools.partial(train_step, loss_cfg=loss_cfg),
                 in_shardings=(replicated, sharded), out_shardings=(replicated, replicated),
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
  note = "from scratch (He/Xavier init)"
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


def _check_pixel_convention(workdir: str, convention: str) -> None:
  """A trunk must be fed pixels the way it was trained: compare with the run's config."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    trained = json.load(f).get("data", {}).get("pixel_convention")
  if trained and trained != convention:
    raise ValueError(f"{workdir} was trained with data.pixel_convention={trained!r}, this run "
                     f"uses {convention!r}; set them equal")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (both stages of the two-step recipe when ``config.stage1.num_epochs > 0``),
  resuming from ``workdir`` if a checkpoint is there, then evaluates the best checkpoint on
  the test split and writes the report. Returns the final summary."""
  validate_config(config)
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
  """One training run; returns {'step', 'best_val_loss', 'best_step'}."""
  # Imported here so that importing rma_jax.train never pulls in TensorFlow.
  from clu import metric_writers, parameter_overview, periodic_actions
  from rma_jax import data as data_lib
  from rma_jax import metrics as metrics_lib

  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  is_chief = jax.process_index() == 0
  if is_chief:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # Mesh and data.
  mesh = make_mesh()
  sources = data_lib.get_sources(config.data, seed=config.seed)
  o = config.optim
  micro_batch = o.batch_size // max(1, o.grad_accum_steps)
  steps_per_epoch = max(1, len(sources.train) // micro_batch)
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
  if latest.latest_step() is not None:
    state = checkpointing.restore(latest, state)
    logging.info("Resumed from %s at step %d", latest.directory, int(state.step))
  else:
    params, note = _initial_params(config, jax.device_get(state.params))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    state = state.replace(params=params, opt_state=jax.jit(
        tx.init, out_shardings=NamedSharding(mesh, P()))(params))
    logging.info("Initialised %s", note)
  start_step = int(state.step)
  best_val = _best_metric(best)

  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  if start_step == 0:
    logging.info("Parameters:\n%s", parameter_overview.get_parameter_overview(state.params))
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})

  loss_cfg = LossConfig.from_config(config)
  step_fn = jit_train_step(loss_cfg, mesh)
  eval_fn = jit_eval_step(model.apply, loss_cfg, mesh)
  sharding = NamedSharding(mesh, P("data"))
  batches = data_lib.device_put_batches(
      data_lib.train_batches(sources.train, global_batch_size=micro_batch,
                             image_size=config.data.image_size, crop_size=crop,
                             seed=config.seed, start_step=start_step,
                             num_workers=config.data.num_workers,
                             random_flip=config.data.random_flip),
      sharding, prefetch=config.data.prefetch)

  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps)
  pending: list[dict[str, jax.Array]] = []
  last_good_step = start_step
  step = start_step
  logging.info("Training %d steps (%d per epoch, global batch %d on %d devices) from step %d",
               total_steps, steps_per_epoch, o.batch_size, jax.device_count(), start_step)

  def flush_metrics(step: int) -> None:
    nonlocal last_good_step
    if not pending:
      return
    fetched = jax.device_get(pending)
    pending.clear()
    if any(m["nonfinite"] > 0 for m in fetched):
      bad = next(i for i, m in enumerate(fetched) if m["nonfinite"] > 0)
      raise FloatingPointError(
          f"non-finite loss at step {step - len(fetched) + bad + 1}; the run stops here and "
          f"the last good checkpoint (step <= {last_good_step}) is left intact. Lower "
          "optim.learning_rate or set optim.grad_clip_norm.")
    last_good_step = step
    means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0] if k != "nonfinite"}
    means["learning_rate"] = float(schedule(step // max(1, o.grad_accum_steps)))
    writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})

  while step < total_steps:
    batch = next(batches)
    state, metrics = step_fn(state, batch)
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
  result = {"step": step, "best_val_loss": best_val, "best_step": best.best_step()}
  # close() waits for the asynchronous saves on every host, so that no host leaves while
  # another still waits for it at a checkpoint barrier.
  latest.close()
  best.close()
  writer.flush()
  return result


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
  s = metrics_lib.score_transform(np.concatenate(scores)[keep], config.eval.score_transform)
  y = np.concatenate(labels)[keep]
  return {"loss": total / max(weight, 1.0),
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
