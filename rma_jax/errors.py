"""Refusals a user can act on, and how the command line shows them.

A run refused for a reason the user can fix (a config value, unusable data, a workdir in use
or holding another model, a missing file) raises a ``UserError`` whose message names the
field or file and the fix. ``python -m rma_jax.main`` prints that message alone and exits
with status 2; the traceback only with ``--verbosity=1``. Library callers catch the usual
types: each error here is also a ``ValueError`` or ``RuntimeError``.
"""

from __future__ import annotations

from typing import Sequence

EXIT_STATUS = 2
"""The command line's exit status for a ``UserError`` (absl's, for a usage error)."""


class UserError(Exception):
  """A refusal the user can act on; its message says what and how."""


class ConfigError(UserError, ValueError):
  """A config value (or data split) a run cannot work with."""


class StorageError(UserError, OSError):
  """A write to the workdir failed (no space, read-only, no permission). Background writers
  of the failed save may still be running: the workdir stays held (``workdir.hold``) until
  the process ends, and ``rma_jax.main`` ends it at once, without waiting for them."""


def refusal(what: str, problems: Sequence[str]) -> str:
  """``'{what}: {problem}'`` for one problem; a line per problem for several."""
  if len(problems) == 1:
    return f"{what}: {problems[0]}"
  return f"{what} ({len(problems)} problems):\n  " + "\n  ".join(problems)
