"""The example notebook runs top to bottom, so it never rots."""

from __future__ import annotations

import pathlib

import nbformat
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "prototype_objective.ipynb"


def test_prototype_objective_notebook_executes(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                    for o in cell.get("outputs", []))
  assert "mixed" in outputs and "natural" in outputs
  errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors, errors
  # Both plots rendered.
  images = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 2
