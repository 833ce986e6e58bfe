"""PASCAL VOC 2007 from a local ``VOCdevkit/VOC2007`` folder in its native layout, and any
tree in that layout with classes of its own.

``ImageSets/Main/<split>.txt`` lists the ids; ``Annotations/<id>.xml`` holds one ``<object>``
per instance with ``<name>``, ``<difficult>`` and ``<bndbox>``; ``JPEGImages/<id>.jpg`` the image.
Annotations are parsed with ``xml.etree`` when the source is built; images are decoded lazily.

The class list (:func:`voc_class_list`): a ``classes.txt`` in the VOC2007 folder or beside it
(one name per line, in index order); else the 20 VOC classes for a real VOC tree, recognised
by its per-class lists ``ImageSets/Main/<class>_<split>.txt``; else the sorted set of the
``<name>`` s in the annotations of the split being opened (the training split). Names are
matched case-insensitively (TFDS lower-cases them too).

Outcomes for bad data (all logged with the file name and counted in ``source.skipped``):
missing or malformed XML, an object of an unknown class, or a missing image file: the
example is skipped at scan time (an unknown class makes the labels untrustworthy, so we do not
guess); an image without objects is kept with all-zero labels (the loss masks it).
"""

from __future__ import annotations

import os
from typing import Sequence
import xml.etree.ElementTree as ET

import numpy as np

from rma_jax import paths
from rma_jax.data import classes as classes_lib
from rma_jax.data import decode
from rma_jax.data import files
from rma_jax.data.classes import VOC_CLASSES
from rma_jax.data.source import DataError, RecordSource, SkipReport, make_record

__all__ = ["VOC_CLASSES", "find_voc_root", "load_voc_split", "parse_voc_xml",
           "read_split_ids", "voc_boxes_to_unit", "voc_class_list"]


