"""FP8 activation caching (report §3.3.4) against caching in the compute dtype: loss gap and bytes saved.

Command:   uv run python experiments/fp8_activation_cache.py --steps 60
Runtime:   about 6 minutes on a 2-core CPU (two tiny FP8 runs, then four compiles at `small`'s widths).
Shows:     (1) `tiny` trained with FP8 GEMMs twice from the same seed and data, once keeping the
           Linear layers' and routed experts' inputs for the backward pass as e4m3 1x128 tiles with
           their fp32 scales (`model.fp8_activation_cache=true`, the default with FP8) and once in the
           compute dtype: the relative gap of the training and validation losses.
           (2) The bytes the loss-and-gradients program keeps per MoE layer at `small`'s widths
           (compiled temporaries, the slope from 3 to 6 rolled layers) both ways, beside what
           jobs/plan.py charges. Writes experiments/results/fp8_activation_cache.{md,png}.
"""

from __future__ import annotations

import argparse

import numpy as np

from variants import RESULTS, plot_loss_curves, train_variants


def bytes_per_moe_layer(cache: bool, remat: str) -> tuple[float, float]:
    """(compiled, planned) bytes per MoE layer of `small` with FP8, batch 8, vocab 512."""
    import jax
    import jax.numpy as jnp

    from dsv3_jax.config import apply_overrides, get_preset
    from dsv3_jax.jobs.plan import activation_bytes
    from dsv3_jax.train.state import abstract_train_state
    from dsv3_jax.train.step import make_loss_and_grads

    def temp_bytes(n_layers):
        config = apply_overrides(get_preset("small"), [
            "model.fp8=true", f"model.fp8_activation_cache={str(cache).lower()}", f"model.remat={remat}",
            f"model.n_layers={n_layers}", "model.unroll_layers=0", "model.vocab_size=512", "train.batch_size=8"])
        graphdef, _, state = abstract_train_state(config)
        tokens = jax.ShapeDtypeStruct((8, config.train.seq_len + 1), jnp.int32)
        compiled = jax.jit(make_loss_and_grads(config, graphdef)).lower(
            state.params, state.routing_bias, tokens).compile()
        return config, compiled.memory_analysis().temp_size_in_bytes

    (config, three), (_, six) = temp_bytes(3), temp_bytes(6)
    one_device = dict(data=1, fsdp=1, tensor=1, expert=1, pipeline=1)
    tokens = 8 * config.train.seq_len
    planned = (activation_bytes(config, tokens, one_device, {"dense": 0, "moe": 1}, 1)
               - activation_bytes(config, tokens, one_device, {"dense": 0, "moe": 0}, 1))
    return (six - three) / 3, planned


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    common = ["model.fp8=true", "model.dtype=bfloat16", *args.set]
    curves = train_variants("tiny", {"bf16 cache": [*common, "model.fp8_activation_cache=false"],
                                     "FP8 cache": [*common, "model.fp8_activation_cache=true"]}, args.steps)
    memory = {(cache, remat): bytes_per_moe_layer(cache, remat) for remat in ("none", "report")
              for cache in (False, True)}

    plot_loss_curves(curves, "FP8 GEMMs: activations cached in FP8 vs bf16, `tiny`", "fp8_activation_cache.png")

    base, cached = curves["bf16 cache"], curves["FP8 cache"]
    last = lambda ms, key, n=20: float(np.mean([m[key] for m in ms[-n:]]))
    train_gap = (last(cached, "lm_loss") - last(base, "lm_loss")) / last(base, "lm_loss")
    val_gap = (cached[-1]["val_loss"] - base[-1]["val_loss"]) / base[-1]["val_loss"]
    step_gaps = np.array([abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(cached, base)])
    mib = lambda b: f"{b / 2**20:.1f}"
    from dsv3_jax.config import get_preset

    small = get_preset("small").model
    lines = [f"# FP8 activation caching (§3.3.4): `tiny`, {args.steps} steps, same seed and data", "",
             "Both runs: FP8 GEMMs (1x128 / 128x128 block scales) for Fprop, Dgrad and Wgrad, "
             f"{' '.join(f'`{o}`' for o in common)}. `FP8 cache` keeps the inputs of every FP8 Linear (but the "
             "attention output projection's, which stays bf16: the report's E5M6 has no JAX dtype) and of the "
             "routed experts' GEMMs (their input rows, SwiGLU gate and up products) as e4m3 tiles with one fp32 "
             "scale per 128 values; the Wgrad dequantizes them. `bf16 cache` keeps the same tensors in the "
             "compute dtype (the routed SwiGLU inputs in fp32, ragged_dot's result dtype).", "",
             "| run | train LM loss (last 20 steps) | val loss (end) | tokens/s |", "|---|---|---|---|"]
    for name, ms in curves.items():
        lines.append(f"| {name} | {last(ms, 'lm_loss'):.4f} | {ms[-1]['val_loss']:.4f} | "
                     f"{np.median([m['tokens_per_s'] for m in ms[5:]]):,.0f} |")
    lines += ["", f"Relative gap, FP8 cache vs bf16 cache: train {train_gap:+.3%}, validation {val_gap:+.3%}; "
              f"per step largest {step_gaps.max():.2%}, mean {step_gaps.mean():.2%}.", "",
              f"Bytes kept per MoE layer for the backward pass, `small`'s widths (d_model {small.d_model}, "
              f"{small.n_routed_experts} routed experts of {small.moe_ffn_dim}, top-{small.top_k}), batch 8 x "
              f"{get_preset('small').train.seq_len} tokens, FP8 GEMMs; compiled = the slope of XLA:CPU's temporaries "
              "from 3 to 6 rolled layers, planned = jobs/plan.py's model of the same config.", "",
              "| `model.remat` | cache | compiled MiB / MoE layer | planned MiB |", "|---|---|---|---|"]
    for (cache, remat), (compiled, planned) in memory.items():
        lines.append(f"| {remat} | {'FP8' if cache else 'bf16'} | {mib(compiled)} | {mib(planned)} |")
    for remat in ("none", "report"):
        saved = 1 - memory[(True, remat)][0] / memory[(False, remat)][0]
        lines.append(f"\nWith `remat={remat}` FP8 caching saves {saved:.0%} of the compiled bytes per MoE layer.")
    lines += ["", "![curves](fp8_activation_cache.png)", ""]
    (RESULTS / "fp8_activation_cache.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
