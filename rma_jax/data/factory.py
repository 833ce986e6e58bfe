"""From ``config.data`` to checked :class:`Sources`: :func:`get_sources` (exported by the
package; only the package's ``__init__`` imports this module).

Layouts (``data.source``): ``tfds`` (a prepared ``voc/2007`` or ``coco/2014``), ``voc``
(a VOC-layout tree), ``coco`` (a COCO-format tree), ``list`` (CSV / JSON-lines list files),
``demo`` (built in memory), and ``local``, which detects voc, coco or list from the folder.

The class list, first found wins: the trained run's (``class_names=``, from
``WORKDIR/classes.json``); ``data.class_names``; the tree's own (VOC: ``classes.txt`` or a
real VOC tree's class files; COCO: the JSON's categories; list: ``classes.txt`` beside the
lists); else the labels used in the training split. TFDS and demo data sets have fixed lists.

Everything here runs before training: wrong names, paths and splits, a split without usable
examples or with more than ``data.max_skip_fraction`` of its examples skipped, are errors
that name the split, the causes and the first files.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

from rma_jax import errors as errors_lib
from rma_jax import paths
from rma_jax.data import classes as classes_lib
from rma_jax.data import coco, demo, imagelist, tfds_source, voc
from rma_jax.data.source import DataError, Source, Sources, held_out_split

logger = logging.getLogger(__name__)

SOURCES = ("tfds", "voc", "coco", "list", "demo", "local")
LOCAL_LAYOUTS = ("voc", "coco", "list")
DEFAULT_MAX_SKIP_FRACTION = 0.05
_FIRST = 5  # skipped files named in an error


def config_errors(data_config: Any) -> list[str]:
  """The problems of ``config.data`` that make it unusable, one line each (empty if none)."""
  d = data_config
  source, name = d.get("source"), d.get("name")
  errors = []
  if source not in SOURCES:
    errors.append(f"data.source={source!r}: one of {SOURCES} (local: voc, coco or list, "
                  "detected from data.data_dir)")
  if source == "tfds" and name not in tfds_source.TFDS_NAMES:
    errors.append(f"data.name={name!r}: unknown data set for data.source='tfds' (one of "
                  f"{sorted(tfds_source.TFDS_NAMES)}); for your own data use data.source="
                  "voc, coco or list")
  if source == "tfds" and tfds_source.missing_message():
    errors.append(tfds_source.missing_message())
  if (name == "demo") != (source == "demo"):
    errors.append("data.name='demo' goes with data.source='demo' and only with it")
  if source in LOCAL_LAYOUTS + ("local",) and not d.get("data_dir"):
    errors.append(f"data.source={source!r} needs data.data_dir (the VOC2007 folder, the COCO "
                  "root or the folder of the list files)")
  frac = d.get("max_skip_fraction", DEFAULT_MAX_SKIP_FRACTION)
  if not isinstance(frac, (int, float)) or not 0.0 <= frac <= 1.0:
    errors.append(f"data.max_skip_fraction={frac!r} must be in [0, 1]")
  try:
    classes_lib.parse_class_names(d.get("class_names"))
  except ValueError as e:
    errors.append(str(e))
  return errors


def detect_layout(data_dir: str, train_split: str) -> str:
  """'voc', 'coco' or 'list': the layout of a local folder (``data.source='local'``).

  Raises:
    FileNotFoundError: the folder is missing or matches no layout (what was looked for is
      named).
  """
  root = os.path.expanduser(data_dir)
  if not paths.isdir(root):
    raise FileNotFoundError(f"data.data_dir {data_dir!r} does not exist or is not a folder")
  try:
    voc.find_voc_root(root)
    return "voc"
  except FileNotFoundError:
    pass
  ann = os.path.join(root, "annotations")
  if paths.isdir(ann) and any(f.startswith("instances_") and f.endswith(".json")
                                for f in paths.listdir(ann)):
    return "coco"
  try:
    imagelist.find_list_file(root, train_split)
    return "list"
  except (FileNotFoundError, ValueError):
    pass
  raise FileNotFoundError(
      f"data.data_dir {data_dir!r} matches no layout: not a VOC folder (JPEGImages/, "
      "Annotations/, ImageSets/Main/ in it or in VOC2007/), not a COCO root "
      "(annotations/instances_<split>.json), and no list file "
      f"{train_split}.csv / {train_split}.jsonl for data.train_split. Set data.source to voc, "
      "coco or list for that layout's own message.")


def _skip_details(source: Source) -> str:
  causes = source.skipped.cause_counts()
  text = ", ".join(f"{n} {c}" for c, n in causes.items()) or "nothing skipped"
  first = source.skipped.at_scan[:_FIRST]
  if first:
    text += ". First skipped: " + "; ".join(f"{what} ({reason})" for what, reason in first)
  return text


def check_usable(source: Source, field: str, max_skip_fraction: float) -> None:
  """Raises :class:`DataError` when ``source`` has no examples, or more than
  ``max_skip_fraction`` of its examples were skipped while reading the annotations."""
  n_ok, n_skip = len(source), len(source.skipped.at_scan)
  total = n_ok + n_skip
  if n_ok == 0:
    what = (f"all {total} examples were skipped: {_skip_details(source)}" if total else
            "it lists no examples")
    raise DataError(f"{source.name} ({field}) has no usable examples: {what}. Fix the data, "
                    f"or point {field} at another split.")
  if n_skip > max_skip_fraction * total:
    enough = round(n_skip / total, 2)
    enough = enough if enough * total >= n_skip else enough + 0.01
    raise DataError(
        f"{source.name} ({field}): {n_skip} of {total} examples ({n_skip / total:.1%}) were "
        f"skipped while reading it, more than data.max_skip_fraction = {max_skip_fraction}: "
        f"{_skip_details(source)}. Fix the data, or accept the loss with "
        f"--config.data.max_skip_fraction={min(1.0, round(enough, 2))}.")


def _check_fixed(requested: Sequence[str] | None, own: Sequence[str], origin: str,
                 what: str) -> None:
  if requested is not None and tuple(requested) != tuple(own):
    raise DataError(f"{what} has the fixed classes {list(own)}, but {origin} says "
                     f"{list(requested)}; a model must be read with its own classes")


def _opener(layout: str, d: Any, max_pixels: int | None
            ) -> Callable[[str, Sequence[str] | None, str], Source]:
  """(split, class_names, class_origin) -> Source for one layout."""
  dataset = d.name
  if layout == "voc":
    root = voc.find_voc_root(d.data_dir)
    return lambda split, names, origin: voc.load_voc_split(
        root, split, max_pixels=max_pixels, class_names=names, dataset=dataset,
        class_origin=origin)
  if layout == "coco":
    return lambda split, names, origin: coco.load_coco_split(
        d.data_dir, split, max_pixels=max_pixels, class_names=names, dataset=dataset,
        class_origin=origin)
  if layout == "list":
    image_root = d.get("image_root", "") or ""
    return lambda split, names, origin: imagelist.load_list_split(
        imagelist.find_list_file(d.data_dir, split), image_root=image_root,
        max_pixels=max_pixels, class_names=names, dataset=dataset, split=split,
        class_origin=origin)

  def open_tfds(split, names, origin):
    source = tfds_source.load_tfds_split(d.name, split, data_dir=d.data_dir or None,
                                         max_pixels=max_pixels)
    _check_fixed(names, source.class_names, origin, f"TFDS {tfds_source.TFDS_NAMES[d.name]}")
    return source
  return open_tfds


def _missing_classes(splits: dict[str, Source], class_names: Sequence[str]
                     ) -> dict[str, tuple[str, ...]]:
  """Per split, the classes without a positive example (splits with known labels only)."""
  out = {}
  for split, source in splits.items():
    labels = source.known_labels()
    if labels is None:
      continue
    present = labels.any(axis=0) if len(labels) else [False] * len(class_names)
    missing = tuple(n for n, p in zip(class_names, present) if not p)
    if missing:
      out[split] = missing
  in_train = set(class_names) - set(out.get("train", ()))
  if out.get("train"):
    logger.warning("%d classes have no positive training example: %s", len(out["train"]),
                   list(out["train"]))
  for split in ("val", "test"):
    lost = [n for n in out.get(split, ()) if n in in_train]
    if lost:
      logger.warning("the %s split has no positive example of %d classes that the training "
                     "split has: %s. mAP leaves them out; CP, CR and CF1 on it still average "
                     "over all %d classes (their recall counts as 0), as the report's metric "
                     "card says", split, len(lost), lost, len(class_names))
  return out


def get_sources(data_config: Any, *, seed: int, class_names: Sequence[str] | None = None,
                class_origin: str = "") -> Sources:
  """Builds train/val/test sources from ``config.data`` (configs/default.py), checked.

  Wrong names, paths and splits, unusable splits (see the module docstring) raise here,
  before any training starts, with a message that names the path, the value or the split.

  Args:
    data_config: ``config.data``: name, source, data_dir, image_root, class_names,
      train_split, test_split, val_split, val_fraction, max_pixels, max_skip_fraction, demo.*.
    seed: seeds the held-out validation slice and the demo data set.
    class_names: the class list to use, e.g. a trained run's (``WORKDIR/classes.json``): it
      wins over ``data.class_names`` and the data set's own list, and the data is mapped to it
      by name. TFDS and demo data sets must match it.
    class_origin: where ``class_names`` came from (for the logs).

  Returns:
    :class:`Sources`. ``val`` is ``val_split`` when set, else a deterministic ``val_fraction``
    slice held out of ``train_split`` (and removed from train); it is never the test split.
  """
  d = data_config
  errors = config_errors(d)
  if errors:
    raise DataError(errors_lib.refusal("invalid data config", errors))
  configured = classes_lib.parse_class_names(d.get("class_names"))
  if class_names is not None:
    origin = class_origin or "the given class list"
    class_names = classes_lib.check_class_names(class_names, origin)
    if configured is not None and configured != class_names:
      raise DataError(f"data.class_names {list(configured)} differs from {origin} "
                       f"{list(class_names)}; leave data.class_names unset or use the same list")
  elif configured is not None:
    class_names, origin = configured, "data.class_names"
  else:
    origin = ""

  if d.source == "demo":
    dc = d.demo
    _check_fixed(class_names, classes_lib.DEMO_CLASSES, origin, "the demo data set")
    train, val, test = demo.make_demo_splits(
        num_train=dc.num_train, num_val=dc.num_val, num_test=dc.num_test,
        canvas_size=dc.canvas_size, seed=seed)
    return Sources(train, val, test, train.class_names, train.class_origin)

  train_split, test_split = d.train_split, d.test_split
  val_split = d.get("val_split", "") or ""
  if not train_split or not test_split:
    raise DataError("data.train_split and data.test_split must be set")
  if val_split and val_split == test_split:
    raise DataError(f"data.val_split={val_split!r} is the test split; model selection on the "
                     "test split is not allowed. Leave val_split empty for a held-out slice of "
                     "the training split.")
  max_pixels = d.get("max_pixels", None) or None
  max_skip = d.get("max_skip_fraction", DEFAULT_MAX_SKIP_FRACTION)
  layout = d.source if d.source != "local" else detect_layout(d.data_dir, train_split)
  if layout == "list" and class_names is None:
    path = classes_lib.find_class_file(os.path.expanduser(d.data_dir))
    if path is not None:
      class_names, origin = classes_lib.read_class_file(path), os.fspath(path)
  open_split = _opener(layout, d, max_pixels)

  # Open every split first so that a wrong path or split fails before anything else runs;
  # the training split fixes the class list of the others.
  train = open_split(train_split, class_names, origin)
  check_usable(train, "data.train_split", max_skip)
  class_names, origin = train.class_names, train.class_origin or origin
  logger.info("%s: %d classes from %s: %s", d.name, len(class_names), origin,
              ", ".join(class_names))
  test = open_split(test_split, class_names, origin)
  check_usable(test, "data.test_split", max_skip)
  if val_split:
    val = open_split(val_split, class_names, origin)
    check_usable(val, "data.val_split", max_skip)
    _check_disjoint(train, val, "train_split", "val_split")
  else:
    train, val = held_out_split(train, d.val_fraction, seed)
  _check_disjoint(val, test, "val", "test_split")
  missing = _missing_classes({"train": train, "val": val, "test": test}, class_names)
  return Sources(train, val, test, class_names, origin, missing)


def _check_disjoint(a: Source, b: Source, what_a: str, what_b: str) -> None:
  ids_a, ids_b = a.ids(), b.ids()
  if ids_a is None or ids_b is None:
    return
  common = set(ids_a) & set(ids_b)
  if common:
    raise DataError(f"{what_a} ({a.name}) and {what_b} ({b.name}) share {len(common)} "
                     f"examples, e.g. {sorted(common)[:3]}; they must be disjoint")
