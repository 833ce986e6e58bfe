"""List files: one CSV or JSON-lines file per split that names each image and its labels.

CSV (a header row; columns other than these are ignored)::

  image,labels,boxes
  img/0001.jpg,cat;dog,
  img/0002.jpg,dog,"[[0.10, 0.20, 0.55, 0.90, ""dog""]]"
  img/0003.jpg,,

JSON lines (one object per line)::

  {"image": "img/0001.jpg", "labels": ["cat", "dog"]}
  {"image": "img/0002.jpg", "labels": "dog", "boxes": [[0.10, 0.20, 0.55, 0.90, "dog"]]}

* ``image``: a path relative to the image root (``data.image_root``, default the folder of
  the list file) or absolute. A relative path must stay inside the image root: one that
  leaves it through ``..`` (``../other/x.jpg``) is refused with a :class:`DataError` naming
  the list file, the line and the entry (set ``data.image_root`` to a folder above, or write
  the path absolute). It is the example's identity: rows naming the same image are
  merged (their labels and boxes joined), so a one-row-per-label export works as it is.
* ``labels``: class names separated by ``;`` or ``|``, or a JSON list of names. An empty
  field (or ``[]``) is an image without labels: it is kept and the loss masks it.
* ``boxes`` (optional): a JSON list of ``[x0, y0, x1, y1, label]`` in fractions of the image
  width and height; a box's label is a label of the image.

Class list: given (the training split's, for the other splits), else the sorted set of the
labels of this list. Skipped and logged with ``file:line``: a malformed line (a CSV row
whose field count differs from the header's, JSON that is not an object with ``image`` and
``labels``, malformed ``boxes``), a row with an unknown label (the image's labels are then
untrustworthy, so the image is skipped), an image file that does not exist or is not a
regular file (a named pipe or a device is never opened).
"""

from __future__ import annotations

import csv
import json
import math
import os
import posixpath
import re
from typing import Any, Iterator, Sequence

from etils import epath
import numpy as np

from rma_jax import paths
from rma_jax.data import classes as classes_lib
from rma_jax.data import files
from rma_jax.data.source import DataError, RecordSource, SkipReport, make_record

__all__ = ["LIST_SUFFIXES", "find_list_file", "load_list_split", "parse_labels"]

LIST_SUFFIXES = (".csv", ".jsonl")
_SEPARATORS = re.compile(r"[;|]")


def find_list_file(data_dir: str, split: str) -> str:
  """The list file of ``split``: ``split`` itself when it ends in .csv/.jsonl (relative to
  ``data_dir`` or absolute), else ``data_dir/<split>.csv`` or ``data_dir/<split>.jsonl``.

  Raises:
    FileNotFoundError: naming the paths tried and the list files that exist.
    ValueError: both a .csv and a .jsonl exist for the split.
  """
  base = epath.Path(os.path.expanduser(data_dir or "."))
  if split.endswith(LIST_SUFFIXES):
    candidates = [base / os.path.expanduser(split)]
  else:
    candidates = [base / f"{split}{s}" for s in LIST_SUFFIXES]
  found = [p for p in candidates if p.is_file()]
  if len(found) > 1:
    raise DataError(f"split {split!r}: both {found[0]} and {found[1]} exist; name one, e.g. "
                     f"data.train_split={found[0].name}")
  if not found:
    have = (sorted(p.name for p in base.iterdir() if p.name.endswith(LIST_SUFFIXES))
            if base.is_dir() else [])
    raise FileNotFoundError(f"list file {' or '.join(map(str, candidates))} does not exist "
                            f"(split {split!r}); list files in {base}: {have}")
  return os.fspath(found[0])


def parse_labels(value: Any) -> list[str]:
  """A ``labels`` field -> names: 'a;b', 'a|b', '["a", "b"]', a list, or empty -> [].

  Raises:
    ValueError: not a string or a list of strings.
  """
  if value is None:
    return []
  if isinstance(value, str):
    value = value.strip()
    if value.startswith("["):
      value = json.loads(value)
    else:
      return [v.strip() for v in _SEPARATORS.split(value) if v.strip()]
  if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
    raise DataError(f"labels must be names separated by ';' or '|', or a list of names; got "
                     f"{value!r:.100}")
  return [v.strip() for v in value if v.strip()]


