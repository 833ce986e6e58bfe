"""The metric card: the protocol behind a set of numbers, stated with them in every report.

Multi-label codebases compute "mAP", "CF1" and friends in subtly different ways (AP variant,
VOC difficult labels, images without labels, top-k and threshold, F1 of means or mean of
F1s), so every report states its protocol: ``metric_card`` (any numbers),
``metric_card_from_config`` (a run's), ``evaluation_card`` (what ``evaluate_and_report``
computed, with notes on each protocol). A run's card also names its classification loss
(``loss_text``) and, after an evaluation, which parameters were scored (``parameters_text``:
the moving average of the parameters where it won the validation).
"""

from __future__ import annotations

from typing import Any, Sequence

import ml_collections

from rma_jax import losses

_AP_TEXT = {
    "voc07": ("VOC 2007 devkit 11-point interpolated AP (VOCevalcls.m: mean over "
              "t = 0:0.1:1 of max precision at recall >= t; tied scores ranked in image "
              "order, not grouped)"),
    "all": ("all-point AP, the area under the step precision-recall curve with tied scores "
            "grouped (= sklearn.metrics.average_precision_score per class)"),
}


def metric_card(*, dataset: str, ap_mode: str = "voc07", difficult: str | None = None,
                images_scored: str | None = None, top_k: int | None = 3,
                threshold: float = 0.5, score_transform: str = "softmax",
                prf_score_transform: str | None = None,
                views: str = "ten-view", scales: Sequence[int] = (512,),
                num_images: int | None = None,
                num_images_without_labels: int | None = None,
                classification_loss: str | None = None, parameters: str | None = None,
                notes: Sequence[str] = ()) -> dict[str, Any]:
  """The protocol behind a set of numbers, as a JSON-ready dict.

  Args:
    dataset: data set name (``voc2007``, ``coco2014``, ``demo``, ...) and split if useful.
    ap_mode: ``voc07`` or ``all`` (see ``rma_jax.metrics``).
    difficult: how VOC difficult labels were treated; default for voc2007: ignored per class.
    images_scored: which images were scored (e.g. COCO images without labels kept or
      dropped); a default sentence is derived from the counts when omitted.
    top_k, threshold: the label-selection rule of CP ... OF1 (``top_k=None``: threshold only).
    score_transform: ``softmax`` | ``sigmoid`` | ``none``, applied before AP.
    prf_score_transform: the scale CP…OF1's threshold applies to (``softmax_max``: softmax
      divided by its per-image maximum); None: the same as ``score_transform``.
    views: ``single-view`` or ``ten-view`` (4 corner + centre crops of conv5_3, flipped).
    scales: the input sizes N whose scores were averaged.
    num_images: images scored; num_images_without_labels: of those, with no positive label.
    classification_loss: the loss the scores were trained with (``loss_text``), if known.
    parameters: which parameters of the checkpoint were scored (``parameters_text``), if
      known.
    notes: free-text lines appended to the card.

  Returns:
    dict of card fields (strings, numbers, lists).
  """
  if ap_mode not in _AP_TEXT:
    raise ValueError(f"ap_mode must be one of {tuple(_AP_TEXT)}, got {ap_mode!r}")
  if difficult is None:
    difficult = ("an image whose only instances of a class are 'difficult' is ignored for "
                 "that class (neither positive nor negative), as in the VOC devkit"
                 if dataset.startswith("voc") else "not applicable (no difficult labels)")
  if images_scored is None:
    images_scored = "every image of the evaluation split"
    if num_images_without_labels:
      images_scored += (f"; {num_images_without_labels} images without any label were kept "
                        "(they add false positives only)")
    elif num_images_without_labels == 0:
      images_scored += "; none of them is without labels"
  selection = (f"top-{top_k} scores of each image that are >= {threshold}" if top_k
               else f"every score >= {threshold}")
  model = {k: v for k, v in (("classification_loss", classification_loss),
                             ("parameters", parameters)) if v is not None}
  return {
      "dataset": dataset,
      "ap_mode": ap_mode,
      "ap_variant": _AP_TEXT[ap_mode],
      "mAP": "mean of the per-class APs over classes with at least one positive image",
      "difficult": difficult,
      "images_scored": images_scored,
      "num_images": num_images,
      "num_images_without_labels": num_images_without_labels,
      "top_k": top_k,
      "threshold": threshold,
      "predicted_labels": selection + " (ties at the k-th score: lower class index first)",
      "f1": ("CF1 = 2 CP CR / (CP + CR) and OF1 = 2 OP OR / (OP + OR): the F1 of the mean "
             "precision and recall (Eq. 15), not the mean of per-class F1"),
      "zero_division": ("precision of a class never predicted = 0, recall of a class with no "
                        "positive = 0; both still count in CP/CR (means over all classes); "
                        "F1 of 0/0 = 0"),
      "score_transform": score_transform,
      "prf_score_transform": prf_score_transform or score_transform,
      "views": views,
      "scales": [int(s) for s in scales],
      **model,
      "notes": [str(n) for n in notes],
  }


def loss_text(loss: Any) -> str:
  """The classification loss of ``config.loss``, with its settings, in words."""
  kind = loss.classification
  if kind == "asl":
    focus = "detached from the gradient" if loss.get("asl_detach_focus", True) else (
        "differentiated")
    settings = ", ".join(f"{k}={loss.get(k, d)}" for k, d in (("gamma_pos", 0.0),
                                                               ("gamma_neg", 4.0),
                                                               ("clip", 0.05)))
    return (f"asl: the asymmetric loss (ASL, Ridnik et al., ICCV 2021) on the category-wise "
            f"max-pooled scores, {settings} (clip: the probability margin of the negatives), "
            f"focusing weights {focus}")
  return {"softmax_euclidean": "softmax_euclidean: softmax and squared Euclidean distance to "
                               "the normalised label vector (the paper's Eq. 7-8)",
          "sigmoid_bce": "sigmoid_bce: per-class sigmoid cross-entropy"}.get(kind, kind)


