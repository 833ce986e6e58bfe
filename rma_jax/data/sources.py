"""Random-access data sources and the config entry point :func:`get_sources`.

A :class:`Source` knows its examples up front (annotations are scanned when it is built) and
decodes an image only when ``source[i]`` is read, so the training iterator can shuffle, shard
over processes and resume at any step without reading the data set twice.

Every example is a dict of numpy values::

  image       uint8   (H, W, 3) RGB
  labels      float32 (C,) multi-hot: a class is present if any instance is, difficult or not
  difficult   bool    (C,) True where a class is present ONLY through VOC-difficult instances
  boxes       float32 (M, 4) (x0, y0, x1, y1) normalised to [0, 1] of the image
  box_labels  int32   (M,)
  id          str

Bad data is never silent: an example that cannot be read is recorded in ``source.skipped``
(with the file and the reason), logged once as a warning, and ``source[i]`` raises
:class:`BadExampleError`; the iterators catch it and report the count at the end of a pass.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import threading
from typing import Any, Sequence

import numpy as np

from rma_jax.data.decode import BadImageError, decode_image

logger = logging.getLogger(__name__)


class BadExampleError(ValueError):
  """``source[i]`` cannot be produced (unreadable image); it has been logged and counted."""


class SkipReport:
  """A thread-safe record of the examples a source skipped, with the reason for each.

  ``at_scan`` entries were dropped while reading the annotations (they are not in
  ``len(source)``); ``at_read`` entries are indices of the source whose image failed to decode.
  """

  def __init__(self, name: str):
    self.name = name
    self._lock = threading.Lock()
    self.at_scan: list[tuple[str, str]] = []
    self.at_read: dict[int, str] = {}

  def add_scan(self, what: str, reason: str) -> None:
    with self._lock:
      self.at_scan.append((what, reason))
    logger.warning("%s: skipping %s: %s", self.name, what, reason)

  def add_read(self, index: int, reason: str) -> bool:
    """Records a read failure; returns True the first time ``index`` fails (then it is logged)."""
    with self._lock:
      if index in self.at_read:
        return False
      self.at_read[index] = reason
    logger.warning("%s: skipping example %d: %s", self.name, index, reason)
    return True

  @property
  def count(self) -> int:
    with self._lock:
      return len(self.at_scan) + len(self.at_read)

  def summary(self) -> str:
    with self._lock:
      n_scan, n_read = len(self.at_scan), len(self.at_read)
    return (f"{self.name}: {n_scan + n_read} examples skipped "
            f"({n_scan} while reading annotations, {n_read} unreadable images)")

  def __repr__(self) -> str:
    return f"SkipReport({self.summary()!r})"


class Source(abc.ABC):
  """A random-access sequence of examples (see the module docstring for the dict)."""

  name: str
  class_names: tuple[str, ...]
  skipped: SkipReport

  @abc.abstractmethod
  def __len__(self) -> int:
    ...

  @abc.abstractmethod
  def _load(self, index: int) -> dict[str, Any]:
    """Reads example ``index``; raises BadImageError if its image cannot be decoded."""

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def ids(self) -> Sequence[str] | None:
    """The example ids in order if they are known without decoding, else None."""
    return None

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f"{self.name}: index {index} out of range for {n} examples")
    index %= n
    try:
      return self._load(index)
    except BadImageError as e:
      self.skipped.add_read(index, str(e))
      raise BadExampleError(str(e)) from e

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.name!r}, {len(self)} examples, {self.num_classes} classes)"


@dataclasses.dataclass(frozen=True)
class Record:
  """An example's annotations, known before its image is decoded."""
  id: str
  image: Any  # a path, encoded bytes, or a decoded (H, W, 3) uint8 array
  labels: np.ndarray  # float32 (C,)
  difficult: np.ndarray  # bool (C,)
  boxes: np.ndarray  # float32 (M, 4)
  box_labels: np.ndarray  # int32 (M,)