def _parse_boxes(value: Any) -> list[tuple[list[float], str]]:
  """A ``boxes`` field -> [([x0, y0, x1, y1], label)]; raises ValueError when malformed."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return []
  if isinstance(value, str):
    value = json.loads(value)
  if not isinstance(value, list):
    raise DataError(f"boxes must be a list of [x0, y0, x1, y1, label]; got {value!r:.100}")
  out = []
  for b in value:
    if (not isinstance(b, list) or len(b) != 5 or not isinstance(b[4], str)
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in b[:4])):
      raise DataError(f"box {b!r:.100} is not [x0, y0, x1, y1, label] with 4 numbers")
    if not (0 <= b[0] <= b[2] <= 1 and 0 <= b[1] <= b[3] <= 1):
      raise DataError(f"box {b!r:.100} is not within [0, 1] with x0 <= x1 and y0 <= y1 "
                       "(fractions of the image width and height)")
    out.append(([float(v) for v in b[:4]], b[4].strip()))
  return out


def _rows(path: str) -> Iterator[tuple[int, dict | None, str]]:
  """(line number, row dict or None, error) of every non-blank row of a list file."""
  text = files.read_text(path)
  if path.endswith(".jsonl"):
    for n, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except ValueError as e:
        yield n, None, f"malformed line (not JSON: {e})"
        continue
      if not isinstance(obj, dict) or "image" not in obj or "labels" not in obj:
        yield n, None, "malformed line (not a JSON object with 'image' and 'labels')"
        continue
      yield n, obj, ""
    return
  # Line by line (no multi-line quoted fields): an unterminated quote spoils one line, not
  # the rest of the file, and every row has its exact line number.
  header = None
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = next(csv.reader([line], strict=True))
    except csv.Error as e:
      if header is None:
        raise DataError(f"{path}, line {n}: malformed header row ({e})") from None
      yield n, None, f"malformed line ({e})"
      continue
    if header is None:
      header = [h.strip().lower() for h in row]
      if "image" not in header or "labels" not in header:
        raise DataError(f"{path}: the header row {header} lacks an 'image' or 'labels' "
                         "column (expected e.g. image,labels,boxes)")
      continue
    if len(row) != len(header):
      yield n, None, (f"malformed line ({len(row)} fields, the header has {len(header)}: "
                      f"{','.join(header)})")
      continue
    yield n, dict(zip(header, row)), ""
  if header is None:
    raise DataError(f"{path} is empty; expected a header row with image,labels")


def _leaves_root(image: str) -> bool:
  """Whether a list entry is a relative path that leaves the image root through ``..``."""
  if paths.is_remote(image) or os.path.isabs(image):
    return False
  parts = posixpath.normpath(image.replace(os.sep, "/")).split("/")
  return parts[0] == ".."


def load_list_split(path: str, *, image_root: str = "", max_pixels: int | None = None,
                    class_names: Sequence[str] | None = None, dataset: str = "list",
                    split: str = "", class_origin: str = "") -> RecordSource:
  """Reads one list file (see the module docstring) into a lazily decoding source.

  Args:
    path: the .csv or .jsonl file (see :func:`find_list_file`).
    image_root: relative image paths are relative to it ('' = the list file's folder).
    max_pixels: images above this many pixels are refused at decode time.
    class_names: the classes in index order; None: the sorted labels of this list.
    dataset, split: name the source (``<dataset>:<split>``) in logs and errors.
    class_origin: where ``class_names`` came from (recorded on the source).

  Returns:
    A :class:`RecordSource`, examples in the order of their first row, ids the image paths.
  """
  name = f"{dataset}:{split or os.path.basename(path)}"
  skipped = SkipReport(name)
  root = os.path.expanduser(image_root) if image_root else os.path.dirname(path)
  entries: dict[str, dict[str, Any]] = {}  # image path -> lines, labels, boxes
  escapes: list[tuple[int, str]] = []  # (line, entry) of relative entries leaving the root
  for line, row, error in _rows(path):
    where = f"{path}:{line}"
    if row is not None:
      image = row.get("image")
      if not isinstance(image, str) or not image.strip():
        error = "malformed line (empty 'image')"
      else:
        try:
          labels = parse_labels(row.get("labels"))
          boxes = _parse_boxes(row.get("boxes"))
        except ValueError as e:
          error = f"malformed line ({e})"
    if error:
      skipped.add_scan(where, error, "malformed line")
      continue
    image = os.path.expanduser(image.strip())
    if _leaves_root(image):
      escapes.append((line, image))
      continue
    image_path = paths.join_normalized(root, image)
    e = entries.setdefault(image_path, {"lines": [], "labels": [], "boxes": []})
    e["lines"].append(line)
    e["labels"] += labels
    e["boxes"] += boxes

  if escapes:
    (line, image), more = escapes[0], len(escapes) - 1
    raise DataError(
        f"{path}, line {line}: image {image!r} leaves the image root {root or '.'!r} through "
        f"'..'" + (f" (and {more} more line{'s' * (more > 1)})" if more else "") + "; relative "
        "image paths must stay inside data.image_root: set data.image_root to a folder that "
        "holds them all, or write the paths absolute")

  if class_names is None:
    class_names = sorted({n for e in entries.values()
                          for n in e["labels"] + [label for _, label in e["boxes"]]})
    class_origin = f"the labels in {path}"
    if not class_names:
      raise DataError(f"{name}: no labels in {path}; give the classes in data.class_names "
                       "or classes.txt")
  class_names = tuple(class_names)
  index = {c: i for i, c in enumerate(class_names)}

  records = []
  for image_path, e in entries.items():
    where = f"{path}:{','.join(map(str, e['lines']))}"
    unknown = sorted({n for n in e["labels"] + [label for _, label in e["boxes"]]
                      if n not in index})
    if unknown:
      skipped.add_scan(where, f"unknown label(s) {unknown} for {image_path}; known: "
                       f"{classes_lib.describe(class_names)}", "unknown label")
      continue
    problem = paths.file_problem(image_path)
    if problem is not None:
      skipped.add_scan(where, f"image file {image_path} {problem}",
                       paths.problem_cause(problem))
      continue
    boxes = np.asarray([b for b, _ in e["boxes"]], np.float32).reshape(-1, 4)
    records.append(make_record(image_path, image_path, [index[n] for _, n in e["boxes"]],
                               boxes, None, len(class_names),
                               image_labels=[index[n] for n in e["labels"]]))
  return RecordSource(name, records, class_names, max_pixels=max_pixels, skipped=skipped,
                      class_origin=class_origin)
