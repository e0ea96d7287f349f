"""Plots of a run from its metrics.jsonl and router.jsonl: loss curves, MaxVio, expert-load heatmap."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsv3_jax.errors import UsageError
from dsv3_jax.run_dir import read_jsonl


def write_report(run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    if not metrics:
        raise UsageError(f"{str(run_dir)!r} has no metrics.jsonl with any step: is it a dsv3 run directory?")
    written = []
    steps = np.array([m["step"] for m in metrics])

    # (file, title, y label, [(metrics key, label)], [(eval key, label)])
    line_plots = [
        ("loss.png", "Training loss", "loss (nats/token)",
         [("loss", "total loss"), ("lm_loss", "LM loss"), ("mtp_loss", "MTP loss (depth mean)")],
         [("val_loss", "validation LM loss")]),
        ("max_vio.png", "Expert load imbalance", "max load / mean load - 1",
         [("max_vio", "MaxVio (batch, mean over layers)")], [("val_max_vio", "MaxVio (validation set)")]),
        ("reward.png", "GRPO rewards", "reward / fraction",
         [("reward_mean", "mean reward (sampled rollouts)"), ("groups_with_variance", "groups with reward variance")],
         [("val_accuracy", "held-out accuracy (greedy)")]),
    ]
    for file, title, ylabel, series, eval_series in line_plots:
        if not any(series[0][0] in m for m in metrics):
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in series:
            points = [(m["step"], m[key]) for m in metrics if key in m]  # e.g. GRPO's skipped steps lack some
            if points:
                ax.plot(*zip(*points), lw=1, label=label)
        for key, label in eval_series:
            points = [(m["step"], m[key]) for m in metrics if key in m]
            if points:
                ax.plot(*zip(*points), "o-", label=label)
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.legend()
        ax.grid(alpha=0.3)
        written.append(_save(fig, run_dir / file))

    if "router_entropy" in metrics[0]:  # two quantities, two labelled axes
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
        top.plot(steps, [m["router_entropy"] for m in metrics], lw=1)
        top.set(ylabel="entropy (nats)", title="Router statistics (mean over MoE layers)")
        for key, label in (("dropped_fraction", "tokens routed to no expert"),
                           ("capacity_dropped", "assignments over expert capacity")):
            if key in metrics[0]:
                bottom.plot(steps, [m[key] for m in metrics], lw=1, label=label)
        bottom.set(xlabel="step", ylabel="fraction")
        bottom.legend()
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        written.append(_save(fig, run_dir / "router_stats.png"))

    router = read_jsonl(run_dir / "router.jsonl")
    if router:
        load_SLE = np.array([r["expert_load"] for r in router], np.float64)
        relative_SLE = load_SLE / load_SLE.mean(-1, keepdims=True)
        n_layers = load_SLE.shape[1]
        fig, axes = plt.subplots(n_layers, 1, figsize=(7, 1.8 * n_layers + 0.6), squeeze=False, sharex=True)
        for layer, ax in enumerate(axes[:, 0]):
            image = ax.imshow(relative_SLE[:, layer].T, aspect="auto", cmap="magma", vmin=0,
                              vmax=max(2.0, float(relative_SLE.max())), interpolation="nearest",
                              extent=(router[0]["step"] - 0.5, router[-1]["step"] + 0.5, load_SLE.shape[2] - 0.5, -0.5))
            ax.set_ylabel(f"MoE layer {layer}\nexpert")
        axes[-1, 0].set_xlabel("step")
        fig.colorbar(image, ax=axes[:, 0].tolist(), label="load / mean load")
        fig.suptitle("Expert load per MoE layer over training")
        written.append(_save(fig, run_dir / "expert_load.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
