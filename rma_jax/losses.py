"""The paper's losses (Eq. 7–14, docs/design.md §2), the sigmoid cross-entropy of today's
baselines and the asymmetric loss of ASL (Ridnik et al., ICCV 2021).

Conventions: ``scores`` (B, C) are raw (pre-softmax) scores; ``labels`` (B, C) are {0, 1};
``theta`` (B, K, 4) are the transforms ``(sx, sy, tx, ty)`` of regions 1..K (the model's
``theta[:, 1:]``); ``mask`` (B,) marks real examples (1) against batch padding (0).
Anchor ``j`` (0-based) of ``anchor_points(K)`` is the anchor of region ``j + 2``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


PAPER_ANCHORS_K5 = ((0.5, 0.5), (0.5, -0.5), (-0.5, 0.5), (-0.5, -0.5))
"""The paper's anchors of regions 2..5 for K = 5, in its order ("respectively", §4.2)."""


def anchor_points(num_regions: int) -> np.ndarray:
  """Anchor centres (cx, cy) for regions 2..K (Eq. 9, Fig. 4).

  For K = 5 the paper's four points in the paper's order: (0.5, 0.5), (0.5, -0.5),
  (-0.5, 0.5), (-0.5, -0.5) for regions 2, 3, 4, 5. For other K (the paper has none),
  K-1 points evenly spaced on the same circle of radius sqrt(2)/2 around the map centre,
  starting at 45 degrees and going counter-clockwise in (x, y) (x right, y down).

  Args:
    num_regions: K >= 1.

  Returns:
    (K-1, 2) float32 array; empty for K = 1.
  """
  if num_regions < 1:
    raise ValueError(f"num_regions (K) must be >= 1, got {num_regions}")
  if num_regions == 5:
    return np.asarray(PAPER_ANCHORS_K5, np.float32)
  n = num_regions - 1
  angles = np.pi / 4 + 2 * np.pi * np.arange(n) / max(n, 1)
  radius = np.sqrt(2.0) / 2
  return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=-1).astype(np.float32)


CLASSIFICATION_LOSSES = ("softmax_euclidean", "sigmoid_bce", "asl")

LOSS_SCORE_TRANSFORM = {"softmax_euclidean": "softmax", "sigmoid_bce": "sigmoid",
                        "asl": "sigmoid"}
"""The transform that reads each classification loss's raw scores as probabilities: what
``eval.score_transform='auto'`` applies (``score_transforms``)."""


def score_transforms(classification: str, ap: str = "auto", prf: str = "auto"
                     ) -> tuple[str, str]:
  """The score transforms before AP and before CP…OF1's threshold, 'auto' resolved.

  ``ap`` 'auto': ``LOSS_SCORE_TRANSFORM[classification]`` (softmax after the softmax-Euclidean
  loss, sigmoid after the per-class losses). ``prf`` 'auto': ``softmax_max`` where the loss
  is read with a softmax (``metrics.score_transform`` says why), else that same transform.
  Any other value is kept.
  """
  loss_transform = LOSS_SCORE_TRANSFORM[classification]
  if ap == "auto":
    ap = loss_transform
  if prf == "auto":
    prf = "softmax_max" if loss_transform == "softmax" else loss_transform
  return ap, prf


