"""COCO-format trees: MS-COCO 2014 in its native layout, and any data set written that way.

``<root>/annotations/instances_<split>2014.json`` (or ``instances_<split>.json``) and the
image folder ``<root>/<split>2014/`` (or ``<root>/<split>/``). Without a given class list the
classes are the JSON's categories in category-id order (the order of TFDS coco/2014; COCO's
80 ids run from 1 to 90 with gaps), named as in the JSON; a given list (the training split's,
for the other splits) is matched to the categories by name. An example's identity is its
image file, so train and val JSONs that both number their images from 1 do not collide: ids
are the image paths.

Errors (the JSON cannot be trusted as a whole; each names the JSON and the ids): unreadable
JSON, no categories, a category without id or name, a category id or name used twice, an
image id used twice.

Skipped examples (logged, counted in ``source.skipped``): an image entry without ``id`` or
``file_name``; an image with an annotation of an unknown category or without
``category_id`` (its labels are untrustworthy); a missing image file; an unreadable image,
when it is decoded. Kept, with a logged note: an annotation without a usable ``bbox``
(missing, not 4 numbers, negative size) still gives its class to the image, without a box;
annotations that name an image id not in ``images`` are ignored. Images without annotations
are kept with all-zero labels (the loss masks them; the paper's counts, 82,081 train / 40,137
val, leave them out).
"""

from __future__ import annotations

import collections
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from rma_jax import paths
from rma_jax.data import classes as classes_lib
from rma_jax.data import decode
from rma_jax.data import files
from rma_jax.data.classes import COCO_CLASSES
from rma_jax.data.source import DataError, RecordSource, SkipReport, make_record

__all__ = ["COCO_CLASSES", "coco_split_paths", "load_coco_split"]

_SPLIT_ALIASES = {"validation": "val", "train2014": "train", "val2014": "val"}


def coco_split_paths(root: str, split: str) -> tuple[str, str]:
  """(annotation json, image folder) of ``split``, checked to exist.

  ``split`` 'train' | 'val' (aliases 'validation', 'train2014', 'val2014') or any 'X' with
  ``annotations/instances_X2014.json`` or ``annotations/instances_X.json``, and the image
  folder ``X2014/`` or ``X/``.

  Raises:
    FileNotFoundError: naming the missing paths.
  """
  root = os.path.expanduser(root)
  if not paths.isdir(root):
    raise FileNotFoundError(f"data.data_dir {root!r} does not exist or is not a folder")
  split = _SPLIT_ALIASES.get(split, split)
  anns = [os.path.join(root, "annotations", f"instances_{split}{y}.json") for y in ("2014", "")]
  dirs = [os.path.join(root, f"{split}{y}") for y in ("2014", "")]
  ann = next((p for p in anns if paths.isfile(p)), None)
  img_dir = next((p for p in dirs if paths.isdir(p)), None)
  if ann is None:
    raise FileNotFoundError(f"COCO annotation file {anns[0]!r} does not exist (split {split!r}; "
                            f"nor {os.path.basename(anns[1])}); expected "
                            "<data_dir>/annotations/instances_<split>2014.json")
  if img_dir is None:
    raise FileNotFoundError(f"COCO image folder {dirs[0]!r} does not exist (split {split!r}; "
                            f"nor {dirs[1]!r})")
  return ann, img_dir


def _categories(data: dict, ann_path: str) -> list[tuple[Any, str]]:
  """(id, name) of every category, in id order; raises ValueError for unusable ones."""
  cats = data.get("categories")
  if not isinstance(cats, list) or not cats:
    raise DataError(f"{ann_path} has no categories")
  by_id: dict[Any, tuple[int, str]] = {}
  by_name: dict[str, tuple[int, Any]] = {}
  dup_ids, dup_names = [], []
  for j, c in enumerate(cats):
    if not isinstance(c, dict) or "id" not in c or not str(c.get("name") or "").strip():
      raise DataError(f"{ann_path}: categories[{j}] = {c!r} has no id or no name")
    cid, name = c["id"], str(c["name"]).strip()
    if cid in by_id:
      dup_ids.append(f"id {cid!r} is both {by_id[cid][1]!r} (categories[{by_id[cid][0]}]) and "
                     f"{name!r} (categories[{j}])")
    if name in by_name:
      dup_names.append(f"{name!r} has ids {by_name[name][1]!r} and {cid!r}")
    by_id.setdefault(cid, (j, name))
    by_name.setdefault(name, (j, cid))
  if dup_ids:
    raise DataError(f"{ann_path}: duplicate category id(s): {'; '.join(dup_ids[:5])}. "
                     "Each category needs its own id (one class would be unreachable).")
  if dup_names:
    raise DataError(f"{ann_path}: duplicate category name(s): {'; '.join(dup_names[:5])}. "
                     "Class names must be unique.")
  try:
    ordered = sorted(by_id)
  except TypeError as e:
    raise DataError(f"{ann_path}: category ids {list(by_id)} cannot be ordered ({e}); use "
                     "integer ids") from e
  return [(cid, by_id[cid][1]) for cid in ordered]


def _box(bbox: Any) -> list[float] | None:
  """A COCO [x, y, width, height] as 4 floats, or None when it is not one."""
  if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
    return None
  try:
    b = [float(v) for v in bbox]
  except (TypeError, ValueError):
    return None
  if not all(math.isfinite(v) for v in b) or b[2] < 0 or b[3] < 0:
    return None
  return b


