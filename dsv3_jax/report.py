"""Plots of a run from its metrics.jsonl and router.jsonl: loss curves, MaxVio, expert-load heatmap."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsv3_jax.errors import UsageError
from dsv3_jax.run_dir import read_jsonl, write_atomic


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
         [("reward_mean", "mean reward (sampled rollouts)"), ("correct_mean", "correct (sampled rollouts)"),
          ("groups_with_variance", "groups with reward variance")],
         [("val_accuracy", "held-out accuracy (greedy)"), ("ood_accuracy", "out-of-distribution accuracy (greedy)")]),
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


# Several runs on one set of axes (`dsv3 report RUN RUN ...`, `dsv3 compare`) ----------------------

SUMMARY_COLUMNS = (  # (key, table heading, format)
    ("final_val_loss", "val loss (final)", ".4f"),
    ("best_val_loss", "val loss (best)", ".4f"),
    ("val_max_vio", "MaxVio val (final)", ".3f"),
    ("max_vio", "MaxVio batch (last 10%)", ".3f"),
    ("dropped_fraction", "dropped (last 10%)", ".4f"),
    ("val_topk_changed", "top-k changed (last eval)", ".3f"),
    ("tokens_per_s", "tokens/s", ",.0f"),
)


def run_summary(run_dir: Path) -> dict[str, float]:
    """A run's comparison numbers from its metrics.jsonl (the SUMMARY_COLUMNS it has): validation
    loss at the end and at its best, MaxVio on the validation set at the end and per batch over the
    last 10% of steps, tokens left without an expert, the share of validation tokens whose experts
    changed at the last evaluation, and the median step throughput (the first, compiling, step left out)."""
    metrics = read_jsonl(Path(run_dir) / "metrics.jsonl")
    if not metrics:
        raise UsageError(f"{str(run_dir)!r} has no metrics.jsonl with any step: is it a dsv3 run directory?")
    tail = metrics[-max(1, len(metrics) // 10):]
    evals = [m for m in metrics if "val_loss" in m]
    out: dict[str, float] = {"steps": metrics[-1]["step"]}
    if evals:
        out["final_val_loss"], out["best_val_loss"] = evals[-1]["val_loss"], min(m["val_loss"] for m in evals)
    for key in ("val_max_vio", "val_topk_changed"):
        last = [m[key] for m in evals if key in m]
        if last:
            out[key] = last[-1]
    for key in ("max_vio", "dropped_fraction"):
        if key in tail[-1]:
            out[key] = float(np.mean([m[key] for m in tail if key in m]))
    speeds = [m["tokens_per_s"] for m in metrics[1:] if "tokens_per_s" in m] or [metrics[0].get("tokens_per_s", 0.0)]
    out["tokens_per_s"] = float(np.median(speeds))
    return out


def comparison_table(groups: dict[str, list[Path]]) -> list[str]:
    """Markdown lines: one row per group (a variant's runs over seeds), each column its mean, with
    the range over the group's runs when it has several."""
    summaries = {name: [run_summary(d) for d in dirs] for name, dirs in groups.items()}
    columns = [c for c in SUMMARY_COLUMNS if any(c[0] in s for runs in summaries.values() for s in runs)]
    lines = ["| variant | runs | " + " | ".join(heading for _, heading, _ in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for name, runs in summaries.items():
        cells = []
        for key, _, fmt in columns:
            values = [s[key] for s in runs if key in s]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(format(values[0], fmt))
            else:
                cells.append(f"{format(float(np.mean(values)), fmt)} ({format(min(values), fmt)}..{format(max(values), fmt)})")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def _smoothed(steps: np.ndarray, values: np.ndarray, window: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """A moving mean over `window` points (fewer for a short run: at most a fifth of its points)."""
    window = max(1, min(window, len(values) // 5))
    return steps[window - 1:], np.convolve(values, np.ones(window) / window, mode="valid")


def write_comparison(groups: dict[str, list[Path]], out_dir: Path, title: str = "") -> Path:
    """comparison.png in `out_dir`: training loss, validation loss and MaxVio per batch (moving means
    over up to 10 steps), one colour per group: its mean over runs, shaded between their min and max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("loss", "training loss (moving mean)", True), ("val_loss", "validation LM loss", False),
              ("max_vio", "MaxVio per batch (moving mean)", True))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    for colour, (name, dirs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10, groups.items()):
        records = [read_jsonl(Path(d) / "metrics.jsonl") for d in dirs]
        for ax, (key, label, smooth) in zip(axes, panels):
            curves = []
            for metrics in records:
                points = [(m["step"], m[key]) for m in metrics if key in m]
                if points:
                    steps, values = (np.asarray(v, np.float64) for v in zip(*points))
                    curves.append(_smoothed(steps, values) if smooth else (steps, values))
            if not curves:
                continue
            n = min(len(s) for s, _ in curves)  # runs stopped at different steps: their common prefix
            steps, stacked = curves[0][0][:n], np.stack([v[:n] for _, v in curves])
            ax.plot(steps, stacked.mean(0), "-" if smooth else "o-", ms=3, color=colour,
                    label=name if len(curves) == 1 else f"{name} ({len(curves)} runs)")
            if len(curves) > 1:
                ax.fill_between(steps, stacked.min(0), stacked.max(0), color=colour, alpha=0.2)
            ax.set(xlabel="step", ylabel=label, yscale="log" if key == "max_vio" else "linear")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    return _save(fig, Path(out_dir) / "comparison.png")


def write_comparison_files(groups: dict[str, list[Path]], out_dir: Path, title: str, preamble: list[str] = (),
                           name: str = "comparison.md") -> tuple[list[str], Path, Path]:
    """The comparison table (read from every run first: a bad one fails before anything is written),
    comparison.png and a markdown file `name` holding both: (table lines, png path, markdown path)."""

    table = comparison_table(groups)
    png = write_comparison(groups, out_dir, title)
    md = Path(out_dir) / name
    write_atomic(md, "\n".join([f"# {title}", "", *preamble, *([""] if preamble else []), *table, "",
                                f"![comparison]({png.name})", ""]))
    return table, png, md