def parameters_text(ema: bool, has_ema: bool, checkpoint: str) -> str:
  """Which parameters of a checkpoint were scored (``checkpointing.SelectedParams``)."""
  if ema:
    return ("the exponential moving average (EMA) of the parameters, selected over the plain "
            "parameters by its lower validation loss")
  if has_ema and checkpoint == "best":
    return ("the plain parameters, selected over their exponential moving average (EMA) by "
            "the lower validation loss")
  if has_ema:
    return f"the plain parameters (the {checkpoint} checkpoint: no validation selected)"
  return "the trained parameters (no moving average kept: optim.ema_decay = 0)"


def metric_card_from_config(config: Any, **overrides: Any) -> dict[str, Any]:
  """``metric_card`` filled from a run config (``config.data.name`` and ``config.eval``)."""
  e = config.eval
  ap, prf = losses.score_transforms(config.loss.classification, e.score_transform,
                                    e.get("prf_score_transform", "auto"))
  kw = dict(dataset=config.data.name, ap_mode=e.ap_mode, top_k=e.top_k or None,
            threshold=e.threshold, score_transform=ap, prf_score_transform=prf,
            views="ten-view" if e.ten_view else "single-view", scales=tuple(e.scales),
            classification_loss=loss_text(config.loss))
  kw.update(overrides)
  return metric_card(**kw)


def evaluation_card(results: dict[str, Any], config: ml_collections.ConfigDict,
                    scales: Sequence[tuple[int, int]]) -> dict[str, Any]:
  """The card of ``evaluate_and_report``'s results: the headline protocol's settings as its
  metrics recorded them, and a note on how each reported protocol was computed.

  Args:
    results: the evaluation's results (``protocols``, ``headline``, ``split``, ...).
    config: the run's config.
    scales: (N, crop) of each evaluation scale.
  """
  headline = results["headline"]
  h = results["protocols"][headline]
  ten = headline.startswith("ten_view") or (headline == "svm" and config.eval.ten_view)
  if headline.startswith("single_view@"):
    used = [n for n, c in scales if headline == f"single_view@{c}"]
  elif headline == "svm" and not ten:  # SVM on the first scale's single-view features
    used = [scales[0][0]]
  else:
    used = [n for n, _ in scales]
  notes = [
      f"headline protocol: {headline} on the {results['split']} split, checkpoint "
      f"{results['checkpoint']} (step {results['step']})",
      "ten-view: the trunk runs once on the N x N image; conv5_3 is cropped at the 4 corners "
      "and the centre to (N-64)/16 and flipped; raw scores (max over regions) are averaged "
      "over views, then over scales, and score_transform is applied to the average",
      "single_view@S: the whole image resized to S x S",
  ]
  if "svm" in results:
    notes.append(f"svm: one-vs-rest LinearSVC (LIBLINEAR) on L2-normalised view-averaged "
                 f"max-pooled region features, C = {results['svm']['C']} chosen by "
                 "validation mAP; scores are decision values (no transform), predicted "
                 "labels use threshold 0 (the SVM boundary)")
  missing = results.get("classes_without_positives") or []
  if missing:
    c = len(results["class_names"])
    notes.append(f"classes: CP, CR and CF1 average over all {c} classes, {len(missing)} of "
                 f"which have no positive image in the {results['split']} split "
                 f"({', '.join(missing)}; their recall counts as 0); mAP averages over the "
                 f"other {c - len(missing)}")
  if "attention_recall" in results:
    notes.append("attention recall: share of ground-truth objects whose box centre lies in "
                 "at least one of the K regions (single view), beside K fixed boxes of "
                 "half-size 0.5 at the centre and the anchor points. It measures coverage, "
                 "not localisation: boxes that tile the image (the K = 5 fixed boxes do) "
                 "reach 100 % by construction")
  if "pointing" in results:
    chance = results["pointing"]["chance"]
    notes.append("pointing game (Zhang et al., ECCV 2016, adapted; rma_jax.regions."
                 "pointing_game), single view: for every test image and every class c it "
                 "contains (VOC difficult-only classes left out), k* = argmax_k s_k^c, the "
                 "region whose score the category-wise max pooling kept; a hit when the "
                 "centre of some ground-truth box of class c lies inside region k* (borders "
                 "inside). hit_rate = hits / (image, class) pairs; mean_class_hit_rate = "
                 "the mean of the per-class rates; mean_iou = the mean over pairs of the "
                 "IoU of region k* (clipped to the image) with the best-overlapping box of "
                 "class c. Chance control: the same with every region moved to a centre "
                 "drawn uniformly over the positions where a box of its own size lies "
                 f"inside the image (seed {chance['seed']}, mean of {chance['num_draws']} "
                 "draws)")
  # The transforms as recorded by the metrics of the headline protocol: what was computed.
  svm_scores_text = "none (SVM decision values)"
  return metric_card_from_config(
      config, views="ten-view" if ten else "single-view", scales=tuple(used),
      parameters=parameters_text(bool(results.get("ema")), bool(results.get("has_ema")),
                                 str(results["checkpoint"])),
      num_images=h.get("num_images"),
      num_images_without_labels=h.get("num_images_without_labels"),
      score_transform=svm_scores_text if headline == "svm" else h["score_transform"],
      prf_score_transform=svm_scores_text if headline == "svm" else h["prf_score_transform"],
      threshold=0.0 if headline == "svm" else config.eval.threshold,
      dataset=f"{config.data.name} ({results['split']} split)", notes=notes)
