"""Tests of rma_jax.report: the paper's numbers, the Markdown tables, the card and the JSON."""

import json
import math
import os
import re

import numpy as np
import pytest

from rma_jax import paper, report
from rma_jax.data import classes as data_classes
from rma_jax.configs import default as default_config

_PAPER_TXT = "/work/shared/paper.txt"


def test_paper_tables_are_internally_consistent():
  # mAP is the mean of the 20 APs up to the paper's rounding to 0.1 (a mistyped digit in a
  # copied row would move the mean by > 0.05).
  for name, row in paper.PAPER_VOC2007_AP.items():
    assert len(row["ap"]) == 20, name
    assert abs(np.mean(row["ap"]) - row["mAP"]) <= 0.05, name
  # C-F1 / O-F1 are the F1 of the rounded P and R, up to rounding.
  for name, r in paper.PAPER_COCO2014_PRF.items():
    assert abs(2 * r["CP"] * r["CR"] / (r["CP"] + r["CR"]) - r["CF1"]) < 0.15, name
    assert abs(2 * r["OP"] * r["OR"] / (r["OP"] + r["OR"]) - r["OF1"]) < 0.15, name
  assert len(data_classes.VOC_CLASSES) == len(paper.VOC_SHORT_NAMES) == 20


@pytest.mark.skipif(not os.path.exists(_PAPER_TXT), reason="paper text not available")
def test_paper_rows_copied_from_the_paper_text():
  with open(_PAPER_TXT, encoding="utf-8") as f:
    text = f.read()
  number = r"\d+\.\d"
  for name, row in paper.PAPER_VOC2007_AP.items():
    m = re.search(re.escape(name) + r"((?: " + number + r"){21})\n", text)
    assert m, name
    assert tuple(map(float, m.group(1).split())) == (*row["ap"], row["mAP"]), name
  for name, r in paper.PAPER_COCO2014_PRF.items():
    m = re.search(re.escape(name) + r"((?: " + number + r"){6})\n", text)
    assert m, name
    assert tuple(map(float, m.group(1).split())) == tuple(r[k] for k in paper.PRF_KEYS)
  for setting, v in paper.PAPER_TABLE6_MAP.items():
    m = re.search(re.escape(setting) + rf" ({number}) ({number})\n", text)
    assert m and (float(m.group(1)), float(m.group(2))) == (v["voc2007"], v["coco2014"])
  for c, v in paper.PAPER_TABLE4_VOC2007_MAP.items():
    assert re.search(rf"\n{re.escape(c)} {v}\n", text), c
  for c, v in paper.PAPER_TABLE5_COCO2014.items():
    assert f"\n{c} {v['CF1']} {v['OF1']} {v['mAP']}\n" in text
  for c, v in paper.PAPER_TABLE3_VOC2007_MAP.items():
    assert f"\n{c} {v}\n" in text


def _voc_results():
  ap = np.linspace(0.5, 0.975, 20)
  ap[3] = np.nan  # a class without positives
  return {"ap": ap, "mAP": float(np.nanmean(ap)), "ap_mode": "voc07",
          "CP": 0.81234, "CR": 0.5, "CF1": 0.6190, "OP": 0.9, "OR": 0.25, "OF1": 0.3913,
          "mAP_all": 0.7777, "num_images": 4952, "attention_recall": 0.6543,
          "loss": 1.2345}


