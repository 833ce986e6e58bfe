"""The paper's published numbers (Wang et al., ICCV 2017, Tables 1-6, in percent), and the
peers' published mAP on the same data sets (``PEERS_MAP``), which the reports print beside the
measured ones.
"""

from __future__ import annotations

from typing import Any, Sequence

from rma_jax.data.classes import VOC_CLASSES, paper_dataset

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


# Peers' published mAP (%) on VOC 2007 test and MS-COCO 2014 val, each row named with its
# backbone and input size; sources (what was read) in docs/evaluation.md, "The peers' rows".
# Figures that could not be confirmed there are left out (ADD-GCN on VOC 2007).
PEERS_MAP = {
    "ML-GCN, ResNet-101, 448²": {"voc2007": 94.0, "coco2014": 83.0},
    "ADD-GCN, ResNet-101, 448²": {"coco2014": 84.2},
    "ADD-GCN, ResNet-101, 576²": {"coco2014": 85.2},
    "ASL, TResNet-L, 448²": {"coco2014": 86.6},
    "ASL, TResNet-XL, 448²": {"voc2007": 96.0},
}


def paper_rows(dataset_name: str, class_names: Sequence[str] | None = None
               ) -> dict[str, Any]:
  """The paper's published numbers for a data set, and the peers' mAP (``peers_map``); empty
  for other data sets, and for trees of the user's own under the same name (``class_names``
  differ); in %."""
  dataset = paper_dataset(dataset_name, class_names)
  if dataset == "voc2007":
    return {"table1_ap": {"classes": list(VOC_CLASSES),
                          "rows": {k: {"ap": list(v["ap"]), "mAP": v["mAP"]}
                                   for k, v in PAPER_VOC2007_AP.items()}},
            "table3_map": dict(PAPER_TABLE3_VOC2007_MAP),
            "table4_map": dict(PAPER_TABLE4_VOC2007_MAP),
            "table6_map": {k: v["voc2007"] for k, v in PAPER_TABLE6_MAP.items()},
            "peers_map": peers_map("voc2007")}
  if dataset == "coco2014":
    return {"table2_prf": {k: dict(v) for k, v in PAPER_COCO2014_PRF.items()},
            "table5": {k: dict(v) for k, v in PAPER_TABLE5_COCO2014.items()},
            "table6_map": {k: v["coco2014"] for k, v in PAPER_TABLE6_MAP.items()},
            "peers_map": peers_map("coco2014")}
  return {}


def peers_map(dataset: str) -> dict[str, float]:
  """``PEERS_MAP``'s rows that have a figure for ``dataset`` ('voc2007' or 'coco2014')."""
  return {name: v[dataset] for name, v in PEERS_MAP.items() if dataset in v}
