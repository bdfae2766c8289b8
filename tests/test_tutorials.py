"""Every notebook in tutorials/ runs top to bottom in short mode (PPDGM_SHORT=1 shrinks steps)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "tutorials").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("PPDGM_SHORT", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_is_stored_with_its_figures(path):
    """Notebooks are kept with the outputs of a full run (``make tutorials``), so they show when browsed."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert all(c.get("execution_count") for c in code), f"{path.name}: not run top to bottom; run `make tutorials`"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name}: stored without its figures"
    assert not [o for o in outputs if o.output_type == "error"], f"{path.name}: stored with an error"
    warnings = [o for o in outputs if o.get("name") == "stderr" and "Warning" in "".join(o.get("text", ""))]
    assert not warnings, f"{path.name}: stored with warnings: {''.join(warnings[0]['text'])[:200]}"
