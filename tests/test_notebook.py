"""The Colab notebook installs the package and runs top to bottom on a CPU runtime (issue 7,
issue 14).

``launch/colab.ipynb`` is executed with nbclient in a fresh virtual environment, from a
folder outside any checkout (as on Colab), with ``SMOKE_TEST = True`` and
``RMA_JAX_SOURCE`` = a copy of this checkout injected after its parameters cell: its install
cell must ``pip install`` the package, and the notebook must then train, evaluate, write the
report and draw the attentional boxes with the installed package and its shipped configs.
The environment sees the already installed dependencies through a ``.pth`` file and pip runs
with ``--no-index``: only rma_jax itself is built and installed, nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import nbformat
import pytest

import rma_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "launch", "colab.ipynb")


def _fresh_venv(path) -> tuple[str, str]:
  """A venv without rma_jax whose Python sees this interpreter's packages (the dependencies,
  pip, setuptools, ipykernel) behind its own site-packages; returns its python and its
  site-packages."""
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
  python = str(path / "bin" / "python")
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        check=True, capture_output=True, text=True).stdout.strip()
  ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
  with open(os.path.join(site, "_test_dependencies.pth"), "w") as f:
    f.write("".join(p + "\n" for p in ours))
  return python, site


def _copy_checkout(dest) -> None:
  """The working tree's tracked and untracked, not ignored files (what a clone would hold,
  with the changes not yet committed): pip builds in the copy, the checkout stays clean."""
  listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          cwd=REPO, capture_output=True, text=True)
  if listed.returncode != 0:  # not a git checkout (e.g. an unpacked sdist)
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    return
  for rel in filter(None, listed.stdout.split("\0")):
    src = os.path.join(REPO, rel)
    if os.path.isfile(src):
      os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
      shutil.copy2(src, os.path.join(dest, rel))


def _kernel(tmp_path, monkeypatch, python: str) -> str:
  """A kernelspec that runs ipykernel with ``python``."""
  pytest.importorskip("ipykernel")
  spec_dir = tmp_path / "jupyter" / "kernels" / "rma_jax_test"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "rma_jax test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  return "rma_jax_test"


def test_notebook_parameters_cell_has_the_short_setting():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1 and params[0] is nb.cells[
      next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")]
  for name in ("SMOKE_TEST = False", 'RMA_JAX_SOURCE = ""', "WORKDIR", "TRAIN_STEPS"):
    assert name in params[0].source
  assert "YOUR_ORG" not in json.dumps(nb)  # no placeholder to clone
  # A notebook committed with outputs would bloat the repository and go stale.
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_notebook_installs_and_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
  nbclient = pytest.importorskip("nbclient")
  python, site = _fresh_venv(tmp_path / "venv")
  source = tmp_path / "source"
  _copy_checkout(source)
  kernel = _kernel(tmp_path, monkeypatch, python)
  monkeypatch.delenv("PYTHONPATH", raising=False)  # the checkout must not be importable
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws PNGs
  # pip: nothing from an index, the build backend from the environment, no version check.
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")
  monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  workdir = tmp_path / "workdir"
  nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
      f"SMOKE_TEST = True\nWORKDIR = {str(workdir)!r}\nRMA_JAX_SOURCE = {str(source)!r}"))
  nb.cells.append(nbformat.v4.new_code_cell(
      "import json, sys, rma_jax.configs.demo\n"
      "print('MODULES', json.dumps({'rma_jax': rma_jax.__file__, "
      "'config': rma_jax.configs.demo.__file__, 'prefix': sys.prefix}))"))
  content = tmp_path / "content"  # like Colab's /content: no checkout around
  content.mkdir()
  client = nbclient.NotebookClient(
      nb, kernel_name=kernel, timeout=300, allow_errors=False,
      resources={"metadata": {"path": str(content)}})
  client.execute()  # raises CellExecutionError with the failing cell and traceback

  assert (workdir / "report" / "report.md").is_file()
  assert (workdir / "checkpoints" / "best").is_dir()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert f"pip install {source}" in text
  # The installed package and its shipped configs ran, not the checkout or its copy.
  modules = json.loads(text.split("MODULES ", 1)[1].splitlines()[0])
  assert os.path.realpath(modules["prefix"]) == os.path.realpath(tmp_path / "venv")
  assert modules["rma_jax"] == os.path.join(site, "rma_jax", "__init__.py"), modules
  assert modules["config"] == os.path.join(site, "rma_jax", "configs", "demo.py"), modules
  assert f"rma_jax {rma_jax.__version__} from {os.path.join(site, 'rma_jax')}" in text
  assert "step 3: test single_view@48 mAP" in text  # trained 3 steps, evaluated
  # The last figure (the attentional boxes) was drawn.
  assert any("image/png" in o.get("data", {}) for o in outputs)
