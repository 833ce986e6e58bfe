"""An embedded multi-label data set that needs no download (docs/data.md).

Each image is a dark, slightly noisy RGB canvas with 1-4 handwritten digits from
scikit-learn's bundled ``load_digits`` (1797 8x8 images) pasted at random positions and sizes,
in random bright colours. Labels are the digits present (C = 10, class names '0'..'9'); the
pasted boxes are kept so attention can be scored against them. The 1797 source digits are
split first (70% / 10% / 20%), so train, val and test never share a handwritten digit, and
everything is a function of the seed. The default 2000/200/500 set builds in about a second
and lives in memory (~70 MB).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np

from rma_jax.data.classes import DEMO_CLASSES
from rma_jax.data.source import RecordSource, make_record
_SPLIT_FRACTIONS = {"train": (0.0, 0.7), "val": (0.7, 0.8), "test": (0.8, 1.0)}
_SPLIT_IDS = {"train": 1, "val": 2, "test": 3}


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
  """The 1797 digits of ``sklearn.datasets.load_digits`` as ((N, 8, 8) in [0, 1], (N,) int).

  Reads the CSV that scikit-learn bundles directly (the same data ``load_digits`` returns):
  importing scikit-learn itself takes about a second, longer than building the data set.
  """
  spec = importlib.util.find_spec("sklearn")  # Locates the package without importing it.
  path = None
  if spec is not None and spec.submodule_search_locations:
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data",
                        "digits.csv.gz")
  if path and os.path.isfile(path):
    data = np.loadtxt(path, delimiter=",", dtype=np.float32)
    images, target = data[:, :64].reshape(-1, 8, 8), data[:, 64]
  else:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    d = load_digits()
    images, target = d.images, d.target
  return (np.asarray(images) / 16.0).astype(np.float32), np.asarray(target).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _upscale_matrix(size: int) -> np.ndarray:
  """(size, 8) bilinear weights (pixel centres aligned, edges clamped, as Pillow's resize)."""
  src = np.clip((np.arange(size) + 0.5) * 8.0 / size - 0.5, 0.0, 7.0)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, 7)
  w = (src - lo).astype(np.float32)
  m = np.zeros((size, 8), np.float32)
  m[np.arange(size), lo] += 1.0 - w
  m[np.arange(size), hi] += w
  return m


def _glyph(digit: np.ndarray, size: int) -> np.ndarray:
  """Upscales an 8x8 digit in [0, 1] to (size, size) in [0, 1] (bilinear, then sharpened)."""
  m = _upscale_matrix(size)
  g = m @ digit @ m.T  # Separable bilinear upscale: two tiny matmuls instead of a Pillow call.
  # A gentle contrast curve turns the blurry bilinear upscale into legible strokes.
  return np.clip((g - 0.15) * 1.6, 0.0, 1.0)


def _overlap(box, boxes) -> float:
  """Largest fraction of the smaller box covered by the intersection with any of ``boxes``."""
  worst = 0.0
  for b in boxes:
    iw = min(box[2], b[2]) - max(box[0], b[0])
    ih = min(box[3], b[3]) - max(box[1], b[1])
    if iw > 0 and ih > 0:
      small = min((box[2] - box[0]) * (box[3] - box[1]), (b[2] - b[0]) * (b[3] - b[1]))
      worst = max(worst, iw * ih / small)
  return worst


def digit_pool(split: str, seed: int = 0) -> np.ndarray:
  """Indices into ``load_digits`` that ``split`` draws from; disjoint across splits.

  The pools depend on the seed only (not on the split sizes), so for one seed train, val
  and test never share a handwritten digit.
  """
  n = len(_digits()[0])
  lo, hi = _SPLIT_FRACTIONS[split]
  perm = np.random.default_rng([seed, 0]).permutation(n)
  return perm[int(lo * n):int(hi * n)]


def make_demo_split(split: str, num_examples: int, *, canvas_size: int = 96, seed: int = 0,
                    min_digits: int = 1, max_digits: int = 4, max_overlap: float = 0.15
                    ) -> RecordSource:
  """Builds one split of the demo data set in memory.

  Args:
    split: 'train', 'val' or 'test' (selects the disjoint pool of source digits).
    num_examples: number of canvases.
    canvas_size: canvas side in pixels; digits are 21%-42% of it (20-40 px at 96).
    seed: everything is a function of (seed, split).
    min_digits, max_digits: digits per canvas (uniform).
    max_overlap: a digit is re-placed (up to 30 tries, then left out) if its intersection with
      another covers more than this fraction of the smaller box.

  Returns:
    A :class:`RecordSource` ``demo:<split>`` with images held in memory.
  """
  images, targets = _digits()
  pool = digit_pool(split, seed)
  rng = np.random.default_rng([seed, _SPLIT_IDS[split]])
  s_min, s_max = max(8, round(0.21 * canvas_size)), max(9, round(0.42 * canvas_size))
  # Dark backgrounds of random tints plus uniform noise, drawn for the whole split at once
  # in uint8 (40 + 15 cannot overflow); the canvases are views of this one array.
  canvases = rng.integers(0, 16, (num_examples, canvas_size, canvas_size, 3), dtype=np.uint8)
  canvases += rng.integers(0, 41, (num_examples, 1, 1, 3)).astype(np.uint8)
  records = []
  for i in range(num_examples):
    canvas = canvases[i]
    k = int(rng.integers(min_digits, max_digits + 1))
    boxes, labels = [], []
    for _ in range(k):
      size = int(rng.integers(s_min, s_max + 1))
      for _ in range(30):
        x0, y0 = (int(v) for v in rng.integers(0, canvas_size - size + 1, size=2))
        box = (x0, y0, x0 + size, y0 + size)
        if _overlap(box, boxes) <= max_overlap:
          break
      else:
        continue
      j = int(pool[rng.integers(len(pool))])
      alpha = _glyph(images[j], size)[..., None]
      colour = rng.uniform(150, 255, size=3).astype(np.float32)
      patch = canvas[y0:y0 + size, x0:x0 + size].astype(np.float32)
      canvas[y0:y0 + size, x0:x0 + size] = (patch * (1 - alpha) + colour * alpha).astype(np.uint8)
      boxes.append(box)
      labels.append(int(targets[j]))
    image = canvas
    norm_boxes = np.asarray(boxes, np.float32).reshape(-1, 4) / canvas_size
    records.append(make_record(f"demo-{split}-{i:05d}", image, labels, norm_boxes, None,
                               len(DEMO_CLASSES)))
  return RecordSource(f"demo:{split}", records, DEMO_CLASSES,
                      class_origin="the 10 digits of the demo data set")


def make_demo_splits(*, num_train: int = 2000, num_val: int = 200, num_test: int = 500,
                     canvas_size: int = 96, seed: int = 0
                     ) -> tuple[RecordSource, RecordSource, RecordSource]:
  """(train, val, test) demo sources; see :func:`make_demo_split`."""
  return tuple(make_demo_split(s, n, canvas_size=canvas_size, seed=seed)
               for s, n in (("train", num_train), ("val", num_val), ("test", num_test)))
