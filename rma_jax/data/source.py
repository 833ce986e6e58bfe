"""The data layer's types: random-access :class:`Source`, its :class:`Record`, the
:class:`SkipReport` of what was skipped, and the :class:`Sources` of a data set.

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
(with the file, the reason and a short cause), logged as a warning, and ``source[i]`` raises
:class:`BadExampleError`. The batch iterators read with ``source.read(i)`` (which records
nothing: it may run in a worker process), carry the failures back with the batch and record
them in the main process's ``source.skipped``; the count is reported at the end of a pass.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import logging
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from rma_jax import errors
from rma_jax.data.decode import BadImageError, decode_image

logger = logging.getLogger(__name__)

# Skips logged one by one per source; the rest are counted (and summarised by cause).
_LOG_LIMIT = 20


class BadExampleError(ValueError):
  """``source[i]`` cannot be produced (unreadable image); it has been logged and counted."""


class DataError(errors.UserError, ValueError):
  """A data set that cannot be used as configured (raised before training starts)."""


class SkipReport:
  """A thread-safe record of the examples a source skipped, with the reason for each.

  ``at_scan`` entries were dropped while reading the annotations (they are not in
  ``len(source)``), as (what, reason); ``causes`` holds the short cause of each (e.g.
  'unknown class'). ``at_read`` entries are indices of the source whose image failed to
  decode. ``notes`` are problems with part of an example that did not drop it (e.g. a COCO
  annotation whose box is malformed): logged, kept, not counted as skipped examples.
  """

  def __init__(self, name: str):
    self.name = name
    self._lock = threading.Lock()
    self.at_scan: list[tuple[str, str]] = []
    self.causes: list[str] = []
    self.at_read: dict[int, str] = {}
    self.notes: list[tuple[str, str]] = []
    self._logged = 0

  def __getstate__(self) -> dict[str, Any]:
    # Sources are pickled into the loader's worker processes; a lock is not picklable.
    return {k: v for k, v in self.__dict__.items() if k != "_lock"}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _log(self, message: str, *args) -> None:
    # Called with the lock held.
    self._logged += 1
    if self._logged <= _LOG_LIMIT:
      logger.warning(message, *args)
    elif self._logged == _LOG_LIMIT + 1:
      logger.warning("%s: more problems; they are counted, not logged one by one (see the "
                     "summary)", self.name)

  def add_scan(self, what: str, reason: str, cause: str | None = None) -> None:
    """Records an example dropped while reading the annotations.

    Args:
      what: the file (or file and entry) that names the example.
      reason: the full reason.
      cause: a short category for the summaries (default: ``reason``).
    """
    with self._lock:
      self.at_scan.append((what, reason))
      self.causes.append(cause or reason)
      self._log("%s: skipping %s: %s", self.name, what, reason)

  def add_note(self, what: str, reason: str) -> None:
    """Records a problem with part of an example that is kept."""
    with self._lock:
      self.notes.append((what, reason))
      self._log("%s: %s: %s", self.name, what, reason)

  def add_read(self, index: int, reason: str) -> bool:
    """Records a read failure; returns True the first time ``index`` fails (then it is logged)."""
    with self._lock:
      if index in self.at_read:
        return False
      self.at_read[index] = reason
      self._log("%s: skipping example %d: %s", self.name, index, reason)
    return True

  @property
  def count(self) -> int:
    with self._lock:
      return len(self.at_scan) + len(self.at_read)

  def cause_counts(self) -> dict[str, int]:
    """Skipped examples per cause, most frequent first (unreadable images as one cause)."""
    with self._lock:
      counts = collections.Counter(self.causes)
      if self.at_read:
        counts["unreadable image"] += len(self.at_read)
    return dict(counts.most_common())

  def summary(self) -> str:
    with self._lock:
      n_scan, n_read, n_notes = len(self.at_scan), len(self.at_read), len(self.notes)
    text = (f"{self.name}: {n_scan + n_read} examples skipped "
            f"({n_scan} while reading annotations, {n_read} unreadable images)")
    if n_scan + n_read:
      text += "; by cause: " + ", ".join(f"{n} {c}" for c, n in self.cause_counts().items())
    if n_notes:
      text += f"; {n_notes} partly bad examples kept"
    return text

  def __repr__(self) -> str:
    return f"SkipReport({self.summary()!r})"


class Source(abc.ABC):
  """A random-access sequence of examples (see the module docstring for the dict).

  ``class_origin`` says where the class list came from (for the logs and the run's record).
  """

  name: str
  class_names: tuple[str, ...]
  skipped: SkipReport
  class_origin: str = ""

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

  def known_labels(self) -> np.ndarray | None:
    """(N, C) bool labels if they are known without decoding, else None."""
    return None

  def read(self, index: int) -> dict[str, Any]:
    """Example ``index`` (negative counts from the end); raises :class:`BadImageError` if its
    image cannot be decoded, recording nothing (``source[i]`` records it)."""
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f"{self.name}: index {index} out of range for {n} examples")
    return self._load(index % n)

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      return self.read(index)
    except BadImageError as e:
      self.skipped.add_read(index % len(self), str(e))
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
                is_difficult: Sequence[bool] | None, num_classes: int,
                image_labels: Sequence[int] = ()) -> Record:
  """Builds a :class:`Record` from per-instance annotations.

  Args:
    id_: example id.
    image: path, bytes or array.
    box_labels: (M,) class index of each instance.
    boxes: (M, 4) (x0, y0, x1, y1) normalised; clipped to [0, 1] here.
    is_difficult: (M,) VOC difficult flags, or None when the data set has none.
    num_classes: C.
    image_labels: class indices present in the image without a box (list files, COCO
      annotations whose box is unusable); never difficult.
  """
  box_labels = np.asarray(box_labels, np.int32).reshape(-1)
  boxes = np.clip(np.asarray(boxes, np.float32).reshape(-1, 4), 0.0, 1.0)
  if is_difficult is None:
    is_difficult = np.zeros(box_labels.shape, bool)
  is_difficult = np.asarray(is_difficult, bool).reshape(-1)
  image_labels = np.asarray(image_labels, np.int64).reshape(-1)
  labels = np.zeros(num_classes, np.float32)
  labels[box_labels] = 1.0
  labels[image_labels] = 1.0
  easy = np.zeros(num_classes, bool)
  easy[box_labels[~is_difficult]] = True
  easy[image_labels] = True
  difficult = (labels > 0) & ~easy
  return Record(id_, image, labels, difficult, boxes, box_labels)


class RecordSource(Source):
  """A source over a list of :class:`Record` whose images are decoded on access."""

  def __init__(self, name: str, records: Sequence[Record], class_names: Sequence[str], *,
               max_pixels: int | None = None, skipped: SkipReport | None = None,
               class_origin: str = ""):
    self.name = name
    self.records = list(records)
    self.class_names = tuple(class_names)
    self.max_pixels = max_pixels
    self.skipped = skipped if skipped is not None else SkipReport(name)
    self.class_origin = class_origin

  def __len__(self) -> int:
    return len(self.records)

  def ids(self) -> Sequence[str]:
    return [r.id for r in self.records]

  def known_labels(self) -> np.ndarray:
    if not self.records:
      return np.zeros((0, self.num_classes), bool)
    return np.stack([r.labels > 0 for r in self.records])

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
    self.class_origin = parent.class_origin
    self.skipped = SkipReport(name)
    if inherit_scan_skips:
      self.skipped.at_scan.extend(parent.skipped.at_scan)
      self.skipped.causes.extend(parent.skipped.causes)
      self.skipped.notes.extend(parent.skipped.notes)

  def __len__(self) -> int:
    return len(self.indices)

  def ids(self) -> Sequence[str] | None:
    ids = self.parent.ids()
    return None if ids is None else [ids[i] for i in self.indices]

  def known_labels(self) -> np.ndarray | None:
    labels = self.parent.known_labels()
    return None if labels is None else labels[self.indices]

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
  """The three splits of a data set and its class names (in the data set's own order).

  ``class_origin``: where the class list came from. ``missing_classes``: per split
  ('train', 'val', 'test'), the classes without any positive example there, where labels
  are known without decoding (absent for TFDS sources); the class-based CP/CR/CF1 of that
  split still average over all C classes (see the report's metric card).
  """
  train: Source
  val: Source
  test: Source
  class_names: tuple[str, ...]
  class_origin: str = ""
  missing_classes: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)
