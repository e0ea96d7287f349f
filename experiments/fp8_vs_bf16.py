"""FP8 vs high-precision training from the same seed: the relative loss gap (report §3.3: < 0.25%).

Command:   uv run python experiments/fp8_vs_bf16.py --preset small --steps 200 --set train.batch_size=8
           uv run python experiments/fp8_vs_bf16.py --preset tiny --steps 300 --dtype float32
           uv run python experiments/fp8_vs_bf16.py --preset tiny --steps 60 --set train.seed=5 --out fp8_vs_bf16_tiny_60
Runtime:   small, 200 steps of 8 x 256 tokens: about an hour on a 2-core CPU (FP8 is emulated there:
           quantize, dequantize, one fp32 GEMM); tiny: about 5 minutes. Minutes on a GPU.
Shows:     the same model, data and seed trained with every MLA projection, FFN and expert GEMM in
           block-scaled FP8 (Fprop, Dgrad and Wgrad; xla backend) and without (bf16 by default, like
           the report's baseline); the relative gap of the final training and validation losses, and
           both curves. Writes experiments/results/fp8_vs_bf16_<preset>.{md,png}.
"""

from __future__ import annotations

import argparse

import numpy as np

from variants import RESULTS, plot_loss_curves, train_variants


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="compute dtype of both runs (the baseline's GEMMs run in it)")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", default=None, help="results name (default fp8_vs_bf16_<preset>)")
    args = parser.parse_args()
    out = args.out or f"fp8_vs_bf16_{args.preset}"
    baseline = {"bfloat16": "bf16", "float32": "fp32"}[args.dtype]
    common = [f"model.dtype={args.dtype}", *args.set]
    curves = train_variants(args.preset, {baseline: ["model.fp8=false", *common],
                                          "FP8": ["model.fp8=true", *common]}, args.steps)

    plot_loss_curves(curves, f"FP8 vs {baseline}, `{args.preset}` preset", f"{out}.png")
    hp, f8 = curves[baseline], curves["FP8"]
    last = lambda ms, key, n=20: float(np.mean([m[key] for m in ms[-n:]]))
    train_gap = (last(f8, "lm_loss") - last(hp, "lm_loss")) / last(hp, "lm_loss")
    val_gap = (f8[-1]["val_loss"] - hp[-1]["val_loss"]) / hp[-1]["val_loss"]
    # Every step's training loss (issue 30: within 2% at every step), not only the smoothed end.
    step_gaps = np.array([abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(f8, hp)])
    worst = int(np.argmax(step_gaps))
    overrides = " ".join(f"`{o}`" for o in common)
    lines = [f"# FP8 vs {baseline}: `{args.preset}` preset, {args.steps} steps, same seed and data", "",
             f"Overrides for both runs: {overrides}. FP8: block-scaled e4m3 GEMMs (1x128 activation tiles, 128x128 "
             "weight blocks, fp32 accumulation) for Fprop, Dgrad and Wgrad of MLA projections, FFNs and routed "
             f"experts (xla backend: emulated on CPU); embedding, head, router, norms and attention in {baseline}. "
             f"Baseline: the same model with every GEMM in {baseline}. Master weights and optimizer state fp32.", "",
             "| run | train LM loss (last 20 steps) | val loss (end) | tokens/s |", "|---|---|---|---|"]
    for name, ms in curves.items():
        lines.append(f"| {name} | {last(ms, 'lm_loss'):.4f} | {ms[-1]['val_loss']:.4f} | "
                     f"{np.median([m['tokens_per_s'] for m in ms[5:]]):,.0f} |")
    lines += ["", f"Relative gap, FP8 vs {baseline}: train {train_gap:+.3%}, validation {val_gap:+.3%} "
              "(report §3.3: below 0.25% at scale).", "",
              f"Per step (training loss): largest gap {step_gaps[worst]:.2%} at step {hp[worst]['step']}, "
              f"mean {step_gaps.mean():.2%}, at the last step {step_gaps[-1]:.2%}.", "",
              f"![curves]({out}.png)", ""]
    (RESULTS / f"{out}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
