"""The exploration notebook executes end to end (tiny settings), so it cannot rot."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"


def test_the_committed_notebook_shows_its_outputs():
    """Committed executed, so that its figures show on the repository page."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    figures = [out for cell in code for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert all(cell.get("execution_count") for cell in code)
    assert len(figures) >= 2
    printed = "".join(out.get("text", "") for cell in code for out in cell.get("outputs", []))
    assert "SparsyFed: final accuracy" in printed


def test_explore_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSYFED_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("SPARSYFED_NOTEBOOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    resources = {"metadata": {"path": str(tmp_path)}}
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources=resources).execute()
    outputs = "".join(
        out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert "SparsyFed: final accuracy" in outputs and "Top-K: final accuracy" in outputs
    assert os.environ["SPARSYFED_NOTEBOOK_QUICK"] == "1"
