"""Pipeline bubbles and activation memory of GPipe, 1F1B, ZB1P, DualPipe and DualPipeV (report Table 2, Figure 5).

Command:   uv run python experiments/pipeline_bubbles.py [--ranks 8 --microbatches 20]
Runtime:   a second (pure Python: the schedules are data, simulated chunk by chunk).
Shows:     each schedule's simulated bubble (idle time of the busiest-waiting rank) next to Table 2's
           formula, its peak stored activations and parameter copies, for chunk costs F=1, B=2 (full
           backward), W=1 and an overlapped F&B pair of 2.5 (or F + B = 3 without overlap); and a
           Figure-5-style timeline of each schedule. Writes experiments/results/pipeline_bubbles.{md,png}.
           That the executor computes these schedules' exact gradients is a test
           (tests/test_pipeline_executor.py), not this script.
"""

from __future__ import annotations

import argparse

from variants import RESULTS

from dsv3_jax.parallel.pipeline.draw import draw_timeline, legend
from dsv3_jax.parallel.pipeline.schedules import SCHEDULES, Costs, make_schedule, peak_activations, simulate


def formula(name: str, P: int, c: Costs) -> str:
    fb = c.F + c.B if c.FB is None else c.FB
    return {"gpipe": f"(P-1)(F+B) = {(P - 1) * (c.F + c.B):g}",
            "1f1b": f"(P-1)(F+B) = {(P - 1) * (c.F + c.B):g}",
            "zb1p": f"(P-1)(F+B-2W) = {(P - 1) * (c.F + c.B - 2 * c.W):g}",
            "dualpipe": f"(P/2-1)(F&B+B-3W) = {(P / 2 - 1) * (fb + c.B - 3 * c.W):g}",
            "dualpipev": f"DualPipe of 2P ranks, half chunks: (P-1)(F&B+B-3W) = {(P - 1) * (fb + c.B - 3 * c.W):g}"}[name]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=20)
    args = parser.parse_args()
    P, n = args.ranks, args.microbatches
    lines = [f"# Pipeline bubbles: {P} ranks, {n} micro-batches (report Table 2)", "",
             "Chunk costs F=1, B=2 (full backward), W=1 (its weight part). Bubble: the largest idle time of any "
             "rank, from the simulator (`dsv3_jax/parallel/pipeline/schedules.py`). DualPipeV chunks are half a "
             "stage (2P stages on P ranks), so its figures are in half-stage units.", "",
             "| schedule | F&B | simulated bubble | Table 2 | peak activations (chunks) | parameter copies |",
             "|---|---|---|---|---|---|"]
    timelines = {}
    for fb in (2.5, None):
        costs = Costs(F=1.0, B=2.0, W=1.0, FB=fb)
        for name in SCHEDULES:
            schedule = make_schedule(name, P, n)
            timeline = simulate(schedule, costs)
            timelines.setdefault(name, timeline)
            bubble = max(timeline.bubble(r) for r in range(P))
            copies = {"dualpipe": "2x"}.get(name, "1x")
            lines.append(f"| {name} | {'overlapped 2.5' if fb else 'F+B = 3'} | {bubble:g} | {formula(name, P, costs)} | "
                         f"{max(peak_activations(schedule))} | {copies} |")
    lines += ["", "![schedules](pipeline_bubbles.png)", ""]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(timelines), 1, figsize=(12, 2.2 * len(timelines)))
    for ax, timeline in zip(axes, timelines.values()):
        draw_timeline(ax, timeline)
    axes[-1].set_xlabel("time (F = 1)")
    legend(fig, loc="upper right", fontsize=7)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "pipeline_bubbles.png", dpi=110)
    (RESULTS / "pipeline_bubbles.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
