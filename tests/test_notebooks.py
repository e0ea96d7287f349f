"""Every notebook runs top to bottom (its code cells, in order, in one namespace: notebooks/execute.py)
and asserts its own claims (decode == full forward, loads even out, pipelined == unpipelined); each
draws at least one figure, and the stored .ipynb carries the outputs of a run (notebooks/execute.py
writes them), so it reads on GitHub with what it shows."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS_DIR = Path(__file__).parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
_spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS_DIR / "execute.py")
execute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute)


def shown(outputs: list[dict], source: str) -> tuple[bool, bool]:
    """What a cell's outputs show: a figure, and (only where the cell calls print()) text. Library
    warnings that reach stdout in some environments are not the notebook's own output."""
    draws = any("image/png" in o.get("data", {}) for o in outputs)
    prints = bool(re.search(r"\bprint\(", source)) and any(o.get("output_type") == "stream" for o in outputs)
    return draws, prints


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_draws_and_stores_its_outputs(path):
    fresh = execute.run_cells(path)
    assert any("image/png" in o.get("data", {}) for cell in fresh for o in cell), f"{path.name} draws no figure"
    code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    # The stored outputs are those of a run: the same cells draw and print.
    sources = ["".join(c["source"]) for c in code]
    stored = [shown(c["outputs"], s) for c, s in zip(code, sources)]
    assert stored == [shown(o, s) for o, s in zip(fresh, sources)], (
        f"{path.name}: stored outputs are stale; run `uv run python notebooks/execute.py`")