def _float(x: jax.Array) -> jax.Array:
  """float32, or float64 for float64 input (under ``jax_enable_x64``)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _masked_mean(values: jax.Array, weights: jax.Array,
                 total: jax.Array | None = None) -> jax.Array:
  """``sum(values * weights) / total`` (default ``total = sum(weights)``), 0 (with zero
  gradient) when the total is 0."""
  total = jnp.sum(weights) if total is None else total
  return jnp.sum(values * weights) / jnp.maximum(total, 1.0)


def _batch_mask(mask: jax.Array | None, batch: int) -> jax.Array:
  return jnp.ones((batch,), jnp.float32) if mask is None else mask.astype(jnp.float32)


def _softmax_euclidean_per_image(scores: jax.Array, labels: jax.Array) -> jax.Array:
  scores = _float(scores)
  labels = labels.astype(scores.dtype)
  num_pos = jnp.sum(labels, axis=-1)
  target = labels / jnp.maximum(num_pos, 1.0)[:, None]
  return jnp.sum(jnp.square(jax.nn.softmax(scores, axis=-1) - target), axis=-1)


def _sigmoid_cross_entropy_per_image(scores: jax.Array, labels: jax.Array) -> jax.Array:
  scores = _float(scores)
  labels = labels.astype(scores.dtype)
  per_class = jnp.maximum(scores, 0) - scores * labels + jnp.log1p(jnp.exp(-jnp.abs(scores)))
  return jnp.sum(per_class, axis=-1)


def _power(base: jax.Array, exponent: jax.Array) -> jax.Array:
  """``base ** exponent`` for base >= 0, with 0 ** 0 = 1 and a finite gradient at base 0
  (where the plain power's is 0 * inf for a fractional exponent)."""
  positive = base > 0
  safe = jnp.where(positive, base, 1.0)
  return jnp.where(positive, safe ** exponent, jnp.where(exponent == 0, 1.0, 0.0))


def _asymmetric_per_image(scores: jax.Array, labels: jax.Array, *, gamma_pos: float = 0.0,
                          gamma_neg: float = 4.0, clip: float = 0.05,
                          asl_detach_focus: bool = True) -> jax.Array:
  s = _float(scores)
  y = labels.astype(s.dtype)
  p = jax.nn.sigmoid(s)
  p_m = jnp.maximum(p - clip, 0.0)  # the shifted probability of the negatives
  # log(1 - p_m) = min(log(sigmoid(-s) + m), 0), as a log-sum-exp: exact for m = 0 too, and
  # finite with a finite gradient wherever sigmoid(-s) underflows.
  log_not_pm = jnp.minimum(jnp.logaddexp(jax.nn.log_sigmoid(-s), jnp.log(clip)), 0.0)
  focus_pos = _power(jax.nn.sigmoid(-s), gamma_pos)  # (1 - p)^gamma+
  focus_neg = _power(p_m, gamma_neg)
  if asl_detach_focus:  # ASL's disable_torch_grad_focal_loss=True
    focus_pos, focus_neg = jax.lax.stop_gradient(focus_pos), jax.lax.stop_gradient(focus_neg)
  per_class = y * focus_pos * jax.nn.log_sigmoid(s) + (1 - y) * focus_neg * log_not_pm
  return -jnp.sum(per_class, axis=-1)


ASL_FIELDS = ("gamma_pos", "gamma_neg", "clip", "asl_detach_focus")
"""The settings of the asymmetric loss (``asymmetric_loss``), fields of ``config.loss``."""


def _classification_per_image(scores: jax.Array, labels: jax.Array, classification: str,
                              **asl: Any) -> jax.Array:
  """(B,) classification loss of each image, summed over classes (not yet averaged)."""
  if classification == "softmax_euclidean":
    return _softmax_euclidean_per_image(scores, labels)
  if classification == "sigmoid_bce":
    return _sigmoid_cross_entropy_per_image(scores, labels)
  return _asymmetric_per_image(scores, labels, **asl)


def loss_weights(labels: jax.Array, mask: jax.Array | None = None,
                 classification: str = "softmax_euclidean") -> dict[str, jax.Array]:
  """The per-image weights of the two batch means in Eq. 14.

  Args:
    labels: (B, C) multi-hot.
    mask: optional (B,) weights; padding examples get 0.
    classification: 'softmax_euclidean' (Eq. 8), 'sigmoid_bce' or 'asl'.

  Returns:
    ``cls`` (B,): the weights of the classification mean; for 'softmax_euclidean' images
    without a positive label get 0 (their normalised label vector is undefined); the
    per-class losses count them (all negatives).
    ``loc`` (B,): the weights of the localisation mean (every real image).
  """
  if classification not in CLASSIFICATION_LOSSES:
    raise ValueError(f"classification must be one of {CLASSIFICATION_LOSSES}, "
                     f"got {classification!r}")
  mask = _batch_mask(mask, labels.shape[0])
  cls = mask * (jnp.sum(labels, axis=-1) > 0) if classification == "softmax_euclidean" else mask
  return {"cls": cls, "loc": mask}


def classification_loss(scores: jax.Array, labels: jax.Array,
                        mask: jax.Array | None = None) -> jax.Array:
  """Softmax + squared Euclidean distance to the normalised label vector (Eq. 7–8).

  Args:
    scores: (B, C) raw scores.
    labels: (B, C) multi-hot {0, 1}.
    mask: optional (B,) weights; padding examples get 0.

  Returns:
    Scalar: mean over images with at least one positive label (and mask 1) of
    ``sum_c (softmax(s)_c - y_c / |y|_1)^2``. Label-less images are left out of the mean,
    and a batch with none left gives 0.
  """
  return _masked_mean(_softmax_euclidean_per_image(scores, labels),
                      loss_weights(labels, mask, "softmax_euclidean")["cls"])


def sigmoid_cross_entropy_loss(scores: jax.Array, labels: jax.Array,
                               mask: jax.Array | None = None) -> jax.Array:
  """Per-class sigmoid cross-entropy summed over classes, mean over (masked) images.

  The standard multi-label loss of today's codebases, offered for comparison with Eq. 8.
  Args and returns as ``classification_loss``; label-less images count (all negatives).
  """
  return _masked_mean(_sigmoid_cross_entropy_per_image(scores, labels),
                      _batch_mask(mask, scores.shape[0]))


def asymmetric_loss(scores: jax.Array, labels: jax.Array, mask: jax.Array | None = None, *,
                    gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05,
                    asl_detach_focus: bool = True) -> jax.Array:
  """The asymmetric loss of ASL (Ridnik et al., ICCV 2021, Eq. 5 with the margin of Eq. 4).

  With ``p = sigmoid(s)`` and the shifted probability ``p_m = max(p - clip, 0)``, per class
  ``L+ = -(1 - p)^gamma_pos log(p)`` on positives and ``L- = -p_m^gamma_neg log(1 - p_m)``
  on negatives: the focusing weights and the margin shrink the many easy negatives' share
  (a negative with ``p <= clip`` adds nothing). Summed over classes, mean over (masked)
  images, as ``sigmoid_cross_entropy_loss`` (ASL's code sums over the batch too; the logs
  here are exact, without its 1e-8 clamp). ``gamma_pos = gamma_neg = clip = 0`` is the
  sigmoid cross-entropy.

  Args:
    scores: (B, C) raw scores.
    labels: (B, C) multi-hot {0, 1}.
    mask: optional (B,) weights; padding examples get 0.
    gamma_pos, gamma_neg: the focusing exponents (>= 0; ASL: 0 and 4).
    clip: the probability margin m of the negatives, in [0, 1) (ASL: 0.05).
    asl_detach_focus: the focusing weights are constants of the gradient, as ASL trains
      (``disable_torch_grad_focal_loss=True``); False differentiates them too (the formula's
      own gradient).

  Every setting but ``asl_detach_focus`` may be a traced scalar.

  Returns:
    Scalar loss; label-less images count (all negatives).
  """
  per_image = _asymmetric_per_image(scores, labels, gamma_pos=gamma_pos, gamma_neg=gamma_neg,
                                    clip=clip, asl_detach_focus=asl_detach_focus)
  return _masked_mean(per_image, _batch_mask(mask, scores.shape[0]))


def localization_terms(theta: jax.Array, *, alpha: float = 0.5, beta: float = 0.1,
                       min_scale: float = 0.0) -> dict[str, jax.Array]:
  """The three constraints per image, summed over regions (unweighted).

  Args:
    theta: (B, K, 4) transforms of regions 1..K.
    alpha: scale threshold of Eq. 11.
    beta: positive threshold of Eq. 12.
    min_scale: lower bound of the ``min_scale`` term (not in the paper).

  Returns:
    Dict of (B,) arrays: ``anchor`` (Eq. 9, regions 2..K), ``scale`` (Eq. 10–11),
    ``positive`` (Eq. 12), and ``min_scale``: ``max(0, min_scale - |sx|)^2 +
    max(0, min_scale - |sy|)^2``, the lower-bound counterpart of Eq. 11 (0 for
    ``min_scale = 0``).
  """
  theta = _float(theta)
  sx, sy, tx, ty = (theta[..., i] for i in range(4))
  anchors = jnp.asarray(anchor_points(theta.shape[1]))  # (K-1, 2)
  anchor = 0.5 * (jnp.square(tx[:, 1:] - anchors[:, 0]) + jnp.square(ty[:, 1:] - anchors[:, 1]))
  scale = (jnp.square(jnp.maximum(jnp.abs(sx) - alpha, 0.0))
           + jnp.square(jnp.maximum(jnp.abs(sy) - alpha, 0.0)))
  positive = jnp.maximum(0.0, beta - sx) + jnp.maximum(0.0, beta - sy)
  small = (jnp.square(jnp.maximum(min_scale - jnp.abs(sx), 0.0))
           + jnp.square(jnp.maximum(min_scale - jnp.abs(sy), 0.0)))
  return {"anchor": jnp.sum(anchor, axis=1), "scale": jnp.sum(scale, axis=1),
          "positive": jnp.sum(positive, axis=1), "min_scale": jnp.sum(small, axis=1)}


def _localization_per_image(theta: jax.Array, *, alpha: float = 0.5, beta: float = 0.1,
                            lambda_anchor: float = 0.01, lambda_positive: float = 0.1,
                            use_anchor: bool = True, use_scale: bool = True,
                            use_positive: bool = True, min_scale: float = 0.0) -> jax.Array:
  # Every setting may be traced (a jitted step shared by the ablations' loss variants), so
  # the switches select terms instead of skipping them; a term switched off adds exactly 0.
  terms = localization_terms(theta, alpha=alpha, beta=beta, min_scale=min_scale)
  zero = jnp.zeros(theta.shape[:1], terms["scale"].dtype)
  per_image = zero + jnp.where(use_scale, terms["scale"], zero)
  per_image += jnp.where(use_anchor, lambda_anchor * terms["anchor"], zero)
  per_image += jnp.where(use_positive, lambda_positive * terms["positive"], zero)
  return per_image + jnp.where(jnp.asarray(min_scale) > 0, terms["min_scale"], zero)


def localization_loss(theta: jax.Array, *, alpha: float = 0.5, beta: float = 0.1,
                      lambda_anchor: float = 0.01, lambda_positive: float = 0.1,
                      use_anchor: bool = True, use_scale: bool = True,
                      use_positive: bool = True, min_scale: float = 0.0,
                      mask: jax.Array | None = None) -> jax.Array:
  """``L_loc = l_S + lambda1 l_A + lambda2 l_P`` (Eq. 13), summed over regions, mean over batch.

  Args:
    theta: (B, K, 4) transforms of regions 1..K (not the identity of step 0).
    alpha, beta: thresholds of Eq. 11 and 12.
    lambda_anchor, lambda_positive: lambda1 and lambda2 of Eq. 13.
    use_anchor, use_scale, use_positive: switch each constraint (Tables 4–5).
    min_scale: > 0 adds the lower bound on the region half-sizes
      ``max(0, min_scale - |s|)^2`` (both axes, weight 1 like l_S; not in the paper);
      0 (default) leaves Eq. 13 as published.
    mask: optional (B,) weights; padding examples get 0.

  Every setting may be a traced scalar (bool for the switches).

  Returns:
    Scalar loss.
  """
  per_image = _localization_per_image(
      theta, alpha=alpha, beta=beta, lambda_anchor=lambda_anchor,
      lambda_positive=lambda_positive, use_anchor=use_anchor, use_scale=use_scale,
      use_positive=use_positive, min_scale=min_scale)
  return _masked_mean(per_image, _batch_mask(mask, theta.shape[0]))


def total_loss(scores: jax.Array, labels: jax.Array, theta: jax.Array | None = None, *,
               classification: str = "softmax_euclidean", gamma: float = 0.1,
               mask: jax.Array | None = None,
               denominators: Mapping[str, jax.Array] | None = None,
               return_terms: bool = False,
               **kwargs) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
  """``L = L_cls + gamma L_loc`` (Eq. 14): the loss the train step differentiates.

  Args:
    scores: (B, C) raw scores.
    labels: (B, C) multi-hot.
    theta: (B, K, 4) transforms of regions 1..K, or None (no localisation term, e.g. for
      the baseline).
    classification: 'softmax_euclidean' (Eq. 7–8, ``classification_loss``),
      'sigmoid_bce' (``sigmoid_cross_entropy_loss``) or 'asl' (``asymmetric_loss``).
    gamma: weight of the localisation loss.
    mask: optional (B,) example weights.
    denominators: ``{'cls': ..., 'loc': ...}``, the totals the two means divide by; default
      this batch's own (``loss_weights`` summed). For one micro-batch of a larger batch pass
      the larger batch's totals: the micro-batch losses (and their gradients) then add up
      exactly to the larger batch's, whatever the number of label-less images in each.
    return_terms: also return ``{'loss', 'cls_loss', 'loc_loss'}`` (each with the same
      denominators, so the terms of micro-batches add up too).
    **kwargs: the settings of the asymmetric loss (``ASL_FIELDS``, used by 'asl') and of
      ``localization_loss`` (alpha, beta, lambdas, use_*).

  Returns:
    The scalar loss, or (loss, terms) with ``return_terms``.
  """
  weights = loss_weights(labels, mask, classification)
  if denominators is None:
    denominators = {k: jnp.sum(w) for k, w in weights.items()}
  asl = {k: kwargs.pop(k) for k in ASL_FIELDS if k in kwargs}
  per_image = _classification_per_image(scores, labels, classification, **asl)
  cls = _masked_mean(per_image, weights["cls"], denominators["cls"])
  loc = jnp.zeros((), cls.dtype)
  if theta is not None:
    loc = _masked_mean(_localization_per_image(theta, **kwargs), weights["loc"],
                       denominators["loc"])
  loss = cls + gamma * loc
  if return_terms:
    return loss, {"loss": loss, "cls_loss": cls, "loc_loss": loc}
  return loss
