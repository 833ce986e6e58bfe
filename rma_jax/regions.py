"""How well the attentional regions find the objects (host-side NumPy, float64).

* ``attention_recall``: the share of ground-truth objects whose centre lies inside at least
  one region (coverage);
* ``pointing_game``: does the region behind each label's score (``k* = argmax_k s_k^c``, the
  one the category-wise max pooling kept) contain an object of that label? With
  ``pointing_chance``, the same with the regions moved to random places (the control).

Regions are the model's transforms ``theta = (sx, sy, tx, ty)`` in the [-1, 1] frame of the
map (``rma_jax.ops.theta_to_boxes``); ground-truth boxes ``(x0, y0, x1, y1)`` are in [0, 1]
image coordinates. Nothing here imports TensorFlow.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rma_jax import ops
from rma_jax.metrics import nanmean


def region_boxes(theta: Any) -> np.ndarray:
  """``ops.theta_to_boxes`` on the host in float64: (..., 4) transforms -> (..., 4) boxes
  ``(x0, y0, x1, y1)`` in [-1, 1] map coordinates."""
  return ops.theta_to_boxes(np.asarray(theta, np.float64))


def _box_centres(gt_boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Centres of (..., 4) boxes in [0, 1] image coordinates, mapped to [-1, 1] by 2u - 1."""
  return gt_boxes[..., 0] + gt_boxes[..., 2] - 1.0, gt_boxes[..., 1] + gt_boxes[..., 3] - 1.0


def attention_recall(boxes_theta: Any, gt_boxes: Any, gt_mask: Any) -> float:
  """Share of ground-truth objects whose centre lies inside at least one attentional region.

  A coverage measure, not a localisation one: K boxes that tile the image (the K = 5 fixed
  boxes at the centre and the anchors do) reach 100 % by construction, whatever they look
  at. ``pointing_game`` asks whether the region behind each label's score holds that label.

  Regions follow ``region_boxes``: region k covers
  ``x in [tx - |sx|, tx + |sx|]``, ``y in [ty - |sy|, ty + |sy|]`` in [-1, 1] coordinates
  over the map (align_corners=False: -1 and +1 are the outer image edges). A ground-truth
  box ``(x0, y0, x1, y1)`` in [0, 1] image coordinates has its centre mapped by
  ``u -> 2u - 1``; the borders count as inside. Pass the K predicted regions
  (``theta[:, 1:]`` of the model output; index 0 is the identity, which covers everything).
  When the regions were predicted on a crop of a larger map (ten-view), map the boxes into
  the crop's frame first.

  Args:
    boxes_theta: (N, K, 4) transforms ``(sx, sy, tx, ty)``.
    gt_boxes: (N, M, 4) boxes ``(x0, y0, x1, y1)`` in [0, 1].
    gt_mask: (N, M) bool, True for a real box (the rest is padding).

  Returns:
    The fraction in [0, 1] as a float; NaN if there is no ground-truth box.
  """
  th = np.asarray(boxes_theta, np.float64)
  gt = np.asarray(gt_boxes, np.float64)
  mask = np.asarray(gt_mask).astype(bool)
  if th.ndim != 3 or th.shape[-1] != 4:
    raise ValueError(f"boxes_theta must be (N, K, 4), got {th.shape}")
  if gt.ndim != 3 or gt.shape[-1] != 4 or gt.shape[0] != th.shape[0]:
    raise ValueError(f"gt_boxes must be (N, M, 4) with N = {th.shape[0]}, got {gt.shape}")
  if mask.shape != gt.shape[:2]:
    raise ValueError(f"gt_mask must be {gt.shape[:2]}, got {mask.shape}")
  x0, y0, x1, y1 = np.moveaxis(region_boxes(th), -1, 0)  # each (N, K)
  cx, cy = _box_centres(gt)  # (N, M)
  inside = ((cx[:, :, None] >= x0[:, None, :]) & (cx[:, :, None] <= x1[:, None, :])
            & (cy[:, :, None] >= y0[:, None, :]) & (cy[:, :, None] <= y1[:, None, :]))
  total = int(mask.sum())
  if total == 0:
    return float("nan")
  return float((inside.any(axis=-1) & mask).sum() / total)


def pointing_regions(region_scores: Any) -> np.ndarray:
  """The region behind each class score: ``k* = argmax_k s_k^c`` (0-based, region k* + 1).

  This is the region whose score the category-wise max pooling (Eq. 6) kept for class c;
  ties go to the earliest region (``np.argmax``).

  Args:
    region_scores: (N, K, C) raw per-region scores ``s_1 … s_K``.

  Returns:
    (N, C) int64 indices into the K regions.
  """
  s = np.asarray(region_scores)
  if s.ndim != 3:
    raise ValueError(f"region_scores must be (N, K, C), got shape {s.shape}")
  return np.argmax(s, axis=1)


