"""Paths of a run: local folders or URLs (``gs://bucket/...``), all opened through
``etils.epath``.

Paths stay strings in the API (``os.path.join`` joins URLs correctly); what touches the file
system goes through ``epath.Path``, which reaches buckets through ``gcsfs`` (fsspec) or, when
TensorFlow is installed, ``tf.io.gfile``. Orbax takes the same strings and writes arrays with
tensorstore's own GCS driver.
"""

from __future__ import annotations

import os
import posixpath
import uuid

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a URL (``gs://``, ``s3://`` ...) rather than a local path."""
  return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
  """A local path made absolute (``~`` expanded); a URL as it is."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def path(p: str | os.PathLike) -> epath.Path:
  """``epath.Path`` of a local path (``~`` expanded) or URL."""
  p = os.fspath(p)
  return epath.Path(p if is_remote(p) else os.path.expanduser(p))


def write_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file in the same folder renamed over it,
  so readers see the old file or the new one. The file gets the usual permissions (0666
  less the umask), like any file the user writes. On a bucket (``gs://``) an object is
  replaced whole by one upload, so it is written directly."""
  if is_remote(path):
    epath.Path(path).write_text(text, encoding="utf-8")
    return
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def isdir(p: str | os.PathLike) -> bool:
  return path(p).is_dir()


def isfile(p: str | os.PathLike) -> bool:
  return path(p).is_file()


def listdir(p: str | os.PathLike) -> list[str]:
  """The names in a folder (``os.listdir``)."""
  return [child.name for child in path(p).iterdir()]


def getsize(p: str | os.PathLike) -> int:
  return path(p).stat().length


def join_normalized(root: str, name: str) -> str:
  """``name`` under ``root`` (``name`` itself when absolute or a URL), normalised
  (``a/./b/../c`` -> ``a/c``; a URL's ``//`` is kept)."""
  if is_remote(name):
    return name
  if is_remote(root):
    scheme, rest = root.split("://", 1)
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, name))}"
  return os.path.normpath(os.path.join(root, name))
