"""The attention notebook executes top to bottom (it trains its own tiny model), and is stored
without outputs."""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "attention_maps.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


@pytest.mark.slow
def test_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("VIT_CKPT", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "rows sum to one: True" in outputs
    assert "(2, 4, 2, 17, 17)" in outputs  # depth 2, 4 images, 2 heads, 1 + 16 tokens
    assert "self-similarity is 1: True" in outputs and "mean attention distance (px), block x head:" in outputs
