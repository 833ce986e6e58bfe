"""Config values and data splits a run cannot work with, refused before anything compiles.

``validate_config`` checks the values (one error listing every problem, each naming its
field); ``check_sources`` checks the splits once they are opened. ``rma_jax.main`` and the
public entry points (``run.train_and_evaluate``, ``train.train``) call the first once per run.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections

from rma_jax import build, kernels, losses, metrics, models, pixels
from rma_jax import errors as errors_lib
from rma_jax import data as data_lib


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ``errors.ConfigError`` (a ValueError) for config values that cannot work,
  before anything is compiled: one message naming every problem's field."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  d, m, o = config.data, config.model, config.optim
  errors = data_lib.config_errors(d)
  if d.crop_size >= d.image_size:
    errors.append(f"data.crop_size={d.crop_size} must be smaller than data.image_size="
                  f"{d.image_size} (the paper crops N-64 from N)")
  trunk = m.get("trunk", "vgg16")
  if trunk not in build.TRUNKS:
    errors.append(f"model.trunk={trunk!r}: one of {sorted(build.TRUNKS)}")
  else:
    try:
      stride = build.TRUNKS[trunk](m).stride
    except (KeyError, ValueError):  # another field is wrong: reported below
      stride = None
    for name in ("image_size", "crop_size") if stride else ():
      if d[name] <= 0 or d[name] % stride:
        errors.append(f"data.{name}={d[name]} must be a positive multiple of {stride} (the "
                      f"stride of model.trunk={trunk!r}) for the ten-view crops")
    if stride:
      errors += _eval_scale_errors(config, stride)
  errors += _eval_errors(config.eval)
  if d.pixel_convention not in pixels.CONVENTIONS:
    errors.append(f"data.pixel_convention={d.pixel_convention!r}: one of "
                  f"{pixels.CONVENTIONS}")
  if m.name not in build.MODEL_NAMES:
    errors.append(f"model.name={m.name!r}: one of {build.MODEL_NAMES}")
  if m.num_regions < 1:
    errors.append(f"model.num_regions (K)={m.num_regions} must be >= 1")
  if m.sample_size < 1:
    errors.append(f"model.sample_size (S)={m.sample_size} must be >= 1")
  if m.width < 1 or 64 % m.width:
    errors.append(f"model.width={m.width} must divide 64")
  if m.dtype not in build.DTYPES:
    errors.append(f"model.dtype={m.dtype!r}: one of {sorted(build.DTYPES)}")
  if m.conv_impl not in kernels.IMPLS:
    errors.append(f"model.conv_impl={m.conv_impl!r}: one of {kernels.IMPLS}")
  if m.baseline_pool not in models.POOLS:
    errors.append(f"model.baseline_pool={m.baseline_pool!r}: one of {models.POOLS}")
  if m.get("resnet_stride", 32) not in models.OUTPUT_STRIDES:
    errors.append(f"model.resnet_stride={m.resnet_stride!r}: one of {models.OUTPUT_STRIDES}")
  if m.get("bn", "frozen") not in models.BN_MODES:
    errors.append(f"model.bn={m.bn!r}: one of {models.BN_MODES}")
  if m.get("region_pool", "flatten") not in models.REGION_POOLS:
    errors.append(f"model.region_pool={m.region_pool!r}: one of {models.REGION_POOLS}")
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
  for name in ("gamma_pos", "gamma_neg"):
    value = lo.get(name, 0.0)
    if not (_is_number(value) and math.isfinite(value) and value >= 0):
      errors.append(f"loss.{name}={value!r} must be a finite number >= 0 (ASL: gamma_pos 0, "
                    "gamma_neg 4)")
  if not (_is_number(lo.get("clip", 0.0)) and 0 <= lo.get("clip", 0.0) < 1):
    errors.append(f"loss.clip={lo.clip!r} must be in [0, 1) (the probability margin of the "
                  "negatives; ASL: 0.05)")
  ema_decay = o.get("ema_decay", 0.0)
  if not (_is_number(ema_decay) and 0 <= ema_decay < 1):
    errors.append(f"optim.ema_decay={ema_decay!r} must be in [0, 1) (0 = off; ASL: 0.9997)")
  warmup = o.get("ema_warmup_steps", 0)
  if not (_is_number(warmup) and math.isfinite(warmup) and warmup >= 0):
    errors.append(f"optim.ema_warmup_steps={warmup!r} must be a number >= 0 (0 = off)")
  for field in ("loss", "stage1"):  # stage 1 trains with its own loss (run.stage1_config)
    if config[field].classification not in losses.CLASSIFICATION_LOSSES:
      errors.append(f"{field}.classification={config[field].classification!r}: one of "
                    f"{losses.CLASSIFICATION_LOSSES}")
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
    raise errors_lib.ConfigError(errors_lib.refusal("invalid config", errors))


def eval_scales(config: ml_collections.ConfigDict, stride: int) -> list[tuple[int, int]]:
  """(N, crop) per evaluation scale (``eval.scales``, default ``data.image_size``), keeping
  the config's ``image_size - crop_size`` offset; raises ``errors.ConfigError`` for an entry
  the trunk cannot take."""
  problems = _eval_scale_errors(config, stride)
  if problems:
    raise errors_lib.ConfigError(errors_lib.refusal("invalid config", problems))
  offset = config.data.image_size - config.data.crop_size
  return [(int(n), int(n) - offset) for n in _scale_list(config)]


def _scale_list(config: ml_collections.ConfigDict) -> list[Any]:
  return list(config.eval.get("scales", ()) or (config.data.image_size,))


def _eval_scale_errors(config: ml_collections.ConfigDict, stride: int) -> list[str]:
  offset = config.data.image_size - config.data.crop_size
  out = []
  for n in _scale_list(config):
    if not isinstance(n, int) or isinstance(n, bool) or n - offset <= 0 or n % stride or (
        (n - offset) % stride):
      out.append(f"eval.scales entry {n!r}: N and N - {offset} (data.image_size - "
                 f"data.crop_size) must be positive multiples of {stride} (the trunk's stride)")
  return out


def _eval_errors(e: ml_collections.ConfigDict) -> list[str]:
  """The evaluation settings other than the scales: checked before training, so that the
  final evaluation cannot fail on them."""
  out = []
  if e.ap_mode not in metrics.AP_MODES:
    out.append(f"eval.ap_mode={e.ap_mode!r}: one of {metrics.AP_MODES}")
  if e.score_transform != "auto" and e.score_transform not in metrics.SCORE_TRANSFORMS:
    out.append(f"eval.score_transform={e.score_transform!r}: 'auto' or one of "
               f"{metrics.SCORE_TRANSFORMS}")
  prf = e.get("prf_score_transform", "auto")
  if prf != "auto" and prf not in metrics.SCORE_TRANSFORMS:
    out.append(f"eval.prf_score_transform={prf!r}: 'auto' or one of "
               f"{metrics.SCORE_TRANSFORMS}")
  if e.top_k is not None and (not isinstance(e.top_k, int) or e.top_k < 0):
    out.append(f"eval.top_k={e.top_k!r} must be an integer >= 0 (0: no top-k cut)")
  if not (isinstance(e.threshold, (int, float)) and math.isfinite(e.threshold)):
    out.append(f"eval.threshold={e.threshold!r} must be a finite number")
  return out


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    raise errors_lib.ConfigError(errors_lib.refusal("unusable data splits", errors))
