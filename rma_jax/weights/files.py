"""What a weight file is, from its first bytes, and the one-line errors about it.

A file that cannot be read (empty, truncated, another format, given to the wrong
``--from``) is one line naming it, what was expected, and what it looks like instead.
"""

from __future__ import annotations

import zipfile

from rma_jax import paths

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def check_weight_file(path: str, expected: str) -> None:
  if not paths.isfile(path):
    raise FileNotFoundError(f"{path}: no such file; {expected}")
  if paths.getsize(path) == 0:
    raise ValueError(f"{path}: the file is empty; {expected}")


def is_torch_file(path: str) -> bool:
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      return any(n.endswith("/data.pkl") for n in archive.namelist())
  with paths.path(path).open("rb") as f:
    return f.read(2) == b"\x80\x02"  # the legacy format starts with a protocol-2 pickle


def starts_as_broken_zip(path: str) -> bool:
  with paths.path(path).open("rb") as f:
    return f.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(path)


def is_hdf5_file(path: str) -> bool:
  with paths.path(path).open("rb") as f:
    return f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE

