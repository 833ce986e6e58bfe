"""Evaluation reports: the paper's published numbers beside the measured ones, plus a metric card.

Multi-label codebases compute "mAP", "CF1" and friends in subtly different ways (AP variant,
VOC difficult labels, images without labels, top-k and threshold, F1 of means or mean of
F1s), so every report states its protocol in a *metric card*. ``write_report`` writes
``report.json`` (results, card, the paper's rows for the data set) and ``report.md``
(tables laid out like the paper's Table 1 and Table 2).

The ``PAPER_*`` constants are copied from Wang et al., ICCV 2017, Tables 1-6, in percent.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from rma_jax.data.classes import COCO_CLASSES

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")
# The paper's column headers for VOC_CLASSES (Table 1).
VOC_SHORT_NAMES = ("aero", "bike", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                   "cow", "table", "dog", "horse", "mbike", "person", "plant", "sheep", "sofa",
                   "train", "tv")

# Table 1: per-class AP (VOC_CLASSES order) and mAP on VOC 2007 test, in %.
PAPER_VOC2007_AP: dict[str, dict[str, Any]] = {
    name: {"ap": row[:20], "mAP": row[20]} for name, row in (
        ("CNN-SVM [23]", (88.5, 81.0, 83.5, 82.0, 42.0, 72.5, 85.3, 81.6, 59.9, 58.5, 66.5,
                          77.8, 81.8, 78.8, 90.2, 54.8, 71.1, 62.6, 87.2, 71.8, 73.9)),
        ("CNN-RNN [26]", (96.7, 83.1, 94.2, 92.8, 61.2, 82.1, 89.1, 94.2, 64.2, 83.6, 70.0,
                          92.4, 91.7, 84.2, 93.7, 59.8, 93.2, 75.3, 99.7, 78.6, 84.0)),
        ("VeryDeep [24]", (98.9, 95.0, 96.8, 95.4, 69.7, 90.4, 93.5, 96.0, 74.2, 86.6, 87.8,
                           96.0, 96.3, 93.1, 97.2, 70.0, 92.1, 80.3, 98.1, 87.0, 89.7)),
        ("RLSD [31]", (96.4, 92.7, 93.8, 94.1, 71.2, 92.5, 94.2, 95.7, 74.3, 90.0, 74.2,
                       95.4, 96.2, 92.1, 97.9, 66.9, 93.5, 73.7, 97.5, 87.6, 88.5)),
        ("HCP [27]", (98.6, 97.1, 98.0, 95.6, 75.3, 94.7, 95.8, 97.3, 73.1, 90.2, 80.0,
                      97.3, 96.1, 94.9, 96.3, 78.3, 94.7, 76.2, 97.9, 91.5, 90.9)),
        ("FeV+LV [30]", (97.9, 97.0, 96.6, 94.6, 73.6, 93.9, 96.5, 95.5, 73.7, 90.3, 82.8,
                         95.4, 97.7, 95.9, 98.6, 77.6, 88.7, 78.0, 98.3, 89.0, 90.6)),
        ("Ours (512)", (98.5, 96.7, 95.6, 95.7, 73.7, 92.1, 95.8, 96.8, 76.5, 92.9, 87.2,
                        96.6, 97.5, 92.8, 98.3, 76.9, 91.3, 83.6, 98.6, 88.1, 91.3)),
        ("Ours (640)", (97.7, 97.3, 96.4, 95.8, 74.6, 91.9, 96.5, 96.7, 75.2, 89.9, 87.1,
                        96.0, 96.9, 93.2, 98.4, 81.3, 93.4, 81.3, 98.3, 88.5, 91.3)),
        ("Ours", (98.6, 97.4, 96.3, 96.2, 75.2, 92.4, 96.5, 97.1, 76.5, 92.0, 87.7,
                  96.8, 97.5, 93.8, 98.5, 81.6, 93.7, 82.8, 98.6, 89.3, 91.9)),
    )
}

PRF_KEYS = ("CP", "CR", "CF1", "OP", "OR", "OF1")
PRF_HEADERS = ("C-P", "C-R", "C-F1", "O-P", "O-R", "O-F1")

# Table 2: MS-COCO 2014 val, top-3 labels with probability >= 0.5, in %.
PAPER_COCO2014_PRF: dict[str, dict[str, float]] = {
    name: dict(zip(PRF_KEYS, row)) for name, row in (
        ("WARP [10]", (59.3, 52.5, 55.7, 59.8, 61.4, 60.7)),
        ("CNN-RNN [26]", (66.0, 55.6, 60.4, 69.2, 66.4, 67.8)),
        ("RLSD [31]", (67.6, 57.2, 62.0, 70.1, 63.4, 66.5)),
        ("Ours (512)", (77.7, 58.1, 66.5, 83.4, 62.3, 71.3)),
        ("Ours (640)", (78.0, 57.7, 66.3, 83.8, 62.3, 71.4)),
        ("Ours", (79.1, 58.7, 67.4, 84.0, 63.0, 72.0)),
    )
}

# Table 3: VOC 2007 mAP, single crop at 512 x 512.
PAPER_TABLE3_VOC2007_MAP = {"object proposals": 88.6, "attentional regions": 90.4}

# Table 4: VOC 2007 mAP by localisation constraints (A anchor, S scale, P positive),
# ten-crop at 512 x 512.
PAPER_TABLE4_VOC2007_MAP = {"null": 89.9, "S+P": 90.2, "A+S": 90.4, "A+P": 90.3,
                            "A+S+P": 91.3}

# Table 5: MS-COCO by constraints, ten-crop at 512 x 512.
PAPER_TABLE5_COCO2014 = {
    "null": {"CF1": 65.8, "OF1": 70.9, "mAP": 71.5},
    "A+S+P": {"CF1": 66.5, "OF1": 71.3, "mAP": 72.2},
}

# Table 6: mAP by test-time scales and crops.
PAPER_TABLE6_MAP = {
    "s=512 + single-crop": {"voc2007": 90.4, "coco2014": 70.4},
    "s=640 + single-crop": {"voc2007": 90.4, "coco2014": 70.5},
    "s=512 + ten-crop": {"voc2007": 91.3, "coco2014": 72.2},
    "s=640 + ten-crop": {"voc2007": 91.3, "coco2014": 72.3},
    "two scales + ten-crop": {"voc2007": 91.9, "coco2014": 73.4},
}

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
      "notes": [str(n) for n in notes],
  }


def metric_card_from_config(config: Any, **overrides: Any) -> dict[str, Any]:
  """``metric_card`` filled from a run config (``config.data.name`` and ``config.eval``)."""
  e = config.eval
  kw = dict(dataset=config.data.name, ap_mode=e.ap_mode, top_k=e.top_k or None,
            threshold=e.threshold, score_transform=e.score_transform,
            views="ten-view" if e.ten_view else "single-view", scales=tuple(e.scales))
  kw.update(overrides)
  return metric_card(**kw)


def _pct(x: Any) -> str:
  """A fraction as % with one decimal; '–' for a missing value (NaN / None)."""
  if x is None:
    return "–"
  x = float(x)
  return "–" if math.isnan(x) else f"{100.0 * x:.1f}"


def _paper(x: float) -> str:
  return f"{x:.1f}"


def _row(cells: Sequence[str]) -> str:
  return "| " + " | ".join(cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def _is_voc(dataset_name: str, class_names: Sequence[str]) -> bool:
  return dataset_name.lower() in ("voc2007", "voc/2007", "voc07") and (
      tuple(class_names) == VOC_CLASSES)


def _is_coco(dataset_name: str, class_names: Sequence[str] | None = None) -> bool:
  """COCO 2014 itself (a tree of the user's own in COCO format has other classes)."""
  return dataset_name.lower() in ("coco2014", "coco/2014", "coco") and (
      class_names is None or tuple(class_names) == COCO_CLASSES)


def _is_fraction_key(path: str) -> bool:
  """Result entries that are fractions and print in % (mAP variants, recalls)."""
  return "mAP" in path or "recall" in path


def _headline(results: Mapping[str, Any]) -> tuple[Mapping[str, Any], str | None]:
  """The metrics shown in the tables and the name of their protocol.

  ``results`` is either one metrics dict (``MultiLabelMetrics.compute``) or the evaluation's
  nested dict with ``protocols`` (name -> metrics dict) and ``headline`` (a protocol name;
  default the last one).
  """
  protocols = results.get("protocols")
  if isinstance(protocols, Mapping) and protocols:
    name = results.get("headline") or list(protocols)[-1]
    return protocols[name], str(name)
  return results, None


def _extra_lines(d: Mapping[str, Any], skip: Sequence[str], prefix: str = "") -> list[str]:
  """Scalar entries (nested mappings flattened as a.b) as Markdown list items."""
  lines = []
  for k, v in d.items():
    path = f"{prefix}{k}"
    if k in skip:
      continue
    if isinstance(v, Mapping):
      lines += _extra_lines(v, (), prefix=path + ".")
    elif isinstance(v, str) or v is None:
      lines.append(f"- {path}: {v if v is not None else '–'}")
    elif np.ndim(v) == 0:
      if isinstance(v, (bool, np.bool_)) or isinstance(v, (int, np.integer)):
        lines.append(f"- {path}: {v}")
      elif _is_fraction_key(path):
        lines.append(f"- {path}: {_pct(v)} %")
      else:
        lines.append(f"- {path}: {float(v):.4g}")
  return lines


def markdown_report(results: Mapping[str, Any], class_names: Sequence[str], dataset_name: str,
                    card: Mapping[str, Any], *, method_name: str = "This run",
                    sections: Sequence[str] = ()) -> str:
  """Renders results as Markdown tables in the layout of the paper's Tables 1 and 2.

  Args:
    results: one metrics dict as returned by ``MultiLabelMetrics.compute`` (fractions):
      ``ap`` (C,) and ``mAP``, and/or ``CP CR CF1 OP OR OF1``; or a dict with ``protocols``
      (name -> such a metrics dict) and ``headline`` (the protocol shown in the tables; all
      are listed in a summary table). Other scalar entries (nested ones too, e.g.
      ``attention_recall``) are listed at the end.
    class_names: the C class names, in the order of ``ap``.
    dataset_name: ``voc2007`` adds the paper's Table 1 rows (when the classes are VOC's),
      ``coco2014`` the Table 2 rows; both add the matching column of Table 6.
    card: the metric card (``metric_card``), rendered as a list.
    method_name: the label of the measured row.
    sections: extra Markdown lines placed right after the title (e.g. a fusion table).

  Returns:
    The Markdown text. Numbers are in % with one decimal; '–' marks a class without
    positive images. Up to 20 classes the AP table is one row per method (Table 1); with
    more classes it has one row per class.
  """
  m, headline = _headline(results)
  label = f"**{method_name}**" + (f" ({headline})" if headline else "")
  lines = [f"# Evaluation report: {dataset_name}", "", *sections]
  voc, coco = _is_voc(dataset_name, class_names), _is_coco(dataset_name, class_names)
  ap_mode = m.get("ap_mode", card.get("ap_mode", ""))

  if "ap" in m:
    ap = list(m["ap"])
    if len(ap) != len(class_names):
      raise ValueError(f"{len(ap)} APs for {len(class_names)} class names")
    lines += [f"## Average precision ({ap_mode}), % (Table 1 layout)", ""]
    if len(class_names) <= 20:
      header = ["Methods", *(VOC_SHORT_NAMES if voc else class_names), "mAP"]
      rows = []
      if voc:
        rows += [[name, *map(_paper, r["ap"]), _paper(r["mAP"])]
                 for name, r in PAPER_VOC2007_AP.items()]
      rows.append([label, *map(_pct, ap), _pct(m.get("mAP"))])
      lines += _table(header, rows)
    else:
      rows = [[name, _pct(a)] for name, a in zip(class_names, ap)]
      rows.append(["**mAP**", _pct(m.get("mAP"))])
      lines += _table(["Class", label], rows)
    lines.append("")

  if "mAP" in m and (voc or coco):
    key = "voc2007" if voc else "coco2014"
    lines += ["## mAP beside the paper's Table 6, %", ""]
    rows = [[f"Paper: {name}", _paper(v[key])] for name, v in PAPER_TABLE6_MAP.items()]
    rows.append([f"{label}, {card.get('views', '')}, scales {card.get('scales', '')}",
                 _pct(m["mAP"])])
    lines += _table(["Setting", "mAP"], rows)
    lines.append("")

  if all(k in m for k in PRF_KEYS):
    lines += ["## Precision, recall and F1 (Eq. 15), % (Table 2 layout)", ""]
    rows = []
    if coco:
      rows += [[name, *(_paper(r[k]) for k in PRF_KEYS)]
               for name, r in PAPER_COCO2014_PRF.items()]
    rows.append([label, *(_pct(m[k]) for k in PRF_KEYS)])
    lines += _table(["Methods", *PRF_HEADERS], rows)
    lines.append("")

  if isinstance(results.get("pointing"), Mapping):
    lines += _pointing_lines(results["pointing"], class_names)

  if headline is not None:
    lines += ["## All protocols, %", ""]
    rows = [[name + (" (headline)" if name == headline else ""), _pct(p.get("mAP")),
             _pct(p.get("mAP_all")), *(_pct(p.get(k)) for k in ("CF1", "OF1"))]
            for name, p in results["protocols"].items()]
    lines += _table(["Protocol", f"mAP ({ap_mode})", "mAP (all-point)", "C-F1", "O-F1"], rows)
    lines.append("")
    extra = _extra_lines(results, ("protocols", "headline", "class_names", "pointing"))
  else:
    extra = _extra_lines(m, ("ap", "mAP", "ap_mode", *PRF_KEYS))
  if extra:
    lines += ["## Other measurements", "", *extra, ""]

  lines += ["## Metric card", ""]
  for k, v in card.items():
    if isinstance(v, (list, tuple)):
      v = ", ".join(map(str, v)) if v else "none"
    lines.append(f"- **{k}**: {v}")
  lines.append("")
  return "\n".join(lines)


POINTING_ROWS = (("model_regions", "the model's regions"),
                 ("chance", "chance: same sizes, random places"))


def _pointing_lines(pointing: Mapping[str, Any], class_names: Sequence[str]) -> list[str]:
  """The pointing game (``rma_jax.metrics.pointing_game``) of the model and its controls."""
  rows = [(label, pointing[key]) for key, label in POINTING_ROWS if key in pointing]
  if not rows:
    return []
  lines = ["## Pointing game (single view), %", "",
           "Per (image, class present): is the centre of an object of that class inside "
           "the region whose score the max pooling kept? (metric card: notes)", ""]
  lines += _table(["Regions", "hit rate", "mean per-class hit rate", "mean IoU of k*",
                   "pairs"],
                  [[label, _pct(p.get("hit_rate")), _pct(p.get("mean_class_hit_rate")),
                    _pct(p.get("mean_iou")), str(p.get("num_pairs", "–"))]
                   for label, p in rows])
  per_class = [(label, p.get("hit_rate_per_class")) for label, p in rows]
  if all(v is not None and len(v) == len(class_names) for _, v in per_class):
    lines += ["", "Hit rate per class, %:", ""]
    if len(class_names) <= 20:
      lines += _table(["Regions", *class_names],
                      [[label, *map(_pct, v)] for label, v in per_class])
    else:
      lines += _table(["Class", *(label for label, _ in per_class)],
                      [[name, *(_pct(v[i]) for _, v in per_class)]
                       for i, name in enumerate(class_names)])
  lines.append("")
  return lines


def to_jsonable(value: Any) -> Any:
  """Arrays -> lists, NumPy scalars -> Python numbers, NaN/inf -> None (strict JSON)."""
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, (str, bytes)) or value is None:
    return value
  if hasattr(value, "__array__"):
    arr = np.asarray(value)
    return to_jsonable(arr.tolist()) if arr.ndim else to_jsonable(arr.item())
  if isinstance(value, bool):
    return value
  if isinstance(value, int):
    return int(value)
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  return value


