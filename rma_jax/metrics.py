"""Multi-label metrics of the paper (§5.1, Eq. 15): per-class AP, mAP, CP CR CF1 OP OR OF1.

Everything here is NumPy on the host: the model runs on the accelerators, its outputs are
collected over the whole test set (``MultiLabelMetrics``) and the numbers are computed once
at the end. AP is a ranking over *all* test images, so it cannot be averaged over batches.
Inputs may be NumPy or JAX arrays; nothing here imports TensorFlow.

Conventions shared by every function:

* ``scores`` (N, C): any real numbers, higher = more confident. NaN is refused.
* ``labels`` (N, C): 1 (or any value > 0) = the class is present, 0 = absent.
* ``ignore`` (N, C) bool, optional: (image, class) pairs left out of that class's numbers.
  For PASCAL VOC this is the devkit's "difficult only" label (``0`` in
  ``ImageSets/Main/<class>_test.txt``): an image whose only instances of a class are marked
  difficult is neither a positive nor a negative for that class. It still counts for the
  other classes.

AP variants (``mode``):

* ``"voc07"``: the VOC 2007 devkit's ``VOCevalcls.m``, line for line: images are sorted by
  decreasing score with MATLAB's *stable* ``sort(-out)``, so tied scores keep the image
  order of the input and precision is evaluated after every single image (ties are **not**
  grouped); ``prec = tp ./ (tp + fp)``, ``rec = tp / npos``; ``AP = mean over
  t in 0:0.1:1 of max(prec(rec >= t))`` (0 when no point reaches ``t``). The eleven
  thresholds are the doubles MATLAB's colon operator produces, which equal ``k / 10``
  except the fourth: ``3 * 0.1 = 0.30000000000000004``. A recall of exactly 0.3 therefore
  does not reach the 0.3 point, as in the devkit.
* ``"all"``: the area under the step precision-recall curve with tied scores grouped,
  identical to ``sklearn.metrics.average_precision_score`` per class (and to the VOC
  2010+ devkit up to its interpolation).

Precision / recall / F1 (``multilabel_prf``) follow Eq. 15 and are documented there.
"""

from __future__ import annotations

from typing import Any

from clu import metrics as clu_metrics
import flax
import numpy as np

AP_MODES = ("voc07", "all")
SCORE_TRANSFORMS = ("softmax", "softmax_max", "sigmoid", "none")


