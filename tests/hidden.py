"""Python code for a child process in which some packages cannot be imported, as where they
are not installed: ``hiding(("tensorflow",), body)`` hides them, runs ``body`` and reports on
stderr (``LEAKED [...]``) any hidden module that got imported anyway."""

import textwrap

_PRELUDE = r"""
import runpy, sys
HIDDEN = __HIDDEN__
class _Hide:
  # Wraps each finder: a hidden name is found by none of them, as when it is not installed
  # (`import` raises ModuleNotFoundError, importlib.util.find_spec returns None).
  def __init__(self, inner):
    self.inner = inner
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in HIDDEN:
      return None
    return self.inner.find_spec(name, path, target)
  def __getattr__(self, attr):
    return getattr(self.inner, attr)
sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
assert not any(m.split(".")[0] in HIDDEN for m in sys.modules)
try:
__BODY__
finally:
  leaked = sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN)
  if leaked:
    print("LEAKED", leaked, file=sys.stderr)
"""


def hiding(hidden: tuple[str, ...], body: str) -> str:
  """The code: ``hidden`` (top-level package names) cannot be imported, then ``body``."""
  return _PRELUDE.replace("__HIDDEN__", repr(tuple(hidden))).replace(
      "__BODY__", textwrap.indent(textwrap.dedent(body).strip("\n"), "  "))