def pointing_game(region_scores: Any, region_theta: Any, labels: Any, gt_boxes: Any,
                  gt_box_labels: Any, ignore: Any = None, *,
                  chunk: int = 256) -> dict[str, Any]:
  """Does the region behind each label's score look at that label's object?

  The pointing game of Zhang et al. (ECCV 2016, "Top-down neural attention by excitation
  backprop"), adapted to attentional regions. For every image n and every class c it
  contains (``labels > 0`` and not ``ignore``: a VOC "difficult only" class is left out),
  take the region ``k* = argmax_k s_k^c`` (``pointing_regions``) and call it a **hit** when
  the centre of some ground-truth box of class c lies inside region k* (borders count as
  inside; regions and centres as in ``attention_recall``). Difficult boxes of a class that
  also has non-difficult ones count like the others. Besides the hit, the **IoU** of region
  k* (clipped to the image, the part the sampler sees non-zero features in) with the
  best-overlapping box of class c is recorded.

  A pair (n, c) whose class has no box in the image (possible only with data that gives
  image labels without boxes) is left out and counted in ``num_pairs_without_box``.

  Args:
    region_scores: (N, K, C) raw per-region scores (the model's ``region_scores``).
    region_theta: (N, K, 4) transforms of regions 1..K (the model's ``theta[:, 1:]``).
    labels: (N, C) {0, 1} image labels.
    gt_boxes: (N, M, 4) boxes ``(x0, y0, x1, y1)`` in [0, 1] image coordinates.
    gt_box_labels: (N, M) int class of each box, -1 for padding.
    ignore: optional (N, C) bool pairs left out (VOC difficult-only classes).
    chunk: images processed at once (bounds the (chunk, C, M) intermediates).

  Returns:
    dict: ``hit_rate`` (hits / pairs over all pairs, NaN without pairs),
    ``mean_class_hit_rate`` (the mean of the per-class rates over classes with pairs),
    ``hit_rate_per_class`` (C,) (NaN for a class without pairs), ``mean_iou`` and
    ``mean_iou_per_class`` (C,) likewise, ``num_pairs`` and ``num_pairs_per_class`` (C,),
    ``num_pairs_without_box``.
  """
  s = np.asarray(region_scores, np.float64)
  th = np.asarray(region_theta, np.float64)
  y = np.asarray(labels) > 0
  gt = np.asarray(gt_boxes, np.float64)
  bl = np.asarray(gt_box_labels).astype(np.int64)
  if s.ndim != 3:
    raise ValueError(f"region_scores must be (N, K, C), got shape {s.shape}")
  n, k, c = s.shape
  if th.shape != (n, k, 4):
    raise ValueError(f"region_theta must be (N, K, 4) = {(n, k, 4)}, got {th.shape}")
  if y.shape != (n, c):
    raise ValueError(f"labels must be (N, C) = {(n, c)}, got {y.shape}")
  if gt.ndim != 3 or gt.shape[0] != n or gt.shape[-1] != 4:
    raise ValueError(f"gt_boxes must be (N, M, 4) with N = {n}, got {gt.shape}")
  if bl.shape != gt.shape[:2]:
    raise ValueError(f"gt_box_labels must be {gt.shape[:2]}, got {bl.shape}")
  ign = np.zeros((n, c), bool) if ignore is None else np.asarray(ignore).astype(bool)
  if ign.shape != (n, c):
    raise ValueError(f"ignore must be (N, C) = {(n, c)}, got {ign.shape}")
  if np.isnan(s).any() or np.isnan(th).any():
    raise ValueError("region_scores or region_theta contain NaN")

  hits = np.zeros(c, np.int64)
  pairs = np.zeros(c, np.int64)
  iou_sum = np.zeros(c, np.float64)
  without_box = 0
  classes = np.arange(c)
  for lo in range(0, n, max(1, int(chunk))):
    sl = slice(lo, lo + max(1, int(chunk)))
    kstar = pointing_regions(s[sl])  # (n', C)
    boxes = np.take_along_axis(region_boxes(th[sl]), kstar[..., None], axis=1)  # (n', C, 4)
    cx, cy = _box_centres(gt[sl])  # (n', M)
    # same[i, c, m]: box m of image i is a box of class c.
    same = bl[sl][:, None, :] == classes[None, :, None]
    inside = ((cx[:, None, :] >= boxes[..., 0:1]) & (cx[:, None, :] <= boxes[..., 2:3])
              & (cy[:, None, :] >= boxes[..., 1:2]) & (cy[:, None, :] <= boxes[..., 3:4]))
    # IoU of the clipped region with each ground-truth box (both in [-1, 1]).
    r = np.clip(boxes, -1.0, 1.0)[:, :, None, :]  # (n', C, 1, 4)
    g = (2.0 * gt[sl] - 1.0)[:, None, :, :]  # (n', 1, M, 4)
    iw = np.maximum(0.0, np.minimum(r[..., 2], g[..., 2]) - np.maximum(r[..., 0], g[..., 0]))
    ih = np.maximum(0.0, np.minimum(r[..., 3], g[..., 3]) - np.maximum(r[..., 1], g[..., 1]))
    inter = iw * ih
    area_r = (r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1])
    area_g = (g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1])
    union = area_r + area_g - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    present = y[sl] & ~ign[sl]  # (n', C)
    has_box = same.any(axis=-1)
    counted = present & has_box
    without_box += int((present & ~has_box).sum())
    hits += (counted & (inside & same).any(axis=-1)).sum(axis=0)
    pairs += counted.sum(axis=0)
    iou_sum += np.where(counted, np.where(same, iou, 0.0).max(axis=-1, initial=0.0),
                        0.0).sum(axis=0)
  per_class = np.where(pairs > 0, hits / np.maximum(pairs, 1), np.nan)
  iou_class = np.where(pairs > 0, iou_sum / np.maximum(pairs, 1), np.nan)
  total = int(pairs.sum())
  return {
      "hit_rate": float(hits.sum() / total) if total else float("nan"),
      "mean_class_hit_rate": nanmean(per_class),
      "hit_rate_per_class": per_class,
      "mean_iou": float(iou_sum.sum() / total) if total else float("nan"),
      "mean_iou_per_class": iou_class,
      "num_pairs": total,
      "num_pairs_per_class": pairs,
      "num_pairs_without_box": without_box,
  }


