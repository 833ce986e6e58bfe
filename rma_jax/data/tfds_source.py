"""VOC 2007 and COCO 2014 through ``tensorflow_datasets`` (``voc/2007``, ``coco/2014``).

TFDS is imported lazily inside :func:`load_tfds_split` only. Examples are read by random
access straight from the prepared files: ArrayRecord data sets through TFDS's own data source,
TFRecord data sets (the default format of ``tfds build``) through an index of record offsets
built by reading the record headers. Each record is parsed with TFDS's numpy parser
(``deserialize_example_np``, no TensorFlow graph), the image is left encoded and decoded by
our Pillow decoder, and the features are mapped to the model's inputs by the pure functions
:func:`voc_example_from_tfds` and :func:`coco_example_from_tfds`.

Boxes: TFDS ``voc/2007`` stores ``xmin / W`` as written in the annotation, but VOC pixels are
1-based (``xmin = 1`` is the first pixel column), so the local reader uses ``(xmin - 1) / W``.
The VOC mapper subtracts ``1 / W`` (``1 / H``) from the box's left (top) edge, with the size
of the decoded image, so both paths give the same boxes. TFDS ``coco/2014`` boxes are
already 0-based (``x / W``) and are used as stored.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import struct
from typing import Any, Mapping, Sequence

import numpy as np

from rma_jax.data.classes import COCO_CLASSES, VOC_CLASSES
from rma_jax.data.decode import decode_image
from rma_jax.data.source import DataError, Source, SkipReport, make_record

TFDS_NAMES = {"voc2007": "voc/2007", "coco2014": "coco/2014"}
# Config split names -> TFDS split strings. VOC's trainval is TFDS train + validation.
_SPLITS = {
    "voc2007": {"trainval": "train+validation", "train": "train", "val": "validation",
                "test": "test"},
    "coco2014": {"train": "train", "val": "validation", "test": "test"},
}


INSTALL_HINT = ('pip install -e ".[tfds]" in a checkout of rma_jax, or pip install '
                '"rma_jax[tfds]"')
"""How to install TensorFlow and TFDS (the ``tfds`` extra); only TFDS data needs them."""


def missing_modules() -> list[str]:
  """The TFDS branch's packages that cannot be imported (``tensorflow``,
  ``tensorflow_datasets``); empty when both are installed. Imports neither."""
  missing = []
  for module in ("tensorflow", "tensorflow_datasets"):
    try:
      found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
      found = False
    if not found:
      missing.append(module)
  return missing


def missing_message() -> str | None:
  """The one-line error for data.source='tfds' without TFDS installed, or None."""
  missing = missing_modules()
  if not missing:
    return None
  return (f"data.source='tfds' needs TensorFlow Datasets, and {' and '.join(missing)} "
          f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL_HINT} (local "
          "trees and list files need neither: data.source=voc, coco or list)")


def _get(example: Mapping[str, Any], key: str, default=None):
  """Reads 'objects/label' from a flat dict or from nested {'objects': {'label': ...}}."""
  if key in example:
    return example[key]
  head, _, tail = key.partition("/")
  if tail and isinstance(example.get(head), Mapping):
    return _get(example[head], tail, default)
  return default


def _text(x) -> str:
  if isinstance(x, np.ndarray):
    x = x.item()
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _boxes_yxyx_to_xyxy(bbox) -> np.ndarray:
  b = np.asarray(bbox if bbox is not None else [], np.float32).reshape(-1, 4)
  return b[:, [1, 0, 3, 2]]


def voc_example_from_tfds(example: Mapping[str, Any], num_classes: int = 20,
                          image_wh: tuple[int, int] | None = None) -> dict[str, Any]:
  """Maps one TFDS ``voc/2007`` example (numpy) to the model's example dict.

  Args:
    example: flat (``objects/label``) or nested (``objects: {label}``) dict with ``image``
      (encoded bytes or a decoded array), ``image/filename``, ``labels`` (all instances),
      ``labels_no_difficult``, ``objects/{label, bbox (ymin, xmin, ymax, xmax), is_difficult}``.
    num_classes: C.
    image_wh: (W, H) of the image: the boxes' left and top edges move by one pixel to the
      0-based frame of the local reader (see the module docstring); None: boxes as stored.

  Returns:
    dict: ``image`` (unchanged: bytes or array), ``labels`` (C,) float32 multi-hot of
    ``labels``; ``difficult`` (C,) bool = in ``labels`` but not in ``labels_no_difficult``;
    ``boxes`` (M, 4) (x0, y0, x1, y1); ``box_labels`` (M,) int32; ``id`` (file name stem).
  """
  labels = np.zeros(num_classes, np.float32)
  labels[np.asarray(_get(example, "labels", []), np.int64)] = 1.0
  easy = np.zeros(num_classes, bool)
  easy[np.asarray(_get(example, "labels_no_difficult", []), np.int64)] = True
  box_labels = np.asarray(_get(example, "objects/label", []), np.int32).reshape(-1)
  # The image-level lists are authoritative for labels (as in the paper's evaluation); any
  # object class missing from them (never in real data) still counts as present.
  labels[box_labels] = 1.0
  obj_difficult = np.asarray(_get(example, "objects/is_difficult", np.zeros(len(box_labels))),
                             bool).reshape(-1)
  easy[box_labels[~obj_difficult]] = True
  fname = _text(_get(example, "image/filename", ""))
  boxes = _boxes_yxyx_to_xyxy(_get(example, "objects/bbox"))
  if image_wh is not None:
    boxes = boxes - np.asarray([1 / image_wh[0], 1 / image_wh[1], 0, 0], np.float32)
  return dict(image=_get(example, "image"), labels=labels, difficult=(labels > 0) & ~easy,
              boxes=np.clip(boxes, 0.0, 1.0), box_labels=box_labels,
              id=os.path.splitext(fname)[0])


def coco_example_from_tfds(example: Mapping[str, Any], num_classes: int = 80,
                           image_wh: tuple[int, int] | None = None) -> dict[str, Any]:
  """Maps one TFDS ``coco/2014`` example (numpy) to the model's example dict.

  Args:
    example: flat or nested dict with ``image``, ``image/id``,
      ``objects/{label, bbox (ymin, xmin, ymax, xmax), is_crowd}``.
    num_classes: C.
    image_wh: unused (COCO boxes are 0-based already); the mappers share one signature.

  Returns:
    The example dict; ``labels`` = classes of all instances (crowd ones included),
    ``difficult`` all False (COCO has no such notion), ``id`` = str(image/id).
  """
  del image_wh
  box_labels = np.asarray(_get(example, "objects/label", []), np.int32).reshape(-1)
  rec = make_record(str(int(np.asarray(_get(example, "image/id", -1)))), _get(example, "image"),
                    box_labels, _boxes_yxyx_to_xyxy(_get(example, "objects/bbox")), None,
                    num_classes)
  return dict(image=rec.image, labels=rec.labels, difficult=rec.difficult, boxes=rec.boxes,
              box_labels=rec.box_labels, id=rec.id)


class TFRecordIndex:
  """Random access to records of TFRecord files through their byte offsets.

  A TFRecord is ``uint64 length | uint32 crc | data | uint32 crc``; reading only the lengths
  and seeking over the data builds the index without reading the images.
  """

  def __init__(self, file_instructions: Sequence[Any]):
    """``file_instructions``: objects with ``filename``, ``skip`` and ``take`` (TFDS)."""
    self.files: list[str] = []
    self.entries: list[tuple[int, int, int]] = []  # (file index, data offset, length)
    for fi in file_instructions:
      skip, take = int(fi.skip), int(fi.take)
      offsets = self.scan(fi.filename)
      end = len(offsets) if take < 0 else skip + take
      self.files.append(fi.filename)
      self.entries.extend((len(self.files) - 1, off, n) for off, n in offsets[skip:end])

  @staticmethod
  def scan(path: str) -> list[tuple[int, int]]:
    """(data offset, length) of every record of one TFRecord file."""
    out = []
    with _open(path) as f:
      pos = 0
      while True:
        header = f.read(12)
        if not header:
          break
        if len(header) < 12:
          raise DataError(f"{path}: truncated TFRecord header at byte {pos}")
        (length,) = struct.unpack("<Q", header[:8])
        out.append((pos + 12, length))
        pos += 12 + length + 4
        f.seek(pos)
    return out

  def __len__(self) -> int:
    return len(self.entries)

  def __getitem__(self, index: int) -> bytes:
    file_index, offset, length = self.entries[index]
    with _open(self.files[file_index]) as f:
      f.seek(offset)
      data = f.read(length)
    if len(data) != length:
      raise DataError(f"{self.files[file_index]}: truncated record at byte {offset}")
    return data


@functools.cache
def import_tensorflow():
  """TensorFlow, imported on first use and kept off the accelerators JAX owns (it only reads
  files here). Importing this module never imports it: a run on other data never pays its
  start-up (seconds)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  tf.config.set_visible_devices([], "TPU")
  return tf