def load_coco_split(root: str, split: str, *, max_pixels: int | None = None,
                    class_names: Sequence[str] | None = None, dataset: str = "coco2014",
                    class_origin: str = "") -> RecordSource:
  """Reads one split's instances JSON into a lazily decoding source.

  Args:
    root: the COCO root folder.
    split: see :func:`coco_split_paths`.
    max_pixels: images above this many pixels are refused at decode time.
    class_names: the classes in index order, matched to the JSON's categories by name;
      None: the JSON's categories in id order.
    dataset: names the source (``<dataset>:<split>``) in logs and errors.
    class_origin: where ``class_names`` came from (recorded on the source).

  Returns:
    A :class:`RecordSource` named ``<dataset>:<split>``, examples in image-id order, ids the
    image paths.

  Raises:
    ValueError: the JSON is unreadable or has duplicate category or image ids (named).
  """
  ann_path, img_dir = coco_split_paths(root, split)
  name = f"{dataset}:{split}"
  skipped = SkipReport(name)
  try:
    data = json.loads(files.read_text(ann_path))
  except (OSError, ValueError) as e:
    raise DataError(f"cannot read COCO annotation file {ann_path!r}: {e}") from e
  if not isinstance(data, dict):
    raise DataError(f"{ann_path}: expected a JSON object with images, annotations and "
                     f"categories, got {type(data).__name__}")
  cats = _categories(data, ann_path)
  if class_names is None:
    class_names = tuple(n for _, n in cats)
    class_origin = f"the categories of {ann_path}"
  class_names = tuple(class_names)
  class_of_name = {n: i for i, n in enumerate(class_names)}
  cat_names = dict(cats)

  images: dict[Any, dict] = {}
  dup_images = []
  for j, im in enumerate(data.get("images") or []):
    if not isinstance(im, dict) or "id" not in im:
      skipped.add_scan(f"{ann_path} images[{j}]", f"image entry without 'id': {im!r:.200}",
                       "image entry without id")
      continue
    if im["id"] in images:
      dup_images.append(f"id {im['id']!r} is both {images[im['id']].get('file_name')!r} and "
                        f"{im.get('file_name')!r}")
      continue
    images[im["id"]] = im
  if dup_images:
    raise DataError(f"{ann_path}: duplicate image id(s): {'; '.join(dup_images[:5])}"
                     f"{' ...' if len(dup_images) > 5 else ''}. Image ids must be unique "
                     "within a JSON (annotations would go to the wrong image).")

  per_image = collections.defaultdict(list)
  orphans = 0
  for j, a in enumerate(data.get("annotations") or []):
    image_id = a.get("image_id") if isinstance(a, dict) else None
    if image_id in images:
      per_image[image_id].append((j, a))
    else:
      orphans += 1
  if orphans:
    # Annotations, not examples: noted, not counted as skipped examples.
    skipped.add_note(ann_path, f"{orphans} annotations name no image id of 'images' (or are "
                     "not objects); they are ignored")

  try:
    order = sorted(images)
  except TypeError:
    order = list(images)  # Mixed id types: keep the file's order.
  records = []
  for image_id in order:
    im = images[image_id]
    file_name = im.get("file_name")
    if not isinstance(file_name, str) or not file_name.strip():
      skipped.add_scan(f"{ann_path} image id {image_id!r}", "image entry without file_name",
                       "image without file_name")
      continue
    path = os.path.join(img_dir, file_name)
    box_labels, boxes, image_labels, problems = [], [], [], []
    for j, a in per_image.get(image_id, []):
      entry = f"annotation {a.get('id', f'#{j}')!r}"
      if "category_id" not in a:
        problems.append((f"{entry} has no category_id", "annotation without category_id"))
        continue
      cid = a["category_id"]
      if cid not in cat_names:
        problems.append((f"{entry} has unknown category_id {cid!r}", "unknown class"))
        continue
      if cat_names[cid] not in class_of_name:
        problems.append((f"{entry} has category {cat_names[cid]!r}, not one of "
                         f"{classes_lib.describe(class_names)}", "unknown class"))
        continue
      c = class_of_name[cat_names[cid]]
      box = _box(a.get("bbox"))
      if box is None:
        skipped.add_note(f"{ann_path} {entry} (image {file_name})",
                         f"bbox {a.get('bbox')!r} is not [x, y, width, height]; the "
                         "annotation's class counts for the image, without a box")
        image_labels.append(c)
        continue
      box_labels.append(c)
      boxes.append(box)
    if problems:
      skipped.add_scan(f"{path} ({ann_path}, image id {image_id!r})",
                       "; ".join(p for p, _ in problems[:3]), problems[0][1])
      continue
    problem = paths.file_problem(path)
    if problem is not None:
      skipped.add_scan(path, f"image file {problem}", paths.problem_cause(problem))
      continue
    b = np.asarray(boxes, np.float32).reshape(-1, 4)  # x, y, w, h in pixels
    if len(b):
      try:
        w, h = float(im.get("width") or 0), float(im.get("height") or 0)
      except (TypeError, ValueError):
        w = h = 0.0
      if w <= 0 or h <= 0:
        # Unreadable: fails (and is counted) when it is decoded.
        w, h = decode.image_size(path, max_pixels=max_pixels) or (1.0, 1.0)
      b = np.stack([b[:, 0] / w, b[:, 1] / h, (b[:, 0] + b[:, 2]) / w,
                    (b[:, 1] + b[:, 3]) / h], axis=1)
    # Crowd regions still show the class, so they count towards the labels (as in TFDS).
    records.append(make_record(path, path, box_labels, b, None, len(class_names),
                               image_labels=image_labels))
  return RecordSource(name, records, class_names, max_pixels=max_pixels, skipped=skipped,
                      class_origin=class_origin)