def paper_rows(dataset_name: str, class_names: Sequence[str] | None = None
               ) -> dict[str, Any]:
  """The paper's published numbers for a data set (empty for others, and for trees of the
  user's own under the same name: ``class_names`` differ), in %."""
  if dataset_name.lower() in ("voc2007", "voc/2007", "voc07") and (
      class_names is None or tuple(class_names) == VOC_CLASSES):
    return {"table1_ap": {"classes": list(VOC_CLASSES),
                          "rows": {k: {"ap": list(v["ap"]), "mAP": v["mAP"]}
                                   for k, v in PAPER_VOC2007_AP.items()}},
            "table3_map": dict(PAPER_TABLE3_VOC2007_MAP),
            "table4_map": dict(PAPER_TABLE4_VOC2007_MAP),
            "table6_map": {k: v["voc2007"] for k, v in PAPER_TABLE6_MAP.items()}}
  if _is_coco(dataset_name, class_names):
    return {"table2_prf": {k: dict(v) for k, v in PAPER_COCO2014_PRF.items()},
            "table5": {k: dict(v) for k, v in PAPER_TABLE5_COCO2014.items()},
            "table6_map": {k: v["coco2014"] for k, v in PAPER_TABLE6_MAP.items()}}
  return {}


def _write_atomic(path: str, text: str) -> None:
  """Writes to a temporary file in the same folder, then renames it over ``path``."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _views_from_protocol(name: str | None) -> dict[str, Any]:
  """'ten_view@512+640' -> views/scales for the card; {} for names without that pattern."""
  if not name or "@" not in name:
    return {}
  kind, sizes = name.split("@", 1)
  try:
    scales = tuple(int(s) for s in sizes.split("+"))
  except ValueError:
    return {}
  return {"views": kind.replace("_", "-"), "scales": scales}


def card_for_results(results: Mapping[str, Any], dataset_name: str,
                     config: Any = None) -> dict[str, Any]:
  """A metric card derived from the results (and the run config, when given).

  The protocol fields that ``MultiLabelMetrics.compute`` records (``ap_mode``, ``top_k``,
  ``threshold``, ``score_transform``, image counts) win over the config, so the card
  describes what was computed; views and scales come from a ``ten_view@512+640``-style
  headline name.
  """
  m, headline = _headline(results)
  kw: dict[str, Any] = {}
  for key in ("ap_mode", "top_k", "threshold", "score_transform", "prf_score_transform"):
    if key in m:
      kw[key] = m[key]
  if "top_k" in kw:
    kw["top_k"] = kw["top_k"] or None
  kw["num_images"] = m.get("num_images", results.get("num_images"))
  kw["num_images_without_labels"] = m.get("num_images_without_labels")
  kw.update(_views_from_protocol(headline))
  if headline is not None:
    kw["notes"] = [f"tables show the '{headline}' protocol"]
  if config is not None:
    card = metric_card_from_config(config, **kw)
    card["dataset"] = dataset_name
    return card
  return metric_card(dataset=dataset_name, **kw)


def write_report(results: Mapping[str, Any], out_dir: str, *,
                 class_names: Sequence[str] | None = None, dataset_name: str | None = None,
                 card: Mapping[str, Any] | None = None, config: Any = None,
                 method_name: str = "This run", sections: Sequence[str] = ()
                 ) -> tuple[str, str]:
  """Writes ``report.json`` and ``report.md`` into ``out_dir``, each atomically.

  Call it from one process only (``jax.process_index() == 0``) on multi-host runs.

  Args:
    results: metric results (see ``markdown_report``); arrays become lists and NaN becomes
      ``null`` in the JSON.
    out_dir: folder, created if missing (a local path).
    class_names: default ``results["class_names"]``.
    dataset_name: default ``config.data.name``, else ``results["data"]``.
    card: default ``card_for_results(results, dataset_name, config)``.
    config: the run config, used for the defaults above.
    method_name: the label of the measured rows.
    sections: extra Markdown lines after the title of report.md (see ``markdown_report``).

  Returns:
    (path of report.json, path of report.md).
  """
  if class_names is None:
    class_names = results.get("class_names")
    if class_names is None:
      raise ValueError("class_names not given and not in results")
  if dataset_name is None:
    dataset_name = config.data.name if config is not None else str(results.get("data", ""))
  if card is None:
    card = card_for_results(results, dataset_name, config)
  os.makedirs(out_dir, exist_ok=True)
  payload = {
      "dataset": dataset_name,
      "method": method_name,
      "class_names": list(class_names),
      "results": to_jsonable(results),
      "metric_card": to_jsonable(card),
      "paper": paper_rows(dataset_name, class_names),
  }
  json_path = os.path.join(out_dir, "report.json")
  md_path = os.path.join(out_dir, "report.md")
  _write_atomic(json_path, json.dumps(payload, indent=2, allow_nan=False) + "\n")
  _write_atomic(md_path, markdown_report(results, class_names, dataset_name, card,
                                         method_name=method_name, sections=sections))
  return json_path, md_path


def load_report(path: str) -> dict[str, Any]:
  """Reads a ``report.json`` (``null`` values stand for NaN)."""
  with open(path, encoding="utf-8") as f:
    return json.load(f)