def random_region_thetas(region_theta: Any, *, seed: int = 0, num_draws: int = 1
                         ) -> np.ndarray:
  """Regions of the same sizes at random places: the chance control of ``pointing_game``.

  Every region keeps its half-sizes ``(|sx|, |sy|)``; its centre is drawn independently per
  axis, uniformly over the positions at which the box lies inside the image:
  ``tx ~ U[-(1 - |sx|), 1 - |sx|]`` (a box larger than the image, ``|sx| > 1``, gets
  ``U[-(|sx| - 1), |sx| - 1]``, the positions at which it contains the image). Draws come
  from ``np.random.default_rng(seed)``, so the same inputs and seed give the same boxes.

  Args:
    region_theta: (N, K, 4) transforms of regions 1..K.
    seed: the random seed.
    num_draws: independent draws.

  Returns:
    (num_draws, N, K, 4) float64 transforms ``(|sx|, |sy|, tx, ty)``.
  """
  th = np.abs(np.asarray(region_theta, np.float64)[..., :2])
  if np.asarray(region_theta).ndim != 3 or np.asarray(region_theta).shape[-1] != 4:
    raise ValueError(f"region_theta must be (N, K, 4), got {np.shape(region_theta)}")
  rng = np.random.default_rng(seed)
  half_range = np.abs(1.0 - th)  # (N, K, 2)
  u = rng.uniform(-1.0, 1.0, size=(int(num_draws), *th.shape))
  centres = u * half_range
  return np.concatenate([np.broadcast_to(th, centres.shape), centres], axis=-1)


def pointing_chance(region_scores: Any, region_theta: Any, labels: Any, gt_boxes: Any,
                    gt_box_labels: Any, ignore: Any = None, *, seed: int = 0,
                    num_draws: int = 10) -> dict[str, Any]:
  """``pointing_game`` with each region moved to a random place (``random_region_thetas``).

  The model's scores still pick k*, so each label is scored with a random box of the size
  of the model's own region k*. The returned numbers are means over ``num_draws`` draws
  (``num_pairs`` and the like are the same in every draw); deterministic given ``seed``.

  Args:
    region_scores, region_theta, labels, gt_boxes, gt_box_labels, ignore: as in
      ``pointing_game``.
    seed, num_draws: as in ``random_region_thetas``.

  Returns:
    The dict of ``pointing_game`` (means over draws) plus ``seed`` and ``num_draws``.
  """
  draws = [pointing_game(region_scores, t, labels, gt_boxes, gt_box_labels, ignore)
           for t in random_region_thetas(region_theta, seed=seed, num_draws=num_draws)]
  out: dict[str, Any] = dict(draws[0])
  for key in ("hit_rate", "mean_class_hit_rate", "hit_rate_per_class", "mean_iou",
              "mean_iou_per_class"):
    out[key] = np.mean([np.asarray(d[key], np.float64) for d in draws], axis=0)
    if np.ndim(out[key]) == 0:
      out[key] = float(out[key])
  out.update(seed=int(seed), num_draws=int(num_draws))
  return out
