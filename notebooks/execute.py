"""Run the notebooks top to bottom and store their outputs (text and figures) in the .ipynb files,
so they read on GitHub with what they show. No Jupyter needed: each notebook's code cells run in
order in one namespace, printed text becomes a stream output and every open matplotlib figure a
PNG display output, as the inline backend would show them.

Command:   uv run python notebooks/execute.py [NOTEBOOK.ipynb ...]   (default: all of them)
Runtime:   about a minute on a 2-core CPU.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import sys
from pathlib import Path

# Notebook 03 runs DualPipe on 4 host devices: the flag must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent


def run_cells(path: Path) -> list[list[dict]]:
    """Execute `path`'s code cells in order; return each one's outputs (nbformat 4 dicts). An
    exception propagates, naming the cell."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    namespace = {"__name__": "__main__"}
    outputs = []
    plt.close("all")  # figures left open by whatever ran before are not this notebook's
    for i, cell in enumerate(cells):
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            exec(compile("".join(cell["source"]), f"{path.name}[code cell {i}]", "exec"), namespace)
        cell_outputs = [{"output_type": "stream", "name": "stdout", "text": text.getvalue().splitlines(True)}
                        ] if text.getvalue() else []
        for number in plt.get_fignums():
            png = io.BytesIO()
            plt.figure(number).savefig(png, format="png", dpi=80, bbox_inches="tight")
            cell_outputs.append({"output_type": "display_data", "metadata": {},
                                 "data": {"image/png": base64.b64encode(png.getvalue()).decode("ascii"),
                                          "text/plain": ["<Figure>"]}})
        plt.close("all")
        outputs.append(cell_outputs)
    return outputs


def store(path: Path, outputs: list[list[dict]]) -> None:
    notebook = json.loads(path.read_text())
    code_cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    for count, (cell, cell_outputs) in enumerate(zip(code_cells, outputs), start=1):
        cell["outputs"], cell["execution_count"] = cell_outputs, count
    path.write_text(json.dumps(notebook, indent=1) + "\n")


def main() -> None:
    sys.path.insert(0, str(HERE.parent))
    paths = [Path(p) for p in sys.argv[1:]] or sorted(HERE.glob("*.ipynb"))
    for path in paths:
        store(path, run_cells(path))
        print(f"{path}: outputs stored")


if __name__ == "__main__":
    main()