def _matlab_colon(start: float, step: float, stop: float) -> np.ndarray:
  """``start:step:stop`` as MATLAB evaluates it (first half ``a + k*d``, second ``b - k*d``).

  MATLAB's colon operator builds the range symmetrically from both ends so that the last
  element is exactly ``stop``; the devkit's ``t = 0:0.1:1`` is therefore not
  ``np.arange(0, 1.1, 0.1)`` (whose 0.6 and 0.7 are off by one ulp).
  """
  n = int(np.floor((stop - start) / step + 1e-10))
  out = np.empty(n + 1, np.float64)
  for k in range(n // 2 + 1):
    out[k] = start + k * step
    out[n - k] = stop - k * step
  if n % 2 == 0:
    out[n // 2] = (start + stop) / 2
  return out


# The eleven recall thresholds of VOCevalcls.m (t = 0:0.1:1).
VOC07_RECALL_THRESHOLDS = _matlab_colon(0.0, 0.1, 1.0)


def _as_inputs(scores: Any, labels: Any,
               ignore: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Validates and converts to (float64 scores, bool labels, bool ignore), all (N, C)."""
  s = np.asarray(scores, dtype=np.float64)
  y = np.asarray(labels) > 0
  if s.ndim != 2:
    raise ValueError(f"scores must be (N, C), got shape {s.shape}")
  if y.shape != s.shape:
    raise ValueError(f"labels must have the shape of scores {s.shape}, got {y.shape}")
  if ignore is None:
    ign = np.zeros(s.shape, bool)
  else:
    ign = np.asarray(ignore).astype(bool)
    if ign.shape != s.shape:
      raise ValueError(f"ignore must have the shape of scores {s.shape}, got {ign.shape}")
  if np.isnan(s).any():
    raise ValueError("scores contain NaN")
  return s, y, ign


def average_precision(scores: Any, labels: Any, ignore: Any = None, *,
                      mode: str = "voc07") -> np.ndarray:
  """Per-class average precision.

  Args:
    scores: (N, C) scores, higher = more confident.
    labels: (N, C) {0, 1} ground truth.
    ignore: optional (N, C) bool; True leaves that (image, class) pair out of that class
      (VOC "difficult only"). See the module docstring.
    mode: ``"voc07"`` (VOC 2007 devkit, 11-point interpolated; ties in image order, not
      grouped) or ``"all"`` (all-point, ties grouped; equals scikit-learn).

  Returns:
    (C,) float64 AP in [0, 1]; NaN for a class with no (non-ignored) positive image.
  """
  if mode not in AP_MODES:
    raise ValueError(f"mode must be one of {AP_MODES}, got {mode!r}")
  s, y, ign = _as_inputs(scores, labels, ignore)
  n, c = s.shape
  pos = y & ~ign
  neg = ~y & ~ign
  npos = pos.sum(axis=0)
  if n == 0:
    return np.full(c, np.nan)
  # Stable sort of the negated scores = MATLAB's [~, si] = sort(-out): ties keep the input
  # order. Ignored pairs stay in the list but add neither a TP nor an FP, exactly like the
  # devkit's gt == 0 entries, so they cannot change any precision/recall point.
  order = np.argsort(-s, axis=0, kind="stable")
  pos_sorted = np.take_along_axis(pos, order, axis=0)
  tp = np.cumsum(pos_sorted, axis=0, dtype=np.float64)
  fp = np.cumsum(np.take_along_axis(neg, order, axis=0), axis=0, dtype=np.float64)
  denom = tp + fp
  # 0/0 only before the first counted image (rec = 0 there); the devkit's NaN is skipped by
  # MATLAB's max, a 0 never wins a max that also sees a real point, so both agree.
  prec = np.divide(tp, denom, out=np.zeros_like(tp), where=denom > 0)
  safe_npos = np.maximum(npos, 1).astype(np.float64)

  if mode == "voc07":
    rec = tp / safe_npos
    # max(prec(rec >= t)): rec is non-decreasing down the ranking, so the qualifying points
    # are a suffix; the suffix maximum of prec at its first index is the answer.
    suffix_max = np.maximum.accumulate(prec[::-1], axis=0)[::-1]
    cols = np.arange(c)
    ap = np.zeros(c)
    for t in VOC07_RECALL_THRESHOLDS:
      first = np.sum(rec < t, axis=0)  # (C,) index of the first point with rec >= t
      p = suffix_max[np.minimum(first, n - 1), cols]
      ap += np.where(first < n, p, 0.0) / 11.0
  else:
    # sklearn: AP = sum_j (R_j - R_{j-1}) P_j over distinct score thresholds. Each positive
    # raises recall by 1/npos in its tie group, and is credited the precision at the end of
    # that group (all tied images counted).
    s_sorted = np.take_along_axis(s, order, axis=0)
    group_last = np.ones((n, c), bool)
    group_last[:-1] = s_sorted[1:] != s_sorted[:-1]
    end = np.where(group_last, np.arange(n)[:, None], n)
    group_end = np.minimum.accumulate(end[::-1], axis=0)[::-1]
    prec_at_end = np.take_along_axis(prec, group_end, axis=0)
    ap = (prec_at_end * pos_sorted).sum(axis=0) / safe_npos
  return np.where(npos > 0, ap, np.nan)


def mean_average_precision(scores: Any, labels: Any, ignore: Any = None, *,
                           mode: str = "voc07") -> float:
  """Mean of ``average_precision`` over the classes that have a positive image.

  Args:
    scores, labels, ignore, mode: as in ``average_precision``.

  Returns:
    mAP in [0, 1] as a Python float; NaN classes are left out (NaN if every class is).
  """
  return nanmean(average_precision(scores, labels, ignore, mode=mode))


def nanmean(x: np.ndarray) -> float:
  x = np.asarray(x, np.float64)
  ok = ~np.isnan(x)
  return float(x[ok].mean()) if ok.any() else float("nan")


def _f1(p: float, r: float) -> float:
  return 2.0 * p * r / (p + r) if p + r > 0 else 0.0


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """num / den with 0 where den == 0 (scikit-learn's ``zero_division=0``)."""
  num = np.asarray(num, np.float64)
  den = np.asarray(den, np.float64)
  return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def predicted_labels(scores: Any, *, k: int | None = 3, threshold: float = 0.5) -> np.ndarray:
  """The labels an image is predicted to have: its top-k scores that are >= threshold.

  Args:
    scores: (N, C) scores (after any ``score_transform``).
    k: labels kept per image, at most; ``None`` keeps every label over the threshold.
      Ties at the k-th score are broken deterministically: the lower class index wins.
    threshold: minimum score of a predicted label (inclusive).

  Returns:
    (N, C) bool, True = predicted.
  """
  s = np.asarray(scores, dtype=np.float64)
  if s.ndim != 2:
    raise ValueError(f"scores must be (N, C), got shape {s.shape}")
  pred = s >= threshold
  if k is not None:
    if k < 1:
      raise ValueError(f"k must be >= 1 or None, got {k}")
    kk = min(int(k), s.shape[1])
    # Stable sort of -s: equal scores keep class order, so the lower index ranks first.
    top = np.argsort(-s, axis=1, kind="stable")[:, :kk]
    in_top = np.zeros(s.shape, bool)
    np.put_along_axis(in_top, top, True, axis=1)
    pred &= in_top
  return pred


def multilabel_prf(scores: Any, labels: Any, *, k: int | None = 3, threshold: float = 0.5,
                   ignore: Any = None) -> dict[str, float]:
  """Per-class and overall precision, recall and F1 (paper Eq. 15).

  Predicted labels are each image's top-``k`` scores that are also ``>= threshold``
  (``k=None``: every score ``>= threshold``); ties at the k-th score go to the lower class
  index. With ``N^c_i`` correct, ``N^p_i`` predicted and ``N^g_i`` ground-truth images of
  class i (ignored pairs count in none of them):

  * ``CP = mean_i N^c_i / N^p_i``, ``CR = mean_i N^c_i / N^g_i``, ``CF1 = 2 CP CR / (CP + CR)``
    -- the F1 of the mean precision and mean recall, as in Eq. 15, **not** the mean of the
    per-class F1 scores (which is smaller in general and what some codebases report);
  * ``OP = sum N^c / sum N^p``, ``OR = sum N^c / sum N^g``, ``OF1 = 2 OP OR / (OP + OR)``.

  Edge cases (scikit-learn's ``zero_division=0`` convention, means over *all* C classes as
  in ML-GCN / Query2Label and ``precision_recall_fscore_support(average="macro")``):

  * a class never predicted has precision 0 and still counts in CP;
  * a class with no positive image has recall 0 and still counts in CR (its precision is
    0 if it was predicted, else 0 as well); drop such columns before calling if a subset
    should be evaluated only on the classes it contains;
  * OP / OR are 0 when nothing is predicted / nothing is positive; any F1 of 0/0 is 0.

  Args:
    scores: (N, C) scores (after any ``score_transform``; the threshold applies to them).
    labels: (N, C) {0, 1} ground truth.
    k: labels per image, at most (paper: 3 on COCO); ``None``: threshold only.
    threshold: minimum score of a predicted label, inclusive (paper: 0.5).
    ignore: optional (N, C) bool, pairs left out of every count.

  Returns:
    dict with float ``CP CR CF1 OP OR OF1``, fractions in [0, 1].
  """
  s, y, ign = _as_inputs(scores, labels, ignore)
  pred = predicted_labels(s, k=k, threshold=threshold)
  valid = ~ign
  n_correct = (pred & y & valid).sum(axis=0)
  n_pred = (pred & valid).sum(axis=0)
  n_true = (y & valid).sum(axis=0)
  cp = float(_ratio(n_correct, n_pred).mean()) if s.shape[1] else 0.0
  cr = float(_ratio(n_correct, n_true).mean()) if s.shape[1] else 0.0
  op = float(_ratio(n_correct.sum(), n_pred.sum()))
  orec = float(_ratio(n_correct.sum(), n_true.sum()))
  return {"CP": cp, "CR": cr, "CF1": _f1(cp, cr), "OP": op, "OR": orec, "OF1": _f1(op, orec)}


def score_transform(scores: Any, kind: str, xp: Any = np) -> Any:
  """Maps raw model scores to the scale the metrics compare.

  The softmax-Euclidean loss (Eq. 7-8) is blind to a constant added to all of an image's
  scores, so its raw scores are not comparable across images; AP ranks one class over all
  images, so it is computed after the softmax. A sigmoid suits per-class (BCE) training.

  Args:
    scores: (..., C) raw scores.
    kind: ``"softmax"`` (over the last axis), ``"softmax_max"`` (the softmax divided by
      its per-image maximum), ``"sigmoid"`` or ``"none"``. ``softmax_max`` is the one to
      threshold for CP…OF1 after softmax-Euclidean training: the loss's target gives every
      positive label of an image the same probability 1/n, so a label is predicted when it
      has at least ``threshold`` times the top label's probability (a plain softmax lets at
      most one label per image pass 0.5).
    xp: ``numpy`` (on the host, in float64) or ``jax.numpy`` (traceable, in the scores'
      dtype: inside a jitted or exported function).

  Returns:
    (..., C) float64 NumPy array, or a JAX array with ``xp=jax.numpy``.
  """
  s = np.asarray(scores, dtype=np.float64) if xp is np else xp.asarray(scores)
  if kind in ("softmax", "softmax_max"):
    e = xp.exp(s - s.max(axis=-1, keepdims=True))
    # softmax / max(softmax) = exp(s - max(s)): e itself.
    return e if kind == "softmax_max" else e / e.sum(axis=-1, keepdims=True)
  if kind == "sigmoid":
    # exp of a non-positive number only: no overflow for large |s|.
    e = xp.exp(-xp.abs(s))
    return xp.where(s >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
  if kind == "none":
    return s
  raise ValueError(f"kind must be one of {SCORE_TRANSFORMS}, got {kind!r}")


# MultiLabelMetrics.compute has an argument of the same name.
_transform = score_transform


@flax.struct.dataclass
class MultiLabelMetrics(
    clu_metrics.CollectingMetric.from_outputs(("scores", "labels", "ignore", "mask"))):
  """Collects (scores, labels, ignore, mask) over batches; computes every number once.

  A ``clu.metrics.CollectingMetric``: each batch is copied to host memory (NumPy), and
  ``compute`` concatenates them, drops the padding rows (``mask == False``) and evaluates
  AP (both variants), mAP and Eq. 15 in NumPy. Use it in the Python loop around the jitted
  eval step (it cannot be traced):

    metrics = MultiLabelMetrics.empty()
    for batch in test_batches:
      out = eval_step(state, batch)
      metrics = metrics.update(scores=out["scores"], labels=batch["labels"],
                               ignore=batch.get("ignore"), mask=batch["mask"])
    results = metrics.compute(ap_mode="voc07", k=3, threshold=0.5)

  It also works inside a ``clu.metrics.Collection`` (``from_model_output`` takes and ignores
  any other outputs); ``Collection.compute()`` then uses the defaults of ``compute``.
  """

  @classmethod
  def from_model_output(cls, *, scores: Any, labels: Any, ignore: Any = None,
                        mask: Any = None, **_: Any) -> "MultiLabelMetrics":
    """One batch: scores (B, C), labels (B, C), ignore (B, C) bool or None, mask (B,) or None."""
    # np.asarray copies device arrays to the host (a sync point); a global jax.Array must be
    # fully addressable here, i.e. gathered first on multi-host runs.
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim != 2 or y.shape != s.shape:
      raise ValueError(f"scores and labels must be (B, C) alike, got {s.shape}, {y.shape}")
    ign = np.zeros(s.shape, bool) if ignore is None else np.asarray(ignore).astype(bool)
    m = np.ones(s.shape[:1], bool) if mask is None else np.asarray(mask).astype(bool)
    if ign.shape != s.shape or m.shape != s.shape[:1]:
      raise ValueError(f"ignore must be {s.shape} and mask {s.shape[:1]}, "
                       f"got {ign.shape}, {m.shape}")
    return cls(values={"scores": (s,), "labels": (y,), "ignore": (ign,), "mask": (m,)})

  def update(self, **batch: Any) -> "MultiLabelMetrics":
    """Returns a new metric with one more batch (keyword arguments of ``from_model_output``)."""
    return self.merge(type(self).from_model_output(**batch))

  def arrays(self) -> dict[str, np.ndarray]:
    """The collected (scores, labels, ignore) with padding rows removed, each (N, C)."""
    if not self.values:
      raise ValueError("MultiLabelMetrics has no batches")
    v = super().compute()
    keep = v["mask"].astype(bool)
    return {"scores": v["scores"][keep], "labels": v["labels"][keep],
            "ignore": v["ignore"][keep].astype(bool)}

  def compute(self, *, ap_mode: str = "voc07", k: int | None = 3, threshold: float = 0.5,
              score_transform: str = "none",
              prf_score_transform: str | None = None) -> dict[str, Any]:
    """All metrics over the collected images.

    Args:
      ap_mode: the AP variant reported as ``ap``/``mAP`` (both are always computed).
      k, threshold: for ``multilabel_prf``.
      score_transform: applied to the collected scores first (``"none"`` when the eval step
        already transformed them).
      prf_score_transform: the transform before CP…OF1's threshold, if different (e.g.
        ``"softmax_max"``: see ``score_transform``); None: the same as for AP.

    Returns:
      dict: ``ap`` (C,) and ``mAP`` in ``ap_mode``; ``ap_voc07``, ``mAP_voc07``, ``ap_all``,
      ``mAP_all``; ``CP CR CF1 OP OR OF1``; the protocol (``ap_mode``, ``top_k``,
      ``threshold``, ``score_transform``); ``num_images`` (rows scored) and
      ``num_images_without_labels`` (of those, rows with no positive label).
    """
    if ap_mode not in AP_MODES:
      raise ValueError(f"ap_mode must be one of {AP_MODES}, got {ap_mode!r}")
    a = self.arrays()
    s = _transform(a["scores"], score_transform)
    y, ign = a["labels"], a["ignore"]
    prf_score_transform = prf_score_transform or score_transform
    out: dict[str, Any] = {"ap_mode": ap_mode, "top_k": k, "threshold": float(threshold),
                           "score_transform": score_transform,
                           "prf_score_transform": prf_score_transform}
    for mode in AP_MODES:
      ap = average_precision(s, y, ign, mode=mode)
      out[f"ap_{mode}"] = ap
      out[f"mAP_{mode}"] = nanmean(ap)
    out["ap"] = out[f"ap_{ap_mode}"]
    out["mAP"] = out[f"mAP_{ap_mode}"]
    s_prf = s if prf_score_transform == score_transform else _transform(
        a["scores"], prf_score_transform)
    out.update(multilabel_prf(s_prf, y, k=k, threshold=threshold, ignore=ign))
    out["num_images"] = int(s.shape[0])
    out["num_images_without_labels"] = int((~(np.asarray(y) > 0).any(axis=1)).sum())
    return out