def test_markdown_voc_has_paper_rows_measured_row_and_card():
  res = _voc_results()
  card = report.metric_card(dataset="voc2007", ap_mode="voc07", num_images=4952)
  md = report.markdown_report(res, data_classes.VOC_CLASSES, "voc2007", card)
  lines = md.splitlines()
  header = next(l for l in lines if l.startswith("| Methods | aero"))
  assert header.split(" | ")[1:4] == ["aero", "bike", "bird"] and "| tv | mAP |" in header
  # Every paper row of Table 1, verbatim.
  for name, row in paper.PAPER_VOC2007_AP.items():
    cells = " | ".join(f"{x:.1f}" for x in (*row["ap"], row["mAP"]))
    assert f"| {name} | {cells} |" in lines
  assert "| Ours | 98.6 | 97.4 | 96.3 |" in md
  measured = next(l for l in lines if l.startswith("| **This run** | 50.0"))
  cells = measured.strip("| ").split(" | ")
  assert cells[1] == "50.0" and cells[4] == "–"  # NaN class shown as a dash
  assert len(cells) == 22 and cells[21] == f"{100 * np.nanmean(res['ap']):.1f}"
  assert cells[2] == f"{100 * res['ap'][1]:.1f}"
  # Table 2 layout with the measured numbers in %, one decimal; no COCO rows for VOC.
  assert "| Methods | C-P | C-R | C-F1 | O-P | O-R | O-F1 |" in md
  assert "| **This run** | 81.2 | 50.0 | 61.9 | 90.0 | 25.0 | 39.1 |" in md
  assert "WARP" not in md
  # Table 6 context and other measurements.
  assert "| Paper: two scales + ten-crop | 91.9 |" in md
  # The peers' published VOC 2007 mAP after it (ML-GCN's README: 94.0), none of COCO's.
  assert "| Peer: ML-GCN, ResNet-101, 448² | 94.0 |" in md and "ADD-GCN" not in md
  assert "- attention_recall: 65.4 %" in md and "- mAP_all: 77.8 %" in md
  assert "- loss: 1.234" in md and "- num_images: 4952" in md
  # The card as a list, stating the protocol.
  assert "- **ap_variant**: VOC 2007 devkit 11-point" in md
  assert "not the mean of per-class F1" in md
  assert "difficult" in md and "ignored for that class" in md


def test_markdown_coco_has_table2_rows_and_long_ap_table():
  from rma_jax.data.classes import COCO_CLASSES  # pylint: disable=g-import-not-at-top
  names = list(COCO_CLASSES)
  ap = np.full(80, 0.5)
  res = {"ap": ap, "mAP": 0.5, "CP": 0.1, "CR": 0.2, "CF1": 0.3, "OP": 0.4, "OR": 0.5,
         "OF1": 0.6}
  card = report.metric_card(dataset="coco2014", ap_mode="all", top_k=3, threshold=0.5,
                            num_images_without_labels=48)
  md = report.markdown_report(res, names, "coco2014", card, method_name="RMA demo")
  for name, r in paper.PAPER_COCO2014_PRF.items():
    assert f"| {name} | " + " | ".join(f"{r[k]:.1f}" for k in paper.PRF_KEYS) + " |" in md
  assert "| **RMA demo** | 10.0 | 20.0 | 30.0 | 40.0 | 50.0 | 60.0 |" in md
  assert "| toothbrush | 50.0 |" in md and "| **mAP** | 50.0 |" in md
  assert "| Paper: two scales + ten-crop | 73.4 |" in md
  assert "| Peer: ML-GCN, ResNet-101, 448² | 83.0 |" in md
  assert "| Peer: ADD-GCN, ResNet-101, 576² | 85.2 |" in md
  assert "CNN-SVM" not in md  # no VOC rows
  assert "48 images without any label were kept" in md
  assert "not applicable" in md  # no difficult labels on COCO
  # A COCO-format tree of one's own under the same name: its own classes, no paper rows.
  own = report.markdown_report(res, [f"class{i}" for i in range(80)], "coco2014", card)
  assert "| class79 | 50.0 |" in own and "Paper:" not in own and "CNN-RNN" not in own
  assert "Peer:" not in own
  assert report.paper_rows("coco2014", names) and not report.paper_rows("coco2014", ["a"])


