"""Shared by the experiment scripts: train named config variants of a preset on the same data.

Every variant starts from the same seed and data order, and all reuse the tokenizer the first
one trains, so the runs differ only in their overrides.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from dsv3_jax.host_platform import default_to_cpu_without_accelerator

default_to_cpu_without_accelerator()  # as the `dsv3` command: no libtpu noise on a CPU host with the tpu extra

from dsv3_jax.config import apply_overrides, get_preset  # noqa: E402
from dsv3_jax.jobs.train import train  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def train_variants(preset: str, variants: dict[str, list[str]], steps: int,
                   after: Callable[[str, Path], None] | None = None) -> dict[str, list[dict]]:
    """{variant name: its metrics.jsonl records} after training each variant for `steps` steps;
    `after(name, run_dir)` runs on each finished run before its directory is removed."""
    work = Path(tempfile.mkdtemp(prefix="dsv3_variants_"))
    tokenizer, results = "", {}
    try:
        for i, (name, overrides) in enumerate(variants.items()):
            overrides = [*overrides, f"train.steps={steps}"] + ([f"data.tokenizer={tokenizer}"] if tokenizer else [])
            run_dir = work / f"run{i}"
            train(apply_overrides(get_preset(preset), overrides), run_dir, progress=False)
            tokenizer = tokenizer or str(run_dir / "tokenizer.json")
            results[name] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            if after is not None:
                after(name, run_dir)
            print(name, {k: results[name][-1].get(k) for k in ("val_loss", "val_max_vio")}, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def seeded_variants(variants: dict[str, list[str]], default_steps: int = 150) -> tuple[dict[str, list[str]], object]:
    """Command-line --steps / --seeds, and every variant once per seed as "name|seed" (the seed
    changes the initialisation; the data order stays the same)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=default_steps)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    return {f"{name}|{seed}": [*overrides, f"train.seed={seed}"] for name, overrides in variants.items()
            for seed in args.seeds}, args


def moving_average(steps, values, window: int = 10):
    """(steps, values) smoothed over `window` steps (fewer when the run is shorter)."""
    import numpy as np

    window = max(1, min(window, len(values)))
    return np.asarray(steps)[window - 1:], np.convolve(values, np.ones(window) / window, mode="valid")


def plot_loss_curves(curves: dict[str, list[dict]], title: str, png_name: str) -> None:
    """Each run's training LM loss (10-step mean) and validation loss on one axis, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, metrics in curves.items():
        ax.plot(*moving_average([m["step"] for m in metrics], [m["lm_loss"] for m in metrics]),
                label=f"{name} (train, 10-step mean)")
        ax.plot(*zip(*[(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]), "o--", label=f"{name} (val)")
    ax.set(xlabel="step", ylabel="LM loss", title=title)
    finish(fig, (ax,), png_name)


def finish(fig, axes, png_name: str) -> None:
    """Legends, grids, and the PNG into experiments/results/."""
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / png_name, dpi=110, bbox_inches="tight")