def make_record(id_: str, image: Any, box_labels: Sequence[int], boxes: np.ndarray,
                is_difficult: Sequence[bool] | None, num_classes: int) -> Record:
  """Builds a :class:`Record` from per-instance annotations.

  Args:
    id_: example id.
    image: path, bytes or array.
    box_labels: (M,) class index of each instance.
    boxes: (M, 4) (x0, y0, x1, y1) normalised; clipped to [0, 1] here.
    is_difficult: (M,) VOC difficult flags, or None when the data set has none.
    num_classes: C.
  """
  box_labels = np.asarray(box_labels, np.int32).reshape(-1)
  boxes = np.clip(np.asarray(boxes, np.float32).reshape(-1, 4), 0.0, 1.0)
  if is_difficult is None:
    is_difficult = np.zeros(box_labels.shape, bool)
  is_difficult = np.asarray(is_difficult, bool).reshape(-1)
  labels = np.zeros(num_classes, np.float32)
  labels[box_labels] = 1.0
  easy = np.zeros(num_classes, bool)
  easy[box_labels[~is_difficult]] = True
  difficult = (labels > 0) & ~easy
  return Record(id_, image, labels, difficult, boxes, box_labels)


class RecordSource(Source):
  """A source over a list of :class:`Record` whose images are decoded on access."""

  def __init__(self, name: str, records: Sequence[Record], class_names: Sequence[str], *,
               max_pixels: int | None = None, skipped: SkipReport | None = None):
    self.name = name
    self.records = list(records)
    self.class_names = tuple(class_names)
    self.max_pixels = max_pixels
    self.skipped = skipped if skipped is not None else SkipReport(name)

  def __len__(self) -> int:
    return len(self.records)

  def ids(self) -> Sequence[str]:
    return [r.id for r in self.records]

  def _load(self, index: int) -> dict[str, Any]:
    r = self.records[index]
    if isinstance(r.image, np.ndarray):
      image = r.image
    else:
      image = decode_image(r.image, max_pixels=self.max_pixels,
                           name=r.image if isinstance(r.image, str) else f"<bytes of {r.id}>")
    return dict(image=image, labels=r.labels, difficult=r.difficult, boxes=r.boxes,
                box_labels=r.box_labels, id=r.id)


class SubsetSource(Source):
  """A view of some examples of another source (e.g. the held-out validation slice)."""

  def __init__(self, parent: Source, indices: Sequence[int], name: str, *,
               inherit_scan_skips: bool = False):
    """``inherit_scan_skips``: report the parent's scan-time skips as this view's own (give
    it to exactly one view of a split, so they are counted once)."""
    self.parent = parent
    self.indices = np.asarray(indices, np.int64)
    self.name = name
    self.class_names = parent.class_names
    self.skipped = SkipReport(name)
    if inherit_scan_skips:
      self.skipped.at_scan.extend(parent.skipped.at_scan)

  def __len__(self) -> int:
    return len(self.indices)

  def ids(self) -> Sequence[str] | None:
    ids = self.parent.ids()
    return None if ids is None else [ids[i] for i in self.indices]

  def _load(self, index: int) -> dict[str, Any]:
    return self.parent._load(int(self.indices[index]))  # pylint: disable=protected-access


