"""Every notebook runs top to bottom (its code cells, in order, in one namespace: notebooks/execute.py)
and asserts its own claims (decode == full forward, loads even out, pipelined == unpipelined); each
draws at least one figure, and the stored .ipynb carries the outputs of a run (notebooks/execute.py
writes them), so it reads on GitHub with what it shows."""

import importlib.util
import json
from pathlib import Path

import pytest

NOTEBOOKS_DIR = Path(__file__).parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
_spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS_DIR / "execute.py")
execute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute)


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_draws_and_stores_its_outputs(path):
    fresh = execute.run_cells(path)
    assert any("image/png" in o.get("data", {}) for cell in fresh for o in cell), f"{path.name} draws no figure"
    code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    # Cells that print or draw must carry stored outputs (library warnings that reach stdout in
    # some environments are not the notebook's own output and are not compared).
    shows = [any(word in "".join(c["source"]) for word in ("print(", "fig")) for c in code]
    assert [bool(c["outputs"]) for c, s in zip(code, shows) if s] == [bool(o) for o, s in zip(fresh, shows) if s], (
        f"{path.name}: stored outputs are stale; run `uv run python notebooks/execute.py`")
