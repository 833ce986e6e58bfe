"""Class lists: the built-in data sets' classes, user class lists, and the run's record.

A training run records the class list it used in ``WORKDIR/classes.json``; evaluation,
prediction and reports read it from there, so a model trained on its own classes is always
read with its own names in its own order.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from etils import epath

from rma_jax import paths
from rma_jax.data import files
from rma_jax.data.source import DataError

# The 20 classes in the data set's own (alphabetical) order, as in TFDS voc/2007.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

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

DEMO_CLASSES = tuple(str(d) for d in range(10))

# data.name -> classes, for the data sets whose class list is fixed.
BUILTIN_CLASSES = {"voc2007": VOC_CLASSES, "coco2014": COCO_CLASSES, "demo": DEMO_CLASSES}

# The names the paper's two data sets go by (data.name, the TFDS name, short forms).
PAPER_DATASETS = {"voc2007": ("voc2007", "voc/2007", "voc07"),
                  "coco2014": ("coco2014", "coco/2014", "coco")}


def paper_dataset(name: str, class_names: Sequence[str] | None = None) -> str | None:
  """'voc2007' or 'coco2014' when ``name`` is one of their names (any case) and
  ``class_names``, if given, are its classes (a tree of the user's own under the same name
  has others); else None."""
  for dataset, aliases in PAPER_DATASETS.items():
    if name.lower() in aliases and (
        class_names is None or tuple(class_names) == BUILTIN_CLASSES[dataset]):
      return dataset
  return None

RUN_CLASSES_FILE = "classes.json"
CLASSES_TXT = "classes.txt"


def describe(names: Sequence[str], limit: int = 12) -> str:
  """A short text for a class list in messages: all names up to ``limit``, else a count."""
  names = list(names)
  if len(names) <= limit:
    return str(names)
  return f"{len(names)} classes {names[:limit // 2]} ... {names[-2:]}"


def check_class_names(names: Sequence[str], where: str) -> tuple[str, ...]:
  """``names`` as a tuple, checked: at least one, non-empty, unique.

  Raises:
    ValueError: naming ``where`` the list came from.
  """
  names = tuple(str(n).strip() for n in names)
  if not names:
    raise DataError(f"{where}: the class list is empty")
  if any(not n for n in names):
    raise DataError(f"{where}: empty class name in {list(names)}")
  seen: dict[str, int] = {}
  for i, n in enumerate(names):
    if n in seen:
      raise DataError(f"{where}: class {n!r} is listed twice (entries {seen[n] + 1} and "
                       f"{i + 1})")
    seen[n] = i
  return names


def parse_class_names(value: Any) -> tuple[str, ...] | None:
  """``config.data.class_names`` -> names, or None when unset.

  Accepts a comma-separated string (``"circle,square,triangle"``, the command-line form) or
  a list/tuple of names.
  """
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  if isinstance(value, str):
    value = value.split(",")
  return check_class_names(list(value), "data.class_names")


def read_class_file(path: str | os.PathLike) -> tuple[str, ...]:
  """A ``classes.txt``: one class name per line, in index order; blank lines and lines
  starting with '#' are ignored."""
  names = [line.strip() for line in files.read_lines(path)]
  return check_class_names([n for n in names if n and not n.startswith("#")], os.fspath(path))


def find_class_file(*folders: str | os.PathLike) -> epath.Path | None:
  """The first ``classes.txt`` in ``folders``, or None."""
  for folder in folders:
    path = epath.Path(folder) / CLASSES_TXT
    if path.is_file():
      return path
  return None


def save_run_classes(workdir: str | os.PathLike, class_names: Sequence[str], *,
                     origin: str, dataset: str) -> epath.Path:
  """Writes ``WORKDIR/classes.json`` (the class list a run trains on), atomically."""
  path = epath.Path(workdir) / RUN_CLASSES_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  paths.write_atomic(path, json.dumps({"class_names": list(class_names), "origin": origin,
                                       "dataset": dataset}, indent=2) + "\n")
  return path


def load_run_classes(workdir: str | os.PathLike | None) -> tuple[str, ...] | None:
  """The class list recorded by a run in ``WORKDIR/classes.json``; None if there is none
  (workdirs written before the record existed).

  Raises:
    ValueError: the file exists but is not a class record (names the file).
  """
  if not workdir:
    return None
  path = epath.Path(workdir) / RUN_CLASSES_FILE
  if not path.is_file():
    return None
  try:
    names = json.loads(files.read_text(path))["class_names"]
  except (ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path} is not a class record ({type(e).__name__}: {e}); it should be "
                     '{"class_names": [...]}, as written by training') from e
  return check_class_names(names, os.fspath(path))
