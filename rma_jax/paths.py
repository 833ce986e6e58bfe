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
import stat
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


def write_atomic(path: str | os.PathLike, text: str | bytes) -> None:
  """Writes ``text`` (str: UTF-8; or bytes) to ``path`` through a temporary file in the same folder renamed over it,
  so readers see the old file or the new one. The file gets the usual permissions (0666
  less the umask), like any file the user writes. On a bucket (``gs://``) an object is
  replaced whole by one upload, so it is written directly."""
  if is_remote(path):
    if isinstance(text, bytes):
      epath.Path(path).write_bytes(text)
    else:
      epath.Path(path).write_text(text, encoding="utf-8")
    return
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with (os.fdopen(fd, "wb") if isinstance(text, bytes)
          else os.fdopen(fd, "w", encoding="utf-8")) as f:
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


MISSING = "missing"
"""What :func:`file_problem` says of a file that does not exist."""


def file_problem(path: str | os.PathLike) -> str | None:
  """Why ``path`` must not be opened as a data file, or None for a regular file.

  Local paths: only the inode is looked at (``os.stat``, following links), so a named pipe,
  a socket or a device is never opened (opening a pipe blocks until someone writes to it).
  URLs (``gs://``): the file must exist and not be a folder.

  Returns:
    None, :data:`MISSING`, ``'a folder, not a file'``, ``'not a regular file (a named pipe);
    not opened'`` (socket, device ...) or ``'cannot be read: <reason>'``.
  """
  p = os.fspath(path)
  if is_remote(p):
    if isdir(p):
      return "a folder, not a file"
    return None if path(p).exists() else MISSING
  try:
    mode = os.stat(os.path.expanduser(p)).st_mode
  except FileNotFoundError:
    return MISSING + (" (a broken link)" if os.path.islink(p) else "")
  except OSError as e:
    return f"cannot be read: {e.strerror or e}"
  if stat.S_ISREG(mode):
    return None
  if stat.S_ISDIR(mode):
    return "a folder, not a file"
  kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
          else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
  return f"not a regular file ({kind}); not opened"


def problem_cause(problem: str, what: str = "image file") -> str:
  """The short cause (for skip summaries) of a :func:`file_problem` answer."""
  if problem.startswith(MISSING):
    return f"{what} missing"
  if problem.startswith("not a regular file"):
    return f"{what} not a regular file"
  return f"{what} unreadable"
