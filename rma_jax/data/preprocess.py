"""The paper's preprocessing (docs/design.md §3): host-side geometry in numpy/Pillow, pixels on device.

Geometry runs on the host per image (in the input pipeline's worker processes): training resizes to N x N ignoring the aspect ratio, takes a random
(N - 64) x (N - 64) crop and a random horizontal flip; evaluation resizes to ``size`` x
``size`` with no crop. Images stay uint8: the model normalises them to its pixel convention
(``rma_jax.pixels``) inside the jitted step on the accelerator, so the host ships 4x fewer
bytes.

Boxes are (x0, y0, x1, y1) normalised to [0, 1] of the image; a resize that ignores the aspect
ratio leaves them unchanged, crops and flips move them (:func:`crop_flip_boxes`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes (H, W, 3) uint8 to (size, size, 3) uint8, bilinear, aspect ratio not kept."""
  if image.shape[0] == size and image.shape[1] == size:
    return np.asarray(image, np.uint8)
  # reducing_gap: when shrinking a lot, Pillow first reduces by an integer factor (fast and
  # antialiased), then resamples.
  out = Image.fromarray(np.asarray(image, np.uint8)).resize(
      (size, size), Image.BILINEAR, reducing_gap=3.0)
  return np.asarray(out, np.uint8)


def sample_crop(rng: np.random.Generator, image_size: int, crop_size: int
                ) -> tuple[int, int, bool]:
  """Draws a crop corner (y0, x0) in [0, N - crop] and a flip bit."""
  if not 0 < crop_size <= image_size:
    raise ValueError(f"crop_size must be in (0, image_size], got {crop_size} > {image_size}")
  y0 = int(rng.integers(0, image_size - crop_size + 1))
  x0 = int(rng.integers(0, image_size - crop_size + 1))
  return y0, x0, bool(rng.integers(0, 2))


def crop_flip_boxes(boxes: np.ndarray, y0: int, x0: int, flip: bool, image_size: int,
                    crop_size: int) -> np.ndarray:
  """Moves normalised boxes of an N x N image into a (crop x crop) crop at (y0, x0), flipped.

  Args:
    boxes: (M, 4) (x0, y0, x1, y1) in [0, 1] of the N x N image.

  Returns:
    (M, 4) float32 boxes in [0, 1] of the crop, clipped (a box outside the crop becomes
    degenerate, with zero width or height).
  """
  b = np.asarray(boxes, np.float32).reshape(-1, 4) * image_size
  b = (b - np.asarray([x0, y0, x0, y0], np.float32)) / crop_size
  b = np.clip(b, 0.0, 1.0)
  if flip:
    b = np.stack([1.0 - b[:, 2], b[:, 1], 1.0 - b[:, 0], b[:, 3]], axis=1)
  return b.astype(np.float32)


def train_transform(image: np.ndarray, rng: np.random.Generator, image_size: int,
                    crop_size: int, boxes: np.ndarray | None = None, *,
                    random_flip: bool = True):
  """Training geometry: resize to N x N, random (crop x crop) crop, random horizontal flip.

  Args:
    image: (H, W, 3) uint8 RGB.
    rng: numpy Generator (the iterators derive one per (seed, epoch, example)).
    image_size: N.
    crop_size: the crop side, N - 64 in the paper.
    boxes: optional (M, 4) normalised (x0, y0, x1, y1) boxes to move with the image.
    random_flip: flip half of the images (the paper); off for data whose classes are
      chiral, such as the demo's digits.

  Returns:
    (crop, crop, 3) uint8, or (image, boxes) when ``boxes`` is given.
  """
  y0, x0, flip = sample_crop(rng, image_size, crop_size)
  flip = flip and random_flip
  image = np.asarray(image, np.uint8)
  h, w = image.shape[:2]
  sx, sy = w / image_size, h / image_size
  # Resizing only the crop's footprint in the source (Pillow's ``box``) equals resizing the
  # whole image to N x N and then cropping (same pixel-centre mapping, neighbours outside
  # the box are still used), but skips the ~25% of the work that the crop throws away.
  img = Image.fromarray(image).resize(
      (crop_size, crop_size), Image.BILINEAR,
      box=(x0 * sx, y0 * sy, (x0 + crop_size) * sx, (y0 + crop_size) * sy))
  if flip:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  out = np.asarray(img, np.uint8)
  if boxes is None:
    return out
  return out, crop_flip_boxes(boxes, y0, x0, flip, image_size, crop_size)


def eval_transform(image: np.ndarray, size: int) -> np.ndarray:
  """Evaluation geometry: resize to size x size, no crop, no flip (boxes are unchanged).

  Single view uses size = N - 64 (or N); the ten-view protocol uses size = N and crops the
  feature map instead.
  """
  return resize(image, size)
