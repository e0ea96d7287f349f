"""Figure-5-style drawing of a simulated schedule (schedules.py `Timeline`) on a matplotlib axis.

matplotlib is imported by the caller (experiments, notebooks), never by the package itself.
"""

from __future__ import annotations

from dsv3_jax.parallel.pipeline.schedules import Timeline

COLORS = {"F": "#f4b183", "B": "#9dc3e6", "I": "#a9d18e", "W": "#c9c9c9"}
LABELS = {"F": "forward", "B": "full backward", "I": "backward for input", "W": "backward for weights"}


def draw_timeline(ax, timeline: Timeline, title: str | None = None) -> None:
    """One bar per chunk, one row per rank, labelled with its micro-batch; the two halves of a
    DualPipe F&B pair are drawn stacked in the same row (F above, B below)."""
    for (r, i), t0 in timeline.start.items():
        ops = timeline.schedule.ranks[r]
        op, width = ops[i], timeline.end[(r, i)] - t0
        paired = op.overlap or (i > 0 and ops[i - 1].overlap)
        y, height = (r - 0.2 if op.overlap else r + 0.2, 0.4) if paired else (r, 0.8)
        ax.barh(y, width, height=height, left=t0, color=COLORS[op.kind], edgecolor="black", linewidth=0.3)
        if width >= 1:
            ax.text(t0 + width / 2, y, str(op.mb), ha="center", va="center", fontsize=5)
    ranks = len(timeline.schedule.ranks)
    ax.set(title=title or f"{timeline.schedule.name}: makespan {timeline.makespan:g}", ylabel="rank",
           yticks=range(ranks), ylim=(ranks - 0.5, -0.5))


def legend(fig, **kwargs) -> None:
    import matplotlib.patches as patches

    fig.legend([patches.Patch(color=c) for c in COLORS.values()], list(LABELS.values()), **kwargs)
