"""MTP ablation: D = 0, 1, 2 prediction depths at the same main model and steps.

Command:   uv run python experiments/mtp_ablation.py [--steps 150] [--seeds 0 1 2]
Runtime:   about 25 minutes on a 2-core CPU (nine `tiny` runs of 150 steps on the stdlib corpus).
Shows:     report §2.2 and Table 4: training with MTP modules (their loss weighted by
           train.mtp_lambda = 0.3) changes the main head's validation loss, measured with the MTP
           modules dropped (as at inference), and the first module's drafts are accepted by the
           main model for speculative decoding (report §5.4.3: 85-90% for V3). The main model is
           the same in all runs; only the MTP depth differs. Writes
           experiments/results/mtp_ablation.{md,png}.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

from dsv3_jax.checkpoint import load_trained
from dsv3_jax.data.pipeline import build_data
from dsv3_jax.infer.generate import generate, generate_speculative
from variants import RESULTS, finish, seeded_variants, train_variants

DEPTHS = (0, 1, 2)
PROMPTS, PROMPT_LEN, NEW_TOKENS = 4, 32, 64


def speculative_stats(run_dir: Path) -> dict:
    """Draft acceptance and wall-clock speed-up of MTP speculative decoding over greedy decoding
    (outputs checked equal), on validation prompts; compilation excluded."""
    config, model, _ = load_trained(run_dir)
    prompts = [list(map(int, w[:PROMPT_LEN])) for w in build_data(config, run_dir).val_windows[:PROMPTS]]
    generate(model, [prompts[0]], NEW_TOKENS)
    generate_speculative(model, prompts[0], NEW_TOKENS)
    greedy_s = spec_s = drafted = accepted = 0
    for prompt in prompts:
        t0 = time.perf_counter()
        greedy = generate(model, [prompt], NEW_TOKENS)[0]
        t1 = time.perf_counter()
        spec, stats = generate_speculative(model, prompt, NEW_TOKENS)
        t2 = time.perf_counter()
        assert spec == greedy, "speculative output must equal greedy output"
        greedy_s, spec_s = greedy_s + t1 - t0, spec_s + t2 - t1
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    return {"acceptance": accepted / max(drafted, 1), "speedup": greedy_s / spec_s}


def main() -> None:
    start = time.perf_counter()
    runs, args = seeded_variants({f"D={d}": [f"model.mtp_depth={d}"] for d in DEPTHS})
    speculative: dict[str, dict] = {}

    def after(name: str, run_dir: Path) -> None:
        if not name.startswith("D=0"):
            speculative[name] = speculative_stats(run_dir)
            print(name, speculative[name], flush=True)

    results = train_variants("tiny", runs, args.steps, after=after)
    write_results(results, speculative, args, time.perf_counter() - start)


def write_results(results, speculative, args, runtime) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def final(name):
        return [r for r in results[name] if "val_loss" in r][-1]["val_loss"]

    def spread(values, fmt):
        values = np.asarray(values)
        return f"{fmt.format(values.mean())} ({fmt.format(values.min())} .. {fmt.format(values.max())})"

    lines = ["# MTP ablation (tiny preset, CPU)", "",
             f"Command: `uv run python experiments/mtp_ablation.py --steps {args.steps} --seeds "
             f"{' '.join(map(str, args.seeds))}`; runtime {runtime / 60:.1f} min on a 2-core CPU (jax "
             f"{jax.__version__}, fp32).", "",
             f"The `tiny` preset, {args.steps} steps of batch 16 x 128 tokens on the stdlib corpus, seeds "
             f"{args.seeds} (initialisation; same data order); only `model.mtp_depth` differs (MTP loss weight "
             "0.3). Validation loss is the main head's, MTP modules dropped. Speculative decoding: the first MTP "
             f"module drafts one token, greedy, {PROMPTS} validation prompts of {PROMPT_LEN} tokens, "
             f"{NEW_TOKENS} new tokens, outputs checked equal to greedy. Mean (min .. max) over seeds.", "",
             "| MTP depth D | main-head val loss | per seed | draft acceptance | speculative speed-up (wall) |",
             "|---|---|---|---|---|"]
    for d in DEPTHS:
        names = [f"D={d}|{s}" for s in args.seeds]
        losses = [final(n) for n in names]
        if d:
            acceptance = spread([speculative[n]["acceptance"] for n in names], "{:.1%}")
            speedup = spread([speculative[n]["speedup"] for n in names], "{:.2f}x")
        else:
            acceptance = speedup = "(no MTP module)"
        lines.append(f"| {d} | {spread(losses, '{:.4f}')} | {', '.join(f'{v:.4f}' for v in losses)} | "
                     f"{acceptance} | {speedup} |")
    lines.append("")
    fig, ax = plt.subplots(figsize=(6, 4))
    for d in DEPTHS:
        for j, s in enumerate(args.seeds):
            evals = [(m["step"], m["val_loss"]) for m in results[f"D={d}|{s}"] if "val_loss" in m]
            ax.plot(*zip(*evals), "o-", color=f"C{d}", alpha=0.7, label=f"D = {d}" if j == 0 else None)
    ax.set(xlabel="step", ylabel="main-head validation loss", title="MTP depth ablation")
    finish(fig, (ax,), "mtp_ablation.png")
    (RESULTS / "mtp_ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
