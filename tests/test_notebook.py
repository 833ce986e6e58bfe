"""The Colab notebook runs top to bottom on a CPU runtime (issue 7).

``launch/colab.ipynb`` is executed with nbclient in a kernel running this interpreter, with
``SMOKE_TEST = True`` injected after its parameters cell (tiny data, model and steps) and a
fresh WORKDIR: it must install nothing (the checkout is importable), train, evaluate, write
the report and draw the attentional boxes without an error.
"""

from __future__ import annotations

import json
import os
import sys

import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "launch", "colab.ipynb")


def _kernel(tmp_path, monkeypatch) -> str:
  """A kernelspec that runs ipykernel with this interpreter (whatever PATH says)."""
  pytest.importorskip("ipykernel")
  spec_dir = tmp_path / "jupyter" / "kernels" / "rma_jax_test"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "rma_jax test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  return "rma_jax_test"


def test_notebook_parameters_cell_has_the_short_setting():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1 and params[0] is nb.cells[
      next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")]
  for name in ("SMOKE_TEST = False", "REPO_URL", "WORKDIR", "TRAIN_STEPS"):
    assert name in params[0].source
  # A notebook committed with outputs would bloat the repository and go stale.
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
  nbclient = pytest.importorskip("nbclient")
  kernel = _kernel(tmp_path, monkeypatch)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws PNGs
  nb = nbformat.read(NOTEBOOK, as_version=4)
  at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  workdir = tmp_path / "workdir"
  nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
      f"SMOKE_TEST = True\nWORKDIR = {str(workdir)!r}"))
  client = nbclient.NotebookClient(
      nb, kernel_name=kernel, timeout=300, allow_errors=False,
      resources={"metadata": {"path": os.path.join(REPO, "launch")}})
  client.execute()  # raises CellExecutionError with the failing cell and traceback

  assert (workdir / "report" / "report.md").is_file()
  assert (workdir / "checkpoints" / "best").is_dir()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert "code from " + REPO in text  # the checkout was used, nothing was cloned
  assert "step 3: test single_view@48 mAP" in text  # trained 3 steps, evaluated
  # The last figure (the attentional boxes) was drawn.
  assert any("image/png" in o.get("data", {}) for o in outputs)
