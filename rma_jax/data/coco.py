"""MS-COCO 2014 from a local folder in its native layout.

``<root>/annotations/instances_{train,val}2014.json`` and the image folders
``<root>/{train,val}2014/``. COCO's 80 category ids run from 1 to 90 with gaps; classes are
numbered 0..C-1 in category-id order (the order of TFDS coco/2014), with the names taken from
the JSON file, so a user's own data in COCO format brings its own classes.

Outcomes for bad data (logged with the file name and counted in ``source.skipped``): an
annotation whose ``category_id`` is not among the categories skips its image (its labels are
untrustworthy); an annotation that names an unknown image is ignored with a warning; a
missing image file is skipped at scan time; an unreadable image when it is decoded. Images
without annotations are kept with all-zero labels (the loss masks them; note the paper's
counts, 82,081 train / 40,137 val, leave them out).
"""

from __future__ import annotations

import collections
import json
import logging
import os

import numpy as np

from rma_jax.data.sources import RecordSource, SkipReport, make_record

logger = logging.getLogger(__name__)

# TFDS coco/2014 label names (category-id order), for sources that do not carry them.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

_SPLIT_ALIASES = {"validation": "val", "train2014": "train", "val2014": "val"}


def coco_split_paths(root: str, split: str) -> tuple[str, str]:
  """(annotation json, image folder) of ``split`` ('train' | 'val' or any 'X' with
  ``annotations/instances_X2014.json`` and ``X2014/``), checked to exist.

  Raises:
    FileNotFoundError: naming the missing path.
  """
  root = os.path.expanduser(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"data.data_dir {root!r} does not exist or is not a folder")
  split = _SPLIT_ALIASES.get(split, split)
  ann = os.path.join(root, "annotations", f"instances_{split}2014.json")
  img_dir = os.path.join(root, f"{split}2014")
  if not os.path.isfile(ann):
    raise FileNotFoundError(f"COCO annotation file {ann!r} does not exist (split {split!r}); "
                            "expected <data_dir>/annotations/instances_{train,val}2014.json")
  if not os.path.isdir(img_dir):
    raise FileNotFoundError(f"COCO image folder {img_dir!r} does not exist (split {split!r})")
  return ann, img_dir


def load_coco_split(root: str, split: str, *, max_pixels: int | None = None) -> RecordSource:
  """Reads one split's instances JSON into a lazily decoding source.

  Args:
    root: the COCO root folder.
    split: 'train' or 'val' (aliases 'validation', 'train2014', 'val2014').
    max_pixels: images above this many pixels are refused at decode time.

  Returns:
    A :class:`RecordSource` named ``coco2014:<split>``, examples in image-id order.
  """
  ann_path, img_dir = coco_split_paths(root, split)
  name = f"coco2014:{split}"
  skipped = SkipReport(name)
  try:
    with open(ann_path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read COCO annotation file {ann_path!r}: {e}") from e
  cats = sorted(data.get("categories", []), key=lambda c: c["id"])
  if not cats:
    raise ValueError(f"{ann_path!r} has no categories")
  cat_index = {c["id"]: i for i, c in enumerate(cats)}
  class_names = tuple(c["name"] for c in cats)
  images = {im["id"]: im for im in data.get("images", [])}
  per_image = collections.defaultdict(list)
  orphans = 0
  for a in data.get("annotations", []):
    if a.get("image_id") in images:
      per_image[a["image_id"]].append(a)
    else:
      orphans += 1
  if orphans:
    # Annotations, not examples: logged, not counted as skipped examples.
    logger.warning("%s: %d annotations in %s name an image id that is not in 'images'; "
                   "they are ignored", name, orphans, ann_path)
  records = []
  for image_id in sorted(images):
    im = images[image_id]
    path = os.path.join(img_dir, im["file_name"])
    anns = per_image.get(image_id, [])
    unknown = sorted({a["category_id"] for a in anns if a["category_id"] not in cat_index})
    if unknown:
      skipped.add_scan(path, f"annotations with unknown category_id {unknown} in {ann_path}")
      continue
    if not os.path.isfile(path):
      skipped.add_scan(path, "image file missing")
      continue
    w, h = float(im.get("width") or 0), float(im.get("height") or 0)
    boxes = np.asarray([a["bbox"] for a in anns], np.float32).reshape(-1, 4)  # x, y, w, h
    if len(boxes):
      if w <= 0 or h <= 0:
        skipped.add_scan(path, f"image {image_id} has no width/height in {ann_path}")
        continue
      boxes = np.stack([boxes[:, 0] / w, boxes[:, 1] / h, (boxes[:, 0] + boxes[:, 2]) / w,
                        (boxes[:, 1] + boxes[:, 3]) / h], axis=1)
    # Crowd regions still show the class, so they count towards the labels (as in TFDS).
    records.append(make_record(str(image_id), path, [cat_index[a["category_id"]] for a in anns],
                               boxes, None, len(class_names)))
  return RecordSource(name, records, class_names, max_pixels=max_pixels, skipped=skipped)
