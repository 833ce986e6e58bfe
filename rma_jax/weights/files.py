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


_LEGACY_TORCH_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def sniff(path: str) -> str:
  """What a weight file is, from its first bytes (and a zip's directory); nothing is
  unpickled.

  Returns:
    ``'hdf5'`` (Keras), ``'torch-zip'`` (torch >= 1.6: a zip with ``<name>/data.pkl``),
    ``'keras-zip'`` (a ``.keras`` archive), ``'zip'`` (another zip archive),
    ``'broken-zip'`` (starts as a zip but its end is missing), ``'torch-legacy'`` (a
    pickle stream that starts with torch's magic number), ``'pickle'`` (another pickle) or
    ``'unknown'``.
  """
  with paths.path(path).open("rb") as f:
    head = f.read(64)
  if head.startswith(_HDF5_SIGNATURE):
    return "hdf5"
  if head.startswith(b"PK\x03\x04") or zipfile.is_zipfile(path):
    if not zipfile.is_zipfile(path):
      return "broken-zip"
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
    if any(n.endswith("/data.pkl") for n in names):
      return "torch-zip"
    return "keras-zip" if "model.weights.h5" in names else "zip"
  if head[:1] == b"\x80":  # a pickle of protocol >= 2 (torch.save writes protocol 2)
    # torch.save's legacy format pickles its magic number first: LONG1 (0x8a), 10 bytes.
    return "torch-legacy" if b"\x8a\x0a" + _LEGACY_TORCH_MAGIC in head else "pickle"
  return "unknown"


def is_hdf5_file(path: str) -> bool:
  with paths.path(path).open("rb") as f:
    return f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE



def first_bytes(path: str, n: int = 8) -> str:
  """The first ``n`` bytes of a file, as a Python bytes literal (for error messages)."""
  with paths.path(path).open("rb") as f:
    return repr(f.read(n))
