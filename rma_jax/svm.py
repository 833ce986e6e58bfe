"""The paper's optional SVM head (§5.1): one-vs-rest linear SVMs (LIBLINEAR, through
scikit-learn) on the view-averaged max-pooled region features, C chosen on validation mAP.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from rma_jax import metrics


@dataclasses.dataclass
class SVMHead:
  """One-vs-rest linear SVMs (LIBLINEAR) on image features.

  Attributes:
    coef: (C, D) weights; intercept: (C,); C: the chosen regularisation constant;
    val_map: mAP (all-point) on the validation data for every C tried;
    normalize: whether features are L2-normalised before the SVM.
  """
  coef: np.ndarray
  intercept: np.ndarray
  C: float
  val_map: dict[float, float]
  normalize: bool = True


def _l2(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _fit_ovr(feats: np.ndarray, labels: np.ndarray, C: float, max_iter: int
             ) -> tuple[np.ndarray, np.ndarray]:
  from sklearn.svm import LinearSVC  # pylint: disable=g-import-not-at-top  # ~1 s, eval.svm only
  y = np.asarray(labels) > 0
  coef = np.zeros((y.shape[1], feats.shape[1]))
  intercept = np.zeros(y.shape[1])
  for c in range(y.shape[1]):
    if y[:, c].all() or not y[:, c].any():
      # One value only: no hyperplane to fit; a constant score (+1 / -1) ranks nothing.
      intercept[c] = 1.0 if y[:, c].all() else -1.0
      continue
    svm = LinearSVC(C=C, loss="squared_hinge", dual="auto", max_iter=max_iter)
    svm.fit(feats, y[:, c])
    coef[c], intercept[c] = svm.coef_[0], svm.intercept_[0]
  return coef, intercept


def fit_svm_head(train_feats: Any, train_labels: Any, val_feats: Any, val_labels: Any,
                 Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0), *, normalize: bool = True,
                 val_ignore: Any = None, max_iter: int = 5000) -> SVMHead:
  """Fits one ``sklearn.svm.LinearSVC`` (LIBLINEAR) per class, C chosen on validation mAP.

  The paper (§5.1) trains one-vs-rest SVMs with LIBLINEAR on the view-averaged features and
  does not give C; we try each of ``Cs``, keep the one with the best validation mAP
  (all-point AP; the first of equal ones), and refit on train with it.

  Args:
    train_feats, val_feats: (N, D) features (``ten_view_scores(..., return_features=True)``).
    train_labels, val_labels: (N, C) {0, 1}.
    Cs: the grid of C values.
    normalize: L2-normalise features first (the usual practice with linear SVMs on CNN
      features; scores then do not depend on the feature scale).
    val_ignore: optional (N_val, C) bool pairs ignored in the validation mAP (VOC difficult).
    max_iter: LIBLINEAR iterations.

  Returns:
    an ``SVMHead``; score images with ``svm_scores``.
  """
  prep = _l2 if normalize else (lambda x: np.asarray(x, np.float64))
  xt, xv = prep(train_feats), prep(val_feats)
  val_map: dict[float, float] = {}
  best = None
  for C in Cs:
    coef, b = _fit_ovr(xt, train_labels, float(C), max_iter)
    m = metrics.mean_average_precision(xv @ coef.T + b, val_labels, val_ignore, mode="all")
    val_map[float(C)] = float(m)
    if best is None or (np.isfinite(m) and not m <= best[0]):
      best = (m, float(C), coef, b)
  _, C, coef, b = best
  return SVMHead(coef=coef, intercept=b, C=C, val_map=val_map, normalize=normalize)


def svm_scores(head: SVMHead, feats: Any) -> np.ndarray:
  """(N, D) features -> (N, C) SVM decision values (signed distances; 0 = the boundary)."""
  x = _l2(feats) if head.normalize else np.asarray(feats, np.float64)
  return x @ head.coef.T + head.intercept
