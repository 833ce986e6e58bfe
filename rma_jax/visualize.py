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


def draw_regions(image_uint8: Any, boxes_px: Any, labels: Sequence[str], *,
                 min_side: int = 384, line_width: int | None = None) -> Image.Image:
  """Draws boxes in distinct colours, each with its label (e.g. ``"1: dog"``).

  Args:
    image_uint8: (H, W, 3) uint8 RGB array (or a PIL image).
    boxes_px: (K, 4) boxes ``(x0, y0, x1, y1)`` in pixels of ``image_uint8``.
    labels: K strings, drawn at the top-left corner of each box (inside the image).
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
  placed: list[tuple[float, float, float, float]] = []
  for k, (box, text) in enumerate(zip(boxes, labels)):
    colour = REGION_COLOURS[k % len(REGION_COLOURS)]
    x0, y0, x1, y1 = (float(v) for v in box)
    draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=lw)
    tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), text, font=font)
    tw, th = tx1 - tx0 + 4, ty1 - ty0 + 4
    # Keep the label inside the picture even for boxes on the border.
    lx = min(max(0.0, x0), max(0.0, w - tw))
    ly = min(max(0.0, y0), max(0.0, h - th))
    # Regions often start at nearly the same corner: move a label down past earlier ones.
    while ly + 2 * th <= h and any(lx < px1 and px0 < lx + tw and ly < py1 and py0 < ly + th
                                   for px0, py0, px1, py1 in placed):
      ly += th
    placed.append((lx, ly, lx + tw, ly + th))
    draw.rectangle([lx, ly, lx + tw, ly + th], fill=colour)
    draw.text((lx + 2 - tx0, ly + 2 - ty0), text, fill=(0, 0, 0), font=font)
  return img
