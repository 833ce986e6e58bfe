"""Reading the small text files of a data set (split lists, class lists, list files).

Files are read through ``etils.epath`` (local paths today; the same calls take ``gs://``
paths). Text is UTF-8: a byte-order mark (as written by Windows editors and Excel) is
stripped, UTF-16 files with a BOM are decoded as such, and anything else that is not UTF-8
is an error naming the file and the line.
"""

from __future__ import annotations

import codecs
import os

from rma_jax.data.source import DataError

from etils import epath

_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def read_text(path: str | os.PathLike) -> str:
  """The text of a UTF-8 (or BOM-marked UTF-16) file, without its byte-order mark.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file is not UTF-8; the message names the file and the line.
  """
  data = epath.Path(path).read_bytes()
  if data.startswith(_UTF16_BOMS):
    return data.decode("utf-16")
  if data.startswith(codecs.BOM_UTF8):
    data = data[len(codecs.BOM_UTF8):]
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise DataError(f"{os.fspath(path)}, line {line}: not UTF-8 text ({e.reason} at byte "
                     f"{e.start}, {data[e.start:e.start + 1]!r}); save the file as UTF-8"
                     ) from None


def read_lines(path: str | os.PathLike) -> list[str]:
  """The lines of a text file (see :func:`read_text`), without line endings."""
  return read_text(path).splitlines()
