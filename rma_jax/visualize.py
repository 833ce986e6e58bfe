"""Pictures of the attentional regions (the paper's Fig. 1 and 5).

``theta_to_pixel_boxes`` maps the model's transforms to pixel boxes of the image the model
saw (which may be a resized copy of the original: pass the original's width and height to
get boxes on the original), and ``draw_regions`` draws them in distinct colours, each
labelled with its step and its top class.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rma_jax import ops

# Distinct, colour-blind-friendly colours (Okabe-Ito), then a few more for K > 8.
REGION_COLOURS = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66),
                  (0, 114, 178), (213, 94, 0), (204, 121, 167), (255, 255, 255),
                  (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 0, 255))


def theta_to_pixel_boxes(theta: Any, width: int, height: int) -> np.ndarray:
  """Maps transforms to pixel boxes ``(x0, y0, x1, y1)`` on a ``width`` x ``height`` image.

  A region covers ``x in [tx - |sx|, tx + |sx|]`` (and likewise y) in [-1, 1] coordinates
  where -1 and +1 are the outer edges of the image (align_corners=False), so ``x = -1``
  maps to pixel coordinate 0 and ``x = +1`` to ``width``. The boxes are clipped to the
  image; a region entirely outside it becomes a zero-area box on the border.

  Args:
    theta: (..., 4) transforms ``(sx, sy, tx, ty)``.
    width, height: the image size in pixels (the model input is a resized copy; the
      normalised frame is the same, so pass the original size for original pixels).

  Returns:
    (..., 4) float64 boxes in pixels, ``0 <= x0 <= x1 <= width``, ``0 <= y0 <= y1 <= height``.
  """
  size = np.asarray([width, height, width, height], np.float64)
  boxes = ops.theta_to_boxes(np.asarray(theta, np.float64))  # in [-1, 1]
  return np.clip((boxes + 1.0) / 2.0 * size, 0.0, size)


Rect = tuple[float, float, float, float]


def _overlaps(a: Rect, b: Rect) -> bool:
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(corners: Sequence[tuple[float, float]], sizes: Sequence[tuple[float, float]],
                 width: float, height: float) -> tuple[list[Rect], float]:
  """Where to draw each label so that no two overlap, each as near its box as possible.

  Label k goes to the free place nearest the top-left corner of its box: its corner itself
  when it is free (clamped into the picture), else in the first free slot of the rows below
  it, then above it, trying the columns beside the labels already placed. A label that
  finds no free place in the picture goes into a strip below it (the caller enlarges the
  picture by the returned height).

  Args:
    corners: K points ``(x, y)``, the top-left corners of the boxes, in pixels.
    sizes: K label sizes ``(w, h)`` in pixels.
    width, height: the picture's size.

  Returns:
    (K rectangles ``(x0, y0, x1, y1)``, pairwise disjoint; the height of the strip below the
    picture that the labels placed there need, 0 when they all fit).
  """
  placed: list[Rect] = []
  strip_y, strip_x, strip_row = float(height), 0.0, 0.0
  for (cx, cy), (tw, th) in zip(corners, sizes):
    x = min(max(0.0, cx), max(0.0, width - tw))
    y = min(max(0.0, cy), max(0.0, height - th))
    rows = [y + i * th for i in range(int((height - th - y) // th) + 1)]
    rows += [y - i * th for i in range(1, int(y // th) + 1)]
    xs = {x, 0.0, max(0.0, width - tw)} | {r[2] for r in placed} | {r[0] - tw for r in placed}
    columns = sorted((c for c in xs if 0.0 <= c <= max(0.0, width - tw)),
                     key=lambda c: abs(c - x))
    spot = next(((c, r) for r in rows for c in columns
                 if not any(_overlaps((c, r, c + tw, r + th), p) for p in placed)), None)
    if spot is None:  # the picture is full: the strip below it, left to right, row by row
      if strip_x > 0 and strip_x + tw > width:
        strip_y, strip_x, strip_row = strip_y + strip_row, 0.0, 0.0
      spot = (strip_x, strip_y)
      strip_x, strip_row = strip_x + tw, max(strip_row, th)
    placed.append((spot[0], spot[1], spot[0] + tw, spot[1] + th))
  return placed, max([0.0] + [r[3] - height for r in placed])


def draw_regions(image_uint8: Any, boxes_px: Any, labels: Sequence[str], *,
                 min_side: int = 384, line_width: int | None = None) -> Image.Image:
  """Draws boxes in distinct colours, each with its label (e.g. ``"1: dog"``).

  Args:
    image_uint8: (H, W, 3) uint8 RGB array (or a PIL image).
    boxes_px: (K, 4) boxes ``(x0, y0, x1, y1)`` in pixels of ``image_uint8``.
    labels: K strings, each drawn at the free place nearest the top-left corner of its box
      (``place_labels``: labels never overlap; those that find no place in the picture go
      into a strip added below it).
    min_side: small images are enlarged (nearest neighbour) so that the shorter side is at
      least this many pixels and the labels stay legible; boxes are scaled along.
    line_width: box outline width; default scales with the picture.

  Returns:
    an RGB ``PIL.Image`` (the input is not modified).
  """
  img = image_uint8 if isinstance(image_uint8, Image.Image) else Image.fromarray(
      np.asarray(image_uint8, np.uint8))
  img = img.convert("RGB")
  boxes = np.asarray(boxes_px, np.float64).reshape(-1, 4)
  if len(labels) != len(boxes):
    raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
  w, h = img.size
  scale = max(1.0, min_side / max(1, min(w, h)))
  if scale > 1.0:
    img = img.resize((round(w * scale), round(h * scale)), Image.NEAREST)
    boxes = boxes * scale
  w, h = img.size
  lw = line_width or max(2, round(min(w, h) / 150))
  font = ImageFont.load_default(size=max(10, round(min(w, h) / 24)))
  draw = ImageDraw.Draw(img)
  colours = [REGION_COLOURS[k % len(REGION_COLOURS)] for k in range(len(boxes))]
  for box, colour in zip(boxes, colours):
    x0, y0, x1, y1 = (float(v) for v in box)
    draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=lw)
  # Labels go last, each at the free place nearest its box (place_labels): regions often
  # start at nearly the same corner, and a label must never hide another.
  text_boxes = [draw.textbbox((0, 0), text, font=font) for text in labels]
  sizes = [(tx1 - tx0 + 4, ty1 - ty0 + 4) for tx0, ty0, tx1, ty1 in text_boxes]
  rects, strip = place_labels([(float(b[0]), float(b[1])) for b in boxes], sizes, w, h)
  if strip > 0:  # more labels than the picture holds: a strip below it for the rest
    canvas = Image.new("RGB", (w, h + int(np.ceil(strip))), (0, 0, 0))
    canvas.paste(img, (0, 0))
    img, draw = canvas, ImageDraw.Draw(canvas)
  for text, (tx0, ty0, _, _), (lx, ly, lx1, ly1), colour in zip(labels, text_boxes, rects,
                                                                 colours):
    draw.rectangle([lx, ly, lx1 - 1, ly1 - 1], fill=colour)
    draw.text((lx + 2 - tx0, ly + 2 - ty0), text, fill=(0, 0, 0), font=font)
  return img