def find_voc_root(data_dir: str) -> str:
  """Returns the VOC2007 folder: ``data_dir`` itself, or ``data_dir/VOC2007``.

  Raises:
    FileNotFoundError: naming the path, when neither holds JPEGImages, Annotations and
      ImageSets/Main.
  """
  data_dir = os.path.expanduser(data_dir)
  if not paths.isdir(data_dir):
    raise FileNotFoundError(f"data.data_dir {data_dir!r} does not exist or is not a folder")
  for root in (data_dir, os.path.join(data_dir, "VOC2007")):
    if all(paths.isdir(os.path.join(root, sub))
           for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main"))):
      return root
  raise FileNotFoundError(
      f"{data_dir!r} is not a VOC2007 folder: expected JPEGImages/, Annotations/ and "
      "ImageSets/Main/ in it (or in its VOC2007/ subfolder)")


def parse_voc_xml(path: str) -> dict:
  """Parses one VOC annotation file.

  Returns:
    dict with ``size`` (width, height) or None when absent, ``names`` list[str] (lower-case),
    ``difficult`` list[bool], ``boxes`` (M, 4) float32 pixel (xmin, ymin, xmax, ymax).

  Raises:
    OSError, ET.ParseError, ValueError: unreadable or malformed file.
  """
  root = ET.fromstring(paths.path(path).read_bytes())
  size = root.find("size")
  wh = None
  if size is not None and size.findtext("width") and size.findtext("height"):
    wh = (float(size.findtext("width")), float(size.findtext("height")))
    if wh[0] <= 0 or wh[1] <= 0:
      wh = None
  names, difficult, boxes = [], [], []
  for obj in root.findall("object"):
    name = (obj.findtext("name") or "").strip().lower()
    names.append(name)
    difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    bb = obj.find("bndbox")
    if bb is None:
      raise DataError(f"object {name!r} has no <bndbox>")
    boxes.append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
  return dict(size=wh, names=names, difficult=difficult,
              boxes=np.asarray(boxes, np.float32).reshape(-1, 4))


def voc_boxes_to_unit(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
  """VOC pixel boxes -> (x0, y0, x1, y1) in [0, 1] of the image.

  VOC coordinates are 1-based and inclusive: ``xmin=5, xmax=24`` covers pixels 4..23
  (0-based), i.e. [4, 24) in continuous coordinates, so the box is
  ((xmin - 1) / W, (ymin - 1) / H, xmax / W, ymax / H). (TFDS ``voc/2007`` stores
  xmin / W, one pixel further right and down.)

  Args:
    boxes: (M, 4) float (xmin, ymin, xmax, ymax) as written in the annotation.
    width, height: the image size in pixels.
  """
  b = np.asarray(boxes, np.float32).reshape(-1, 4) - np.asarray([1, 1, 0, 0], np.float32)
  return b / np.asarray([width, height, width, height], np.float32)


def read_split_ids(root: str, split: str) -> list[str]:
  """Ids of ``split`` (a file stem under ImageSets/Main, or several joined with '+').

  Raises:
    FileNotFoundError: a list is missing (the available ones are named).
    ValueError: a list is not UTF-8 text (names the file and line; a UTF-8 BOM is fine).
  """
  ids = []
  for part in split.split("+"):
    path = os.path.join(root, "ImageSets", "Main", f"{part}.txt")
    if not paths.isfile(path):
      have = sorted(f[:-4] for f in paths.listdir(os.path.join(root, "ImageSets", "Main"))
                    if f.endswith(".txt") and "_" not in f)
      raise FileNotFoundError(f"split list {path!r} does not exist (split {part!r}); "
                              f"available: {have}")
    ids.extend(line.split()[0] for line in files.read_lines(path) if line.strip())
  return list(dict.fromkeys(ids))  # 'train+val' with a repeated id keeps it once


def _has_voc_class_files(root: str) -> bool:
  """True for a real VOC tree: ImageSets/Main holds ``<class>_<split>.txt`` for all 20."""
  main = os.path.join(root, "ImageSets", "Main")
  prefixes = {f.rsplit("_", 1)[0] for f in paths.listdir(main) if f.endswith(".txt") and "_" in f}
  return set(VOC_CLASSES) <= prefixes


def voc_class_list(root: str) -> tuple[tuple[str, ...], str] | None:
  """The class list a VOC-layout tree declares, and where it came from; None if it declares
  none (then the classes come from the annotations).

  Looked for, in order: ``classes.txt`` in the VOC2007 folder ``root``, or beside it (in
  ``VOCdevkit/``) when ``root`` is named VOC2007; the 20 VOC classes when ``ImageSets/Main``
  holds the per-class lists of a real VOC tree.
  """
  folders = [root]
  if os.path.basename(os.path.normpath(root)) == "VOC2007":
    folders.append(os.path.dirname(os.path.normpath(root)))
  path = classes_lib.find_class_file(*folders)
  if path is not None:
    return classes_lib.read_class_file(path), os.fspath(path)
  if _has_voc_class_files(root):
    return VOC_CLASSES, ("the 20 VOC classes (a real VOC tree: ImageSets/Main/<class>_*.txt "
                         "lists)")
  return None


def load_voc_split(root: str, split: str, *, max_pixels: int | None = None,
                   class_names: Sequence[str] | None = None, dataset: str = "voc2007",
                   class_origin: str = "") -> RecordSource:
  """Scans the annotations of one split of a VOC-layout folder into a lazily decoding source.

  Args:
    root: the VOC2007 folder (see :func:`find_voc_root`).
    split: 'train', 'val', 'trainval', 'test' or any list under ImageSets/Main ('a+b' unions).
    max_pixels: images above this many pixels are refused at decode time.
    class_names: the classes in index order; None: the tree's own list
      (:func:`voc_class_list`), else the sorted ``<name>`` s of this split's annotations.
    dataset: names the source (``<dataset>:<split>``) in logs and errors.
    class_origin: where ``class_names`` came from (recorded on the source).

  Returns:
    A :class:`RecordSource` named ``<dataset>:<split>``; its ``class_origin`` says where the
    classes came from.
  """
  name = f"{dataset}:{split}"
  skipped = SkipReport(name)
  parsed = []  # (id, xml path, image path, annotation) of every readable annotation
  for id_ in read_split_ids(root, split):
    xml_path = os.path.join(root, "Annotations", f"{id_}.xml")
    img_path = os.path.join(root, "JPEGImages", f"{id_}.jpg")
    problem = paths.file_problem(xml_path)
    if problem is not None:
      skipped.add_scan(xml_path, f"annotation file {problem}",
                       paths.problem_cause(problem, "annotation file"))
      continue
    try:
      ann = parse_voc_xml(xml_path)
    except (OSError, ET.ParseError, ValueError, TypeError) as e:
      skipped.add_scan(xml_path, f"malformed annotation: {type(e).__name__}: {e}",
                       "malformed annotation")
      continue
    parsed.append((id_, xml_path, img_path, ann))

  if class_names is None:
    declared = voc_class_list(root)
    if declared is not None:
      class_names, class_origin = declared
    else:
      class_names = sorted({n for *_, ann in parsed for n in ann["names"] if n})
      class_origin = (f"the <name>s in the annotations of split {split!r} "
                      f"({os.path.join(root, 'Annotations')})")
      if not class_names:
        raise DataError(f"{name}: no class names: none of the {len(parsed)} readable "
                         f"annotations in {os.path.join(root, 'Annotations')} has an <object> "
                         "with a <name>; give the classes in data.class_names or classes.txt")
  class_names = tuple(class_names)
  index = {c.lower(): i for i, c in enumerate(class_names)}
  if len(index) != len(class_names):
    raise DataError(f"{name}: class names {list(class_names)} ({class_origin or 'given'}) "
                     "repeat a name in another case; VOC names are matched case-insensitively")

  records = []
  for id_, xml_path, img_path, ann in parsed:
    unknown = sorted({n for n in ann["names"] if n not in index})
    if unknown:
      skipped.add_scan(xml_path, f"unknown class(es) {unknown}; known: "
                       f"{classes_lib.describe(class_names)}",
                       "unknown class")
      continue
    problem = paths.file_problem(img_path)
    if problem is not None:
      skipped.add_scan(img_path, f"image file {problem}", paths.problem_cause(problem))
      continue
    wh = ann["size"]
    if wh is None and len(ann["names"]):
      # Header only; an unreadable image fails (and is counted) when it is decoded.
      wh = decode.image_size(img_path, max_pixels=max_pixels) or (1.0, 1.0)
    boxes = voc_boxes_to_unit(ann["boxes"], *wh) if len(ann["boxes"]) else ann["boxes"]
    records.append(make_record(id_, img_path, [index[n] for n in ann["names"]], boxes,
                               ann["difficult"], len(class_names)))
  return RecordSource(name, records, class_names, max_pixels=max_pixels, skipped=skipped,
                      class_origin=class_origin)
