"""Robust image decoding with Pillow: any format Pillow reads, any mode, to RGB uint8.

Real data sets contain files whose name lies about their content (a PNG or a CMYK or
grayscale JPEG named ``.jpg``), truncated downloads and the occasional decompression bomb.
Pillow detects the format from the bytes, so the name never matters; every mode is converted
to RGB; anything Pillow cannot fully decode raises :class:`BadImageError` naming the file,
which the sources turn into a counted, logged skip. A path that is not a regular file (a
named pipe, a device) is refused from its inode, never opened.

Size limits: ``max_pixels`` (``data.max_pixels``) is checked from the header, before
decoding. Pillow has its own global limit (``Image.MAX_IMAGE_PIXELS``; it refuses images
above twice that as decompression bombs); when ``max_pixels`` is above what Pillow accepts,
Pillow's limit is raised to ``max_pixels`` for the duration of the decode only (restored
when the last such decode ends; other threads decoding meanwhile see the raised limit), so
``data.max_pixels`` is the one limit a user sets. A refusal says which limit refused and
which config field to change.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings

import numpy as np
from PIL import Image

from rma_jax import paths


class BadImageError(ValueError):
  """An image that cannot be decoded (corrupt, truncated, too large, missing)."""


_cap_lock = threading.Lock()
_cap_users = 0  # decodes running with Pillow's limit raised
_cap_saved: int | None = None  # Pillow's limit before the first of them


@contextlib.contextmanager
def _pillow_limit_at_least(max_pixels: int | None):
  """Raises Pillow's global ``Image.MAX_IMAGE_PIXELS`` so that images of up to
  ``max_pixels`` pixels pass its bomb check (which errors above twice the limit), while
  the block runs; the limit is restored when the last such block ends."""
  global _cap_users, _cap_saved
  with _cap_lock:
    # Compared with the limit before any raise, so that a decode needing a raise holds it
    # until it ends even when another one raised it first.
    base = _cap_saved if _cap_users else Image.MAX_IMAGE_PIXELS
    raise_it = max_pixels is not None and base is not None and max_pixels > 2 * base
    if raise_it:
      if _cap_users == 0:
        _cap_saved = base
      _cap_users += 1
      current = Image.MAX_IMAGE_PIXELS
      Image.MAX_IMAGE_PIXELS = None if current is None else max(current, max_pixels)
  try:
    yield
  finally:
    if raise_it:
      with _cap_lock:
        _cap_users -= 1
        if _cap_users == 0:
          Image.MAX_IMAGE_PIXELS = _cap_saved


def _open(data: bytes | str | os.PathLike, name: str):
  """A binary file object of the encoded image; BadImageError if it cannot be opened."""
  if isinstance(data, (bytes, bytearray, memoryview)):
    return io.BytesIO(data)
  # Local only: a bucket holds no pipes or devices, and a missing object fails at open.
  problem = None if paths.is_remote(os.fspath(data)) else paths.file_problem(data)
  if problem is not None:
    raise BadImageError(f"image file {name} {problem}")
  try:
    return paths.path(data).open("rb")
  except OSError as e:
    raise BadImageError(f"cannot open image {name}: {e}") from e


def _bomb_message(name: str, error: Exception, max_pixels: int | None) -> str:
  if max_pixels is not None:
    # Pillow's limit was raised to at least max_pixels / 2: the image is above max_pixels.
    return (f"image {name} refused as a decompression bomb: {error} (more than "
            f"data.max_pixels = {max_pixels}; raise data.max_pixels to accept it)")
  return (f"image {name} refused as a decompression bomb by Pillow's own limit (twice "
          f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}, as data.max_pixels is "
          f"unset): {error}; set data.max_pixels above the image's pixel count to accept it")


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
  fp = _open(data, name)
  with fp:
    try:
      # Pillow warns (and errors above 2x its own limit, raised here to max_pixels when that
      # is above) on huge images; we refuse them below with our own limit, so its warning is
      # noise here. The filter is local to this block.
      with warnings.catch_warnings(), _pillow_limit_at_least(max_pixels):
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
      raise BadImageError(_bomb_message(name, e, max_pixels)) from e
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as e:
      raise BadImageError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e
  if arr.ndim != 3 or arr.shape[-1] != 3:
    raise BadImageError(f"image {name} decoded to an unexpected shape {arr.shape}")
  return arr


def image_size(path: str | os.PathLike, *,
               max_pixels: int | None = None) -> tuple[int, int] | None:
  """(width, height) of an image file read from its header (nothing is decoded); None when
  the file cannot be opened as an image (it is then skipped when it is decoded).
  ``max_pixels``: as for :func:`decode_image` (raises Pillow's limit when above it)."""
  if not paths.is_remote(os.fspath(path)) and paths.file_problem(path) is not None:
    return None
  try:
    with warnings.catch_warnings(), _pillow_limit_at_least(max_pixels):
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with paths.path(path).open("rb") as f, Image.open(f) as img:
        return img.size
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
    return None