def _open(path: str):
  if "://" in path:  # gs://, s3://...: through TensorFlow's file system layer.
    return import_tensorflow().io.gfile.GFile(path, "rb")
  return open(path, "rb")


class TfdsSource(Source):
  """A prepared TFDS split read by random access (see the module docstring)."""

  def __init__(self, name: str, records: Sequence[bytes] | Sequence[Mapping[str, Any]],
               features: Any, mapper, class_names: Sequence[str], *,
               max_pixels: int | None = None):
    """
    Args:
      name: e.g. 'voc2007:train+validation'.
      records: random-access sequence of serialized examples (bytes), or of already
        deserialized example dicts (an ArrayRecord data source).
      features: the builder's ``info.features`` (used to deserialize bytes), or None.
      mapper: :func:`voc_example_from_tfds` or :func:`coco_example_from_tfds`.
      class_names: C names.
      max_pixels: images above this many pixels are refused.
    """
    self.name = name
    self.records = records
    self.features = features
    self.mapper = mapper
    self.class_names = tuple(class_names)
    self.max_pixels = max_pixels
    self.skipped = SkipReport(name)
    self._decoders = None

  def __len__(self) -> int:
    return len(self.records)

  def _load(self, index: int) -> dict[str, Any]:
    raw = self.records[index]
    if isinstance(raw, (bytes, bytearray, memoryview)):
      if self._decoders is None:
        # Lazy: TFDS loads only when a TFDS source is read (importing the package stays TF-free).
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
        self._decoders = {"image": tfds.decode.SkipDecoding()}
      raw = self.features.deserialize_example_np(raw, decoders=self._decoders)
    image = _get(raw, "image")
    if not isinstance(image, np.ndarray):
      image = decode_image(bytes(image), max_pixels=self.max_pixels,
                           name=f"{self.name}[{index}] "
                                f"({_text(_get(raw, 'image/filename', index))})")
    elif image.ndim == 3 and image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    ex = self.mapper(raw, len(self.class_names), image_wh=(image.shape[1], image.shape[0]))
    ex["image"] = image
    return ex


