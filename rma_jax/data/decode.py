"""Robust image decoding with Pillow: any format Pillow reads, any mode, to RGB uint8.

Real data sets contain files whose name lies about their content (a PNG or a CMYK or
grayscale JPEG named ``.jpg``), truncated downloads and the occasional decompression bomb.
Pillow detects the format from the bytes, so the name never matters; every mode is converted
to RGB; anything Pillow cannot fully decode raises :class:`BadImageError` naming the file,
which the sources turn into a counted, logged skip.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image

from rma_jax import paths


class BadImageError(ValueError):
  """An image that cannot be decoded (corrupt, truncated, too large, missing)."""


def decode_image(data: bytes | str | os.PathLike, *, max_pixels: int | None = None,
                 name: str | None = None) -> np.ndarray:
  """Decodes an encoded image (bytes or a path) to an RGB uint8 array.

  Args:
    data: the encoded file contents, or a path to the file.
    max_pixels: images with more than this many pixels (width * height, read from the header)
      are refused without being decoded. ``None``: Pillow's own limit only.
    name: how to name the image in error messages (default: the path, or '<bytes>').

  Returns:
    (H, W, 3) uint8 RGB array.

  Raises:
    BadImageError: the file is missing, unreadable, truncated, corrupt or too large.
  """
  if name is None:
    name = os.fspath(data) if isinstance(data, (str, os.PathLike)) else "<bytes>"
  try:
    fp = (io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview))
          else paths.path(data).open("rb"))
  except OSError as e:
    raise BadImageError(f"cannot open image {name}: {e}") from e
  with fp:
    try:
      # Pillow warns (and errors above 2x its own limit) on huge images; we refuse them below
      # with our own limit, so its warning is noise here. The filter is local to this block.
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(fp) as img:
          w, h = img.size
          if max_pixels is not None and w * h > max_pixels:
            raise BadImageError(
                f"image {name} has {w}x{h} = {w * h} pixels, more than max_pixels = "
                f"{max_pixels}; refused without decoding (raise data.max_pixels to accept it)")
          # load() decodes everything: truncated JPEGs raise here ("image file is truncated")
          # because we never set the global ImageFile.LOAD_TRUNCATED_IMAGES.
          img.load()
          if img.mode != "RGB":
            # CMYK, L, LA, P, RGBA, I;16 ... -> RGB. Palette/alpha images go through RGBA so
            # transparency becomes black consistently instead of a palette index.
            if img.mode == "P" and "transparency" in img.info:
              img = img.convert("RGBA")
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
              arr = np.asarray(img, dtype=np.float32)
              scale = 255.0 / max(float(arr.max()), 1.0)
              img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L")
            img = img.convert("RGB")
          arr = np.asarray(img, dtype=np.uint8)
    except BadImageError:
      raise
    except Image.DecompressionBombError as e:
      raise BadImageError(f"image {name} refused as a decompression bomb: {e}") from e
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as e:
      raise BadImageError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e
  if arr.ndim != 3 or arr.shape[-1] != 3:
    raise BadImageError(f"image {name} decoded to an unexpected shape {arr.shape}")
  return arr


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
  """(width, height) of an image file read from its header (nothing is decoded); None when
  the file cannot be opened as an image (it is then skipped when it is decoded)."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with paths.path(path).open("rb") as f, Image.open(f) as img:
        return img.size
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
    return None
