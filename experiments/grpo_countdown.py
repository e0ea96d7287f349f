"""GRPO past supervised learning's plateau, on Countdown (report §5.2: rule-based rewards where an
answer can be checked but not every answer written out).

Command:   uv run python experiments/grpo_countdown.py [--base runs/default] [--seeds 0 1 2]
Runtime:   about 30 minutes on a 2-core CPU, plus 4 minutes to pretrain the `tiny` preset first
           unless --base points at a finished `dsv3 train` run.
Shows:     the `countdown` task ("3,5,7:26=" -> an expression of the three numbers, each once, worth
           the target; any such expression is rewarded, the SFT data shows one). SFT on a fixed set
           of 2,000 worked solutions at a constant lr, in stages, to its plateau (held-out accuracy
           flat over the last third of the stages: the table says so). From that checkpoint, per
           seed, (a) SFT continued for as many optimizer updates as GRPO makes, and further for
           about GRPO's wall time, and (b) GRPO: prompts from the same train split, no solutions,
           reward = correct + 0.1 x well-formed. Held-out accuracy (greedy) in distribution
           (targets 1..49, problems never in the SFT data or GRPO prompts) and out of it (targets
           50..99, never trained on). Writes experiments/results/grpo_countdown.{md,png}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from dsv3_jax.checkpoint import load_trained
from dsv3_jax.config import get_preset
from dsv3_jax.jobs.grpo import grpo, grpo_config
from dsv3_jax.jobs.train import train
from dsv3_jax.post.grpo import task_accuracy
from dsv3_jax.post.sft import sft_config
from dsv3_jax.post.tasks import TASKS, held_out, sft_examples

RESULTS = Path(__file__).parent / "results"
TASK = TASKS["countdown"]
SFT_EXAMPLES = 2000
SFT_LR = "3e-3"  # the tiny preset's pretraining peak; constant, so the stages chain into one run
SFT_STAGE, SFT_STAGES = 50, 10
GRPO_STEPS, PROMPTS, GROUP, PASSES = 50, 64, 8, 2
UPDATES = GRPO_STEPS * PASSES
SFT_MORE_WALL = 450  # SFT steps after the matched-updates control: about GRPO's wall time in all
# Settings as the public small-model results have them: groups of 8, 64 prompts per step, a binary
# correctness reward (plus a small format part), no KL term (beta 0; the KL is still measured).
GRPO = ["train.lr=3e-4", "train.bias_gamma=0", f"grpo.prompts_per_step={PROMPTS}", f"grpo.group_size={GROUP}",
        f"grpo.passes={PASSES}", "grpo.beta=0", "grpo.format_weight=0.1", "train.eval_every=10",
        "grpo.eval_problems=256"]


def timed(run: Path, job) -> float:
    """Run `job` (which fills `run`) and return its wall seconds; a run finished by an earlier call
    with the same --work is reused, with the seconds it took then."""
    wall = run / "wall_s.txt"
    if not wall.is_file():
        t0 = time.perf_counter()
        job()
        wall.write_text(f"{time.perf_counter() - t0:.1f}\n")
    return float(wall.read_text())


def sft_stage(start: Path, data: Path, run: Path, steps: int, seed: int, first: bool) -> float:
    """One stage of constant-lr SFT from `start`'s weights, its examples in the order of `seed`;
    returns its wall seconds."""
    overrides = [f"train.steps={steps}", f"train.lr={SFT_LR}", f"train.seed={seed}", f"data.shuffle_seed={seed}",
                 f"train.warmup_steps={10 if first else 0}", "train.decay_start_fraction=1.0",
                 "train.eval_every=1000", f"train.checkpoint_every={steps}"]
    return timed(run, lambda: train(sft_config(start, data, overrides), run, progress=False))


def accuracies(run: Path, problems: dict) -> dict[str, float]:
    _, model, tokenizer = load_trained(run)
    return {split: task_accuracy(model, tokenizer, TASK, ps) for split, ps in problems.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", help="a finished pretraining run (default: train `tiny` for 300 steps)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--held-out", type=int, default=512)
    parser.add_argument("--work", help="a directory for the runs; finished ones in it are reused (default: a new "
                                       "temporary one)")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="grpo-countdown-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = Path(args.base) if args.base else work / "base"
    if not args.base:
        train(get_preset("tiny"), base, progress=False)
    problems = {"in": held_out(TASK, args.held_out), "ood": held_out(TASK, args.held_out, split="ood")}
    data = work / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_examples(TASK, SFT_EXAMPLES, seed=0)))

    # SFT to its plateau, one stage at a time (the same data, epochs over it).
    plateau = [{"step": 0, **accuracies(base, problems)}]
    previous = base
    for stage in range(SFT_STAGES):
        run = work / f"sft-{stage}"
        sft_stage(previous, data, run, SFT_STAGE, seed=0, first=stage == 0)
        plateau.append({"step": (stage + 1) * SFT_STAGE, **accuracies(run, problems)})
        print(plateau[-1], flush=True)
        previous = run
    sft_end = previous

    rows, curves = [], {}
    for seed in args.seeds:
        more, longer, grpo_run = work / f"sft-more-{seed}", work / f"sft-longer-{seed}", work / f"grpo-{seed}"
        more_s = sft_stage(sft_end, data, more, UPDATES, seed, first=False)
        longer_s = more_s + sft_stage(more, data, longer, SFT_MORE_WALL, seed, first=False)
        grpo_s = timed(grpo_run, lambda: grpo(grpo_config(sft_end, TASK.name, GRPO + [
            f"train.steps={GRPO_STEPS}", f"train.seed={seed}"]), grpo_run, progress=False))
        curves[seed] = [json.loads(line) for line in (grpo_run / "metrics.jsonl").read_text().splitlines()]
        rows.append({"seed": seed, "sft_more": accuracies(more, problems), "sft_more_s": more_s,
                     "sft_longer": accuracies(longer, problems), "sft_longer_s": longer_s,
                     "grpo": accuracies(grpo_run, problems), "grpo_s": grpo_s})
        print(rows[-1], flush=True)
    write_results(plateau, rows, curves, time.perf_counter() - start, args)


def plateau_check(plateau: list[dict]) -> tuple[list[dict], float, float]:
    """The last third of the SFT stages, and its accuracy range and least-squares slope per 100 steps."""
    last = plateau[-(SFT_STAGES // 3 + 1):]
    steps, values = np.array([p["step"] for p in last]), np.array([p["in"] for p in last])
    slope = float(np.polyfit(steps, values, 1)[0] * 100)
    return last, float(values.max() - values.min()), slope


def write_results(plateau, rows, curves, runtime, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def summary(key, split):
        values = np.array([r[key][split] for r in rows])
        return f"{values.mean():.3f} ({values.min():.3f}..{values.max():.3f})"

    last, spread, slope = plateau_check(plateau)
    start = plateau[-1]
    best = max(plateau, key=lambda p: p["in"])
    wins = sum(r["grpo"]["in"] > max(r["sft_more"]["in"], r["sft_longer"]["in"]) for r in rows)
    lines = [
        "# GRPO past the SFT plateau on Countdown (tiny preset, CPU)", "",
        f"Command: `uv run python experiments/grpo_countdown.py{' --base ' + args.base if args.base else ''} "
        f"--seeds {' '.join(map(str, args.seeds))}`; total runtime {runtime / 60:.1f} min on a 2-core CPU. "
        f"Base: a finished `uv run dsv3 train` of the `tiny` preset.", "",
        f"Task: `countdown` (post/tasks.py): three numbers 1..9 and a target; the answer is any expression "
        f"of the three, each once, with + - * / and brackets, worth the target exactly (post/expressions.py "
        f"parses it; post/rewards.py `countdown`). Greedy accuracy on {args.held_out} held-out problems in "
        f"distribution (targets 1..49; a fixed eighth of (numbers, target) pairs, never in the SFT data or "
        f"the GRPO prompts) and {args.held_out} out of it (targets 50..99, never trained on).", "",
        "## 1. SFT to its plateau", "",
        f"{SFT_EXAMPLES} worked solutions (one per problem, from the train split), lr {SFT_LR} constant, "
        f"{SFT_STAGES} stages of {SFT_STAGE} steps (batches of 16 x 128 packed tokens: several epochs a stage), "
        f"each stage starting from the last one's weights.", "",
        "| SFT step | held-out accuracy | out of distribution |", "|---|---|---|"]
    lines += [f"| {p['step']} | {p['in']:.3f} | {p['ood']:.3f} |" for p in plateau]
    lines += ["", f"Plateau: over the last third (steps {last[0]['step']}..{last[-1]['step']}) held-out accuracy "
              f"spans {spread:.3f} with a least-squares slope of {slope:+.3f} per 100 steps: flat within the "
              f"noise of {args.held_out} problems (one standard error about "
              f"{np.sqrt(start['in'] * (1 - start['in']) / args.held_out):.3f}).", "",
              f"## 2. From the plateau (step {start['step']}): SFT continued vs GRPO", "",
              f"GRPO: {GRPO_STEPS} steps x {PROMPTS} prompts x {GROUP} samples, {PASSES} passes = {UPDATES} "
              f"optimizer updates, `{' '.join(GRPO)}`. SFT continued: the same data and lr for {UPDATES} updates "
              f"(matched updates), then {SFT_MORE_WALL} more (matched wall time, roughly).", "",
              "| seed | SFT +%d (in / ood) | s | SFT +%d (in / ood) | s | GRPO %d updates (in / ood) | s |"
              % (UPDATES, UPDATES + SFT_MORE_WALL, UPDATES),
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['sft_more']['in']:.3f} / {r['sft_more']['ood']:.3f} | {r['sft_more_s']:.0f} "
                     f"| {r['sft_longer']['in']:.3f} / {r['sft_longer']['ood']:.3f} | {r['sft_longer_s']:.0f} "
                     f"| **{r['grpo']['in']:.3f}** / {r['grpo']['ood']:.3f} | {r['grpo_s']:.0f} |")
    lines += [f"| mean (min..max) | {summary('sft_more', 'in')} / {summary('sft_more', 'ood')} | "
              f"| {summary('sft_longer', 'in')} / {summary('sft_longer', 'ood')} | "
              f"| {summary('grpo', 'in')} / {summary('grpo', 'ood')} | |", "",
              f"GRPO above both continued-SFT controls on held-out accuracy: {wins} of {len(rows)} seeds. "
              f"The best SFT stage of section 1 (step {best['step']}, {best['in']:.3f}, before the plateau: an "
              f"early-stopping choice made on the held-out set itself) is below GRPO's final accuracy on "
              f"{sum(r['grpo']['in'] > best['in'] for r in rows)} of {len(rows)} seeds. The controls' seeds "
              "change the order of the SFT examples (data.shuffle_seed); GRPO's change the prompts and samples.", "",
              "![SFT plateau and GRPO per step](grpo_countdown.png)", ""]

    RESULTS.mkdir(exist_ok=True)
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    ax = axes[0, 0]
    ax.plot([p["step"] for p in plateau], [p["in"] for p in plateau], "o-", label="held out")
    ax.plot([p["step"] for p in plateau], [p["ood"] for p in plateau], "s--", label="out of distribution")
    ax.axvspan(last[0]["step"], last[-1]["step"], alpha=0.15, label="last third")
    ax.set(xlabel="SFT step", ylabel="accuracy (greedy)", title="SFT to its plateau")
    panels = [(axes[0, 1], "val_accuracy", "held-out accuracy (greedy)", "o-"),
              (axes[0, 2], "correct_mean", "correct, sampled rollouts (T=1)", "-"),
              (axes[1, 0], "kl", "KL(policy || reference), eq. 27", "-"),
              (axes[1, 1], "response_length", "response tokens", "-"),
              (axes[1, 2], "groups_with_variance", "groups with reward variance", "-")]
    for seed, metrics in curves.items():
        for ax, key, title, style in panels:
            points = [(m["step"], m[key]) for m in metrics if key in m]
            ax.plot(*zip(*points), style, lw=1, label=f"GRPO seed {seed}")
    for r in rows:
        axes[0, 1].axhline(r["sft_more"]["in"], color="gray", lw=0.8, ls=":")
    axes[0, 1].axhline(start["in"], color="black", lw=0.8, ls="--", label="SFT plateau")
    for ax, key, title, _ in panels:
        ax.set(xlabel="GRPO step", title=title)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    axes[0, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "grpo_countdown.png", dpi=100)
    # The hand-written "## Reading" of the last run's numbers is kept (re-read it against the new tables).
    md = RESULTS / "grpo_countdown.md"
    reading = md.read_text().partition("\n## Reading")[2] if md.is_file() else ""
    md.write_text("\n".join(lines) + "\n" + ("\n## Reading" + reading if reading else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