def test_metric_card_fields_and_config():
  card = report.metric_card(dataset="demo", ap_mode="all", top_k=None, threshold=0.25,
                            score_transform="sigmoid", views="single-view", scales=(96,))
  assert card["top_k"] is None and "every score >= 0.25" in card["predicted_labels"]
  assert "sklearn" in card["ap_variant"] and card["scales"] == [96]
  cfg = default_config.get_config()
  card = report.metric_card_from_config(cfg, num_images=10)
  assert card["dataset"] == cfg.data.name and card["ap_mode"] == cfg.eval.ap_mode
  assert card["top_k"] == cfg.eval.top_k and card["threshold"] == cfg.eval.threshold
  assert card["views"] == "ten-view" and card["scales"] == list(cfg.eval.scales)
  assert card["num_images"] == 10
  with pytest.raises(ValueError):
    report.metric_card(dataset="voc2007", ap_mode="coco")


def test_write_report_json_round_trip_and_atomic(tmp_path):
  res = _voc_results()
  card = report.metric_card(dataset="voc2007")
  out = tmp_path / "eval"
  json_path, md_path = report.write_report(res, str(out), class_names=data_classes.VOC_CLASSES,
                                           dataset_name="voc2007", card=card)
  assert sorted(os.listdir(out)) == ["report.json", "report.md"]  # no temp files left
  # Strict JSON: no NaN literal anywhere.
  with open(json_path, encoding="utf-8") as f:
    data = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
  assert data == report.load_report(json_path)
  assert data["results"] == report.to_jsonable(res)
  assert data["metric_card"] == card
  ap = data["results"]["ap"]
  assert ap[3] is None
  np.testing.assert_allclose([math.nan if a is None else a for a in ap], res["ap"])
  assert data["results"]["CP"] == res["CP"] and data["results"]["num_images"] == 4952
  assert data["class_names"] == list(data_classes.VOC_CLASSES)
  assert data["paper"]["table1_ap"]["rows"]["Ours"]["mAP"] == 91.9
  with open(md_path, encoding="utf-8") as f:
    assert f.read() == report.markdown_report(res, data_classes.VOC_CLASSES, "voc2007", card)
  # Rewriting replaces both files.
  res["CP"] = 0.5
  report.write_report(res, str(out), class_names=data_classes.VOC_CLASSES, dataset_name="voc2007",
                      card=card)
  assert report.load_report(json_path)["results"]["CP"] == 0.5
  assert sorted(os.listdir(out)) == ["report.json", "report.md"]


def test_write_report_nested_protocols_with_config(tmp_path):
  # The evaluation's layout: several protocols, a headline, nested extras, a config.
  from rma_jax import metrics
  rng = np.random.default_rng(0)
  scores, labels = rng.normal(size=(30, 20)), (rng.random((30, 20)) < 0.2).astype(int)
  labels[0] = 1
  acc = metrics.MultiLabelMetrics.empty().update(scores=scores, labels=labels)
  single = acc.compute(ap_mode="voc07", k=3, threshold=0.5, score_transform="softmax")
  fused = acc.compute(ap_mode="voc07", k=None, threshold=0.0, score_transform="none")
  results = {"class_names": list(data_classes.VOC_CLASSES), "data": "voc2007", "step": 7,
             "protocols": {"single_view@448": single, "ten_view@512+640": fused},
             "headline": "ten_view@512+640",
             "attention_recall": {"model_regions": 0.625, "fixed_anchor_boxes": 0.5}}
  cfg = default_config.get_config()
  json_path, md_path = report.write_report(results, str(tmp_path), config=cfg)
  data = report.load_report(json_path)
  card = data["metric_card"]
  # The card describes the headline protocol as computed, not the config's defaults.
  assert card["dataset"] == "voc2007" and card["threshold"] == 0.0 and card["top_k"] is None
  assert card["score_transform"] == "none" and card["views"] == "ten-view"
  assert card["scales"] == [512, 640] and card["num_images"] == 30
  assert data["results"]["protocols"]["single_view@448"]["CP"] == pytest.approx(single["CP"])
  with open(md_path, encoding="utf-8") as f:
    md = f.read()
  row = "| **This run** (ten_view@512+640) | " + " | ".join(
      "–" if np.isnan(a) else f"{100 * a:.1f}" for a in fused["ap"])
  assert row in md
  assert (f"| single_view@448 | {100 * single['mAP']:.1f} | {100 * single['mAP_all']:.1f} | "
          f"{100 * single['CF1']:.1f} | {100 * single['OF1']:.1f} |") in md
  assert "| ten_view@512+640 (headline) |" in md
  assert "- attention_recall.model_regions: 62.5 %" in md and "- step: 7" in md
  assert "| Ours | 98.6 |" in md