def held_out_split(source: Source, fraction: float, seed: int) -> tuple[Source, Source]:
  """Splits ``source`` into (train, val) with a deterministic random ``fraction`` held out.

  The permutation depends only on ``seed`` and ``len(source)``, so every process and every
  resumed run holds out the same examples.
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"data.val_fraction must be in [0, 1), got {fraction}")
  n = len(source)
  num_val = int(round(fraction * n))
  if fraction > 0 and num_val == 0 and n > 1:
    num_val = 1
  perm = np.random.default_rng([seed, 0x7A1]).permutation(n)
  # Sorted so each split keeps the source order (easier to inspect, no effect on training).
  val_idx, train_idx = np.sort(perm[:num_val]), np.sort(perm[num_val:])
  return (SubsetSource(source, train_idx, f"{source.name}[train part]",
                       inherit_scan_skips=True),
          SubsetSource(source, val_idx, f"{source.name}[held-out val]"))


@dataclasses.dataclass(frozen=True)
class Sources:
  """The three splits of a data set and its class names (in the data set's own order)."""
  train: Source
  val: Source
  test: Source
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


_NAMES = ("voc2007", "coco2014", "demo")
_KINDS = ("tfds", "local", "demo")


def get_sources(data_config: Any, *, seed: int) -> Sources:
  """Builds train/val/test sources from ``config.data`` (configs/default.py), validated.

  Wrong names, paths and splits raise here, before any training starts, with a message that
  names the path or the value.

  Args:
    data_config: ``config.data``: name (voc2007 | coco2014 | demo), source (tfds | local |
      demo), data_dir, train_split, test_split, val_split, val_fraction, max_pixels and demo.*.
    seed: seeds the held-out validation slice and the demo data set.

  Returns:
    :class:`Sources`. ``val`` is ``val_split`` when set, else a deterministic ``val_fraction``
    slice held out of ``train_split`` (and removed from train); it is never the test split.
  """
  name, kind = data_config.name, data_config.source
  if name not in _NAMES:
    raise ValueError(f"data.name must be one of {_NAMES}, got {name!r}")
  if kind not in _KINDS:
    raise ValueError(f"data.source must be one of {_KINDS}, got {kind!r}")
  if (name == "demo") != (kind == "demo"):
    raise ValueError(f"data.name={name!r} and data.source={kind!r} do not go together: the "
                     "demo data set is data.name='demo', data.source='demo'")
  if name == "demo":
    from rma_jax.data import demo  # pylint: disable=g-import-not-at-top
    d = data_config.demo
    train, val, test = demo.make_demo_splits(
        num_train=d.num_train, num_val=d.num_val, num_test=d.num_test,
        canvas_size=d.canvas_size, seed=seed)
    return Sources(train, val, test, train.class_names)

  train_split, test_split = data_config.train_split, data_config.test_split
  val_split = data_config.get("val_split", "") or ""
  if not train_split or not test_split:
    raise ValueError("data.train_split and data.test_split must be set")
  if val_split and val_split == test_split:
    raise ValueError(f"data.val_split={val_split!r} is the test split; model selection on the "
                     "test split is not allowed. Leave val_split empty for a held-out slice of "
                     "the training split.")
  max_pixels = data_config.get("max_pixels", None) or None
  if kind == "local":
    if not data_config.data_dir:
      raise ValueError("data.source='local' needs data.data_dir (the VOCdevkit/VOC2007 folder "
                       "or the COCO root folder)")
    if name == "voc2007":
      from rma_jax.data import voc  # pylint: disable=g-import-not-at-top
      root = voc.find_voc_root(data_config.data_dir)
      load = lambda split: voc.load_voc_split(root, split, max_pixels=max_pixels)
    else:
      from rma_jax.data import coco  # pylint: disable=g-import-not-at-top
      load = lambda split: coco.load_coco_split(data_config.data_dir, split,
                                                max_pixels=max_pixels)
  else:
    from rma_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    load = lambda split: tfds_source.load_tfds_split(
        name, split, data_dir=data_config.data_dir or None, max_pixels=max_pixels)

  # Open every split first so that a wrong path or split fails before anything else runs.
  train = load(train_split)
  test = load(test_split)
  if val_split:
    val = load(val_split)
    _check_disjoint(train, val, "train_split", "val_split")
  else:
    train, val = held_out_split(train, data_config.val_fraction, seed)
  _check_disjoint(val, test, "val", "test_split")
  return Sources(train, val, test, train.class_names)


def _check_disjoint(a: Source, b: Source, what_a: str, what_b: str) -> None:
  ids_a, ids_b = a.ids(), b.ids()
  if ids_a is None or ids_b is None:
    return
  common = set(ids_a) & set(ids_b)
  if common:
    raise ValueError(f"{what_a} ({a.name}) and {what_b} ({b.name}) share {len(common)} "
                     f"examples, e.g. {sorted(common)[:3]}; they must be disjoint")
