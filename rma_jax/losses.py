"""The paper's losses (Eq. 7–14, SPEC §2) and the sigmoid cross-entropy of today's baselines.

Conventions: ``scores`` (B, C) are raw (pre-softmax) scores; ``labels`` (B, C) are {0, 1};
``theta`` (B, K, 4) are the transforms ``(sx, sy, tx, ty)`` of regions 1..K (the model's
``theta[:, 1:]``); ``mask`` (B,) marks real examples (1) against batch padding (0).
Anchor ``j`` (0-based) of ``anchor_points(K)`` is the anchor of region ``j + 2``.
"""

from __future__ import annotations

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


def _masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """Weighted mean that is 0 (with zero gradient) when all weights are 0."""
  total = jnp.sum(weights)
  return jnp.sum(values * weights) / jnp.maximum(total, 1.0)


def _batch_mask(mask: jax.Array | None, batch: int) -> jax.Array:
  return jnp.ones((batch,), jnp.float32) if mask is None else mask.astype(jnp.float32)


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
  scores = scores.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  num_pos = jnp.sum(labels, axis=-1)
  target = labels / jnp.maximum(num_pos, 1.0)[:, None]
  per_image = jnp.sum(jnp.square(jax.nn.softmax(scores, axis=-1) - target), axis=-1)
  weights = _batch_mask(mask, scores.shape[0]) * (num_pos > 0)
  return _masked_mean(per_image, weights)


def sigmoid_cross_entropy_loss(scores: jax.Array, labels: jax.Array,
                               mask: jax.Array | None = None) -> jax.Array:
  """Per-class sigmoid cross-entropy summed over classes, mean over (masked) images.

  The standard multi-label loss of today's codebases, offered for comparison with Eq. 8.
  Args and returns as ``classification_loss``; label-less images count (all negatives).
  """
  scores = scores.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  per_class = jnp.maximum(scores, 0) - scores * labels + jnp.log1p(jnp.exp(-jnp.abs(scores)))
  return _masked_mean(jnp.sum(per_class, axis=-1), _batch_mask(mask, scores.shape[0]))


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
  theta = theta.astype(jnp.float32)
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


def localization_loss(theta: jax.Array, *, alpha: float = 0.5, beta: float = 0.1,
                      lambda_anchor: float = 0.01, lambda_positive: float = 0.1,
                      use_anchor: bool = True, use_scale: bool = True,
                      use_positive: bool = True, min_scale: float = 0.0,
                      mask: jax.Array | None = None) -> jax.Array:
  """``L_loc = l_S + lambda1 l_A + lambda2 l_P`` (Eq. 13), summed over regions, mean over batch.

  Args:
    theta: (B, K, 4) transforms of regions 1..K (not the identity of step 0).
    alpha, beta: thresholds of Eq. 11 and 12.
    lambda_anchor, lambda_positive: lambda1 and lambda2 of Eq. 13 (``lambda_anchor`` may
      be a traced scalar, e.g. from a schedule).
    use_anchor, use_scale, use_positive: switch each constraint (Tables 4–5).
    min_scale: > 0 adds the lower bound on the region half-sizes
      ``max(0, min_scale - |s|)^2`` (both axes, weight 1 like l_S; not in the paper);
      0 (default) leaves Eq. 13 as published.
    mask: optional (B,) weights; padding examples get 0.

  Returns:
    Scalar loss.
  """
  terms = localization_terms(theta, alpha=alpha, beta=beta, min_scale=min_scale)
  per_image = jnp.zeros(theta.shape[:1], jnp.float32)
  if use_scale:
    per_image += terms["scale"]
  if use_anchor:
    per_image += lambda_anchor * terms["anchor"]
  if use_positive:
    per_image += lambda_positive * terms["positive"]
  if min_scale > 0:
    per_image += terms["min_scale"]
  return _masked_mean(per_image, _batch_mask(mask, theta.shape[0]))


def total_loss(scores: jax.Array, labels: jax.Array, theta: jax.Array | None = None, *,
               gamma: float = 0.1, mask: jax.Array | None = None,
               **localization_kwargs) -> jax.Array:
  """``L = L_cls + gamma L_loc`` (Eq. 14).

  Args:
    scores: (B, C) raw scores.
    labels: (B, C) multi-hot.
    theta: (B, K, 4) transforms of regions 1..K, or None (no localisation term, e.g. for
      the baseline).
    gamma: weight of the localisation loss.
    mask: optional (B,) example weights.
    **localization_kwargs: passed to ``localization_loss`` (alpha, beta, lambdas, use_*).

  Returns:
    Scalar loss.
  """
  loss = classification_loss(scores, labels, mask)
  if theta is not None and gamma:
    loss += gamma * localization_loss(theta, mask=mask, **localization_kwargs)
  return loss