def load_tfds_split(name: str, split: str, *, data_dir: str | None = None,
                    max_pixels: int | None = None, download: bool = False) -> TfdsSource:
  """Opens one split of a prepared TFDS data set for random access.

  Args:
    name: 'voc2007' or 'coco2014'.
    split: a config split name ('trainval', 'train', 'val', 'test') or any TFDS split string.
    data_dir: the TFDS data_dir (None: TFDS's default, ~/tensorflow_datasets or $TFDS_DATA_DIR).
    max_pixels: images above this many pixels are refused.
    download: prepare the data set (download) if it is missing; the default is to fail with
      the command to run, so a training job never starts a download by surprise.

  Raises:
    FileNotFoundError: the data set is not prepared under ``data_dir`` (the path is named).
    ValueError: unknown split.
  """
  # Lazy: TFDS (and TensorFlow) load only when a TFDS source is opened.
  if missing_message():
    raise ModuleNotFoundError(missing_message())
  import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds_name = TFDS_NAMES[name]
  tfds_split = _SPLITS[name].get(split, split)
  if data_dir and "://" not in data_dir and not os.path.isdir(os.path.expanduser(data_dir)):
    raise FileNotFoundError(f"data.data_dir {data_dir!r} (the TFDS data_dir) does not exist")
  builder = tfds.builder(tfds_name, data_dir=os.path.expanduser(data_dir) if data_dir else None)
  if not builder.is_prepared():
    if not download:
      raise FileNotFoundError(
          f"TFDS data set {tfds_name} is not prepared in {builder.data_dir!r}. Prepare it with "
          f"`tfds build {tfds_name} --data_dir={data_dir or '~/tensorflow_datasets'}` or point "
          "data.data_dir at the folder that holds it")
    builder.download_and_prepare()
  try:
    split_info = builder.info.splits[tfds_split]
  except (KeyError, ValueError, AssertionError) as e:
    raise DataError(f"unknown split {split!r} (TFDS {tfds_split!r}) for {tfds_name}; "
                     f"available: {list(builder.info.splits.keys())}") from e
  if name == "voc2007":
    mapper, class_names = voc_example_from_tfds, VOC_CLASSES
  else:
    mapper = coco_example_from_tfds
    names = builder.info.features["objects"]["label"].names
    # Prepared data sets store the real names; fall back on the known list otherwise.
    class_names = tuple(names) if names and names[0] != "0" else COCO_CLASSES
  file_format = getattr(builder.info.file_format, "value", str(builder.info.file_format))
  if "array_record" in str(file_format):
    records = builder.as_data_source(split=tfds_split,
                                     decoders={"image": tfds.decode.SkipDecoding()})
    features = None
  else:
    records = TFRecordIndex(split_info.file_instructions)
    features = builder.info.features
  source = TfdsSource(f"{name}:{tfds_split}", records, features, mapper, class_names,
                      max_pixels=max_pixels)
  source.class_origin = f"TFDS {tfds_name}"
  return source