def test_markdown_report_pointing_section():
  from rma_jax import metrics
  rng = np.random.default_rng(0)
  scores, labels = rng.normal(size=(6, 3)), np.eye(3)[[0, 1, 2, 0, 1, 2]]
  acc = metrics.MultiLabelMetrics.empty().update(scores=scores, labels=labels)
  model = {"hit_rate": 0.625, "mean_class_hit_rate": 0.5, "mean_iou": 0.25, "num_pairs": 8,
           "hit_rate_per_class": [1.0, 0.25, float("nan")]}
  chance = dict(model, hit_rate=0.125, hit_rate_per_class=[0.0, 0.5, float("nan")])
  results = {"protocols": {"single_view@96": acc.compute()}, "headline": "single_view@96",
             "pointing": {"model_regions": model, "chance": chance}}
  md = report.markdown_report(results, ["a", "b", "c"], "demo", report.metric_card(
      dataset="demo"))
  assert "| the model's regions | 62.5 | 50.0 | 25.0 | 8 |" in md
  assert "| chance: same sizes, random places | 12.5 |" in md
  assert "| the model's regions | 100.0 | 25.0 | – |" in md  # per class
  assert "pointing." not in md  # not repeated among the other measurements


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_report_files_honour_the_umask(tmp_path, umask):
  """report.json and report.md are ordinary files: 0666 less the umask (they were 0600)."""
  old = os.umask(umask)
  try:
    paths = report.write_report(_voc_results(), str(tmp_path), class_names=data_classes.VOC_CLASSES,
                                dataset_name="voc2007", card=report.metric_card(dataset="voc2007"))
  finally:
    os.umask(old)
  for path in paths:
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, path


def test_all_protocols_table_has_one_map_column_per_ap_variant():
  """With ap_mode 'all' the report's AP is the all-point AP: one mAP column, not two equal
  ones; with 'voc07' the all-point mAP stands beside it."""
  from rma_jax import metrics
  rng = np.random.default_rng(0)
  scores, labels = rng.normal(size=(20, 3)), np.eye(3)[rng.integers(0, 3, 20)]
  acc = metrics.MultiLabelMetrics.empty().update(scores=scores, labels=labels)
  for ap_mode, header in (("all", "| Protocol | mAP (all) | C-F1 | O-F1 |"),
                          ("voc07", "| Protocol | mAP (voc07) | mAP (all-point) | C-F1 | O-F1 |")):
    m = acc.compute(ap_mode=ap_mode)
    results = {"protocols": {"single_view@96": m}, "headline": "single_view@96"}
    md = report.markdown_report(results, ["a", "b", "c"], "demo",
                                report.metric_card(dataset="demo", ap_mode=ap_mode))
    table = md.split("## All protocols, %\n\n")[1].split("\n\n")[0].splitlines()
    assert table[0] == header, ap_mode
    cells = [f"{100 * m[k]:.1f}" for k in ("mAP",) + (() if ap_mode == "all" else ("mAP_all",))
             + ("CF1", "OF1")]
    assert table[2] == "| single_view@96 (headline) | " + " | ".join(cells) + " |"
