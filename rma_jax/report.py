"""Evaluation reports: the measured numbers beside the paper's, and the metric card.

``write_report`` writes ``report.json`` (results, card, the paper's rows for the data set)
and ``report.md`` (tables laid out like the paper's Table 1 and Table 2, every protocol,
the pointing game, the metric card); ``write_evaluation_report`` does it for the results of
``rma_jax.evaluate.evaluate_and_report``. The paper's numbers are ``rma_jax.paper``, the
card ``rma_jax.metric_card``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from rma_jax import paths
from rma_jax.data.classes import paper_dataset
from rma_jax.metric_card import evaluation_card, metric_card, metric_card_from_config
from rma_jax.paper import (PAPER_COCO2014_PRF, PAPER_TABLE6_MAP, PAPER_VOC2007_AP, PRF_HEADERS,
                           PRF_KEYS, VOC_SHORT_NAMES, paper_rows, peers_map)


def pct(x: Any) -> str:
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
        lines.append(f"- {path}: {pct(v)} %")
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
  dataset = paper_dataset(dataset_name, class_names)
  voc, coco = dataset == "voc2007", dataset == "coco2014"
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
      rows.append([label, *map(pct, ap), pct(m.get("mAP"))])
      lines += _table(header, rows)
    else:
      rows = [[name, pct(a)] for name, a in zip(class_names, ap)]
      rows.append(["**mAP**", pct(m.get("mAP"))])
      lines += _table(["Class", label], rows)
    lines.append("")

  if "mAP" in m and (voc or coco):
    key = "voc2007" if voc else "coco2014"
    lines += ["## mAP beside the paper's Table 6 and the peers' published mAP, %", ""]
    rows = [[f"Paper: {name}", _paper(v[key])] for name, v in PAPER_TABLE6_MAP.items()]
    rows += [[f"Peer: {name}", _paper(v)] for name, v in peers_map(key).items()]
    rows.append([f"{label}, {card.get('views', '')}, scales {card.get('scales', '')}",
                 pct(m["mAP"])])
    lines += _table(["Setting", "mAP"], rows)
    lines.append("")

  if all(k in m for k in PRF_KEYS):
    lines += ["## Precision, recall and F1 (Eq. 15), % (Table 2 layout)", ""]
    rows = []
    if coco:
      rows += [[name, *(_paper(r[k]) for k in PRF_KEYS)]
               for name, r in PAPER_COCO2014_PRF.items()]
    rows.append([label, *(pct(m[k]) for k in PRF_KEYS)])
    lines += _table(["Methods", *PRF_HEADERS], rows)
    lines.append("")

  if isinstance(results.get("pointing"), Mapping):
    lines += _pointing_lines(results["pointing"], class_names)

  if headline is not None:
    lines += ["## All protocols, %", ""]
    # mAP in the report's AP variant, and all-point mAP beside it unless that is the same.
    keys = ("mAP",) + (() if ap_mode == "all" else ("mAP_all",)) + ("CF1", "OF1")
    headers = {"mAP": f"mAP ({ap_mode})", "mAP_all": "mAP (all-point)", "CF1": "C-F1",
               "OF1": "O-F1"}
    rows = [[name + (" (headline)" if name == headline else ""),
             *(pct(p.get(k)) for k in keys)] for name, p in results["protocols"].items()]
    lines += _table(["Protocol", *(headers[k] for k in keys)], rows)
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
                  [[label, pct(p.get("hit_rate")), pct(p.get("mean_class_hit_rate")),
                    pct(p.get("mean_iou")), str(p.get("num_pairs", "–"))]
                   for label, p in rows])
  per_class = [(label, p.get("hit_rate_per_class")) for label, p in rows]
  if all(v is not None and len(v) == len(class_names) for _, v in per_class):
    lines += ["", "Hit rate per class, %:", ""]
    if len(class_names) <= 20:
      lines += _table(["Regions", *class_names],
                      [[label, *map(pct, v)] for label, v in per_class])
    else:
      lines += _table(["Class", *(label for label, _ in per_class)],
                      [[name, *(pct(v[i]) for _, v in per_class)]
                       for i, name in enumerate(class_names)])
  lines.append("")
  return lines


def to_jsonable(value: Any, *, strict: bool = True) -> Any:
  """Arrays -> lists, NumPy scalars -> Python numbers, keys -> str; with ``strict``, NaN and
  inf -> None (strict JSON), else they stay floats."""
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v, strict=strict) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v, strict=strict) for v in value]
  if isinstance(value, (str, bytes)) or value is None:
    return value
  if hasattr(value, "__array__"):
    arr = np.asarray(value)
    return to_jsonable(arr.tolist() if arr.ndim else arr.item(), strict=strict)
  if isinstance(value, bool):
    return value
  if isinstance(value, int):
    return int(value)
  if isinstance(value, float):
    return value if math.isfinite(value) or not strict else None
  return value


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
  paths.path(out_dir).mkdir(parents=True, exist_ok=True)
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
  paths.write_atomic(json_path, json.dumps(payload, indent=2, allow_nan=False) + "\n")
  paths.write_atomic(md_path, markdown_report(results, class_names, dataset_name, card,
                                         method_name=method_name, sections=sections))
  return json_path, md_path


def load_report(path: str) -> dict[str, Any]:
  """Reads a ``report.json`` (``null`` values stand for NaN)."""
  return json.loads(paths.path(path).read_text(encoding="utf-8"))


def write_evaluation_report(results: dict[str, Any], config: ml_collections.ConfigDict,
                            out_dir: str, scales: Sequence[tuple[int, int]]
                            ) -> tuple[str, str]:
  """``write_report`` for ``evaluate_and_report``'s results: the headline protocol in the
  paper's table layout, every protocol's numbers, attention recall and the pointing game,
  and ``metric_card.evaluation_card`` (with notes on how each protocol was computed).

  Returns:
    (path of report.json, path of report.md).
  """
  return write_report(results, out_dir, class_names=results["class_names"],
                      dataset_name=config.data.name,
                      card=evaluation_card(results, config, scales),
                      method_name=f"This run ({config.model.name})")
