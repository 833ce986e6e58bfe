r"""The configs, shipped with the package: ml_collections files whose ``get_config(arg)``
returns a ConfigDict (``default.py`` holds every field, the others override a few).

    python -m rma_jax.main --config=configs/demo.py --workdir=/tmp/rma_demo
    python -m rma_jax.main --config=configs/demo.py:tiny --workdir=/tmp/rma_tiny  # seconds

``configs/NAME.py`` on a command line is that file of the current directory when it has one
(the repository's ``configs/`` holds one-line files that load these), and else this
package's ``NAME.py`` (``resolve_config_path``): the documented commands work from any
directory and from a pip-installed package. In Python: ``from rma_jax.configs import demo;
demo.get_config("tiny")``. The text after ``:`` is ``get_config``'s argument
(``default.apply_arg``).
"""

from __future__ import annotations

import os
from typing import Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = tuple(sorted(f[:-3] for f in os.listdir(_HERE)
                     if f.endswith(".py") and not f.startswith("_")))
"""The shipped configs: ``NAME`` for ``configs/NAME.py``."""


def config_file(name: str) -> str:
  """The path of the shipped config ``name`` (e.g. 'demo')."""
  if name not in NAMES:
    raise ValueError(f"no shipped config {name!r}; the configs are {', '.join(NAMES)}")
  return os.path.join(_HERE, f"{name}.py")


def _resolve(value: str) -> str:
  path, colon, arg = value.partition(":")
  if os.path.exists(path) or os.path.isabs(path):
    return value
  parent, file = os.path.split(os.path.normpath(path))
  name, ext = os.path.splitext(file)
  if os.path.basename(parent) != "configs" or ext != ".py" or name not in NAMES:
    return value  # not ours: ml_collections reports the missing file
  return config_file(name) + colon + arg


def resolve_config_path(argv: Sequence[str], flag: str = "config") -> list[str]:
  """``argv`` with a ``--config=configs/NAME.py[:ARG]`` that does not exist relative to the
  current directory pointed at the shipped ``NAME.py``; everything else unchanged.

  Call it on ``sys.argv`` before absl parses the flags (ml_collections loads the file while
  parsing): ``app.run(main, argv=configs.resolve_config_path(sys.argv))``.

  Args:
    argv: the command line, program name first.
    flag: the config flag's name.

  Returns:
    A new list (``--config=VALUE``, ``-config=VALUE`` and ``--config VALUE`` are resolved).
  """
  out = list(argv)
  forms = (f"--{flag}=", f"-{flag}=")
  for i, arg in enumerate(out):
    if i == 0:
      continue
    prefix = next((p for p in forms if arg.startswith(p)), None)
    if prefix is not None:
      out[i] = prefix + _resolve(arg[len(prefix):])
    elif arg in (f"--{flag}", f"-{flag}") and i + 1 < len(out):
      out[i + 1] = _resolve(out[i + 1])
    elif arg == "--":
      break
  return out
