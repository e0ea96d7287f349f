"""MLA vs MHA / GQA / MQA: validation loss, KV-cache bytes per token, decode speed at context 2048.

Command:   uv run python experiments/mla_vs_mha.py [--steps 150] [--seeds 0 1 2]
Runtime:   about 30 minutes on a 2-core CPU (twelve `tiny` runs of 150 steps on the stdlib corpus,
           then four decode timings).
Shows:     report §2.1.1 (and DeepSeek-V2 §2.1 / Table 1): MLA caches C + R values per token per
           layer, 4.5 d_h with V3's ratios (C = 4 d_h, R = d_h / 2), less than GQA with 2 K/V heads
           (2 x (1.5 + 1) d_h = 5 d_h here) and more than MQA (2.5 d_h), against MHA's H x 2.5 d_h,
           while its quality should match MHA's. The four attentions share everything else (the `tiny` preset:
           embeddings, dense and MoE layers, MTP, optimizer, data, steps). Writes
           experiments/results/mla_vs_mha.{md,png}.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.config import apply_overrides, get_preset
from dsv3_jax.infer.cache import bytes_per_token, init_caches
from dsv3_jax.infer.generate import generate
from dsv3_jax.model.model import DeepSeekV3
from variants import RESULTS, finish, seeded_variants, train_variants

# V3's attention ratios at d_h = 32 (tiny has 4 heads of d_model 128): V3 has N = Vh = d_h = 128,
# R = d_h / 2 = 64, C = 4 d_h = 512. Every variant uses these head dims; only MLA uses C and q_lora.
HEADS = ["model.qk_nope_dim=32", "model.qk_rope_dim=16", "model.v_head_dim=32", "model.kv_lora_rank=128"]
ATTENTIONS = {
    "MLA": ["model.attention=mla"],
    "MHA": ["model.attention=mha"],
    "GQA (2 K/V heads)": ["model.attention=gqa", "model.n_kv_heads=2"],
    "MQA": ["model.attention=mqa"],
}
CONTEXT, NEW_TOKENS = 2048, 64


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def describe(overrides: list[str]) -> dict:
    """Parameter counts (whole model, attention of one layer) and cache bytes per token (bf16)."""
    cfg = apply_overrides(get_preset("tiny"), HEADS + overrides).model
    model = nnx.eval_shape(lambda: DeepSeekV3(cfg, nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    attention = count(nnx.state(model.moe_layers.attn, nnx.Param)) // cfg.n_moe_layers  # a stacked module
    caches = jax.eval_shape(lambda: init_caches(cfg, 1, 128, "absorbed", jnp.bfloat16))
    return {"params": count(params), "attention_params": attention, "cache_bytes": bytes_per_token(caches, 1, 128),
            "cache_values": cfg.kv_cache_values_per_token_per_layer}


def decode_tokens_per_s(overrides: list[str]) -> float:
    """Batch-1 greedy decode at context CONTEXT (random weights: speed does not depend on them); the
    prefill is timed separately (1 new token) and subtracted, compilation excluded."""
    cfg = apply_overrides(get_preset("tiny"), HEADS + overrides + [f"model.max_seq_len={CONTEXT + NEW_TOKENS}"]).model
    model = DeepSeekV3(cfg, nnx.Rngs(0))
    prompt = [list(np.random.default_rng(0).integers(0, cfg.vocab_size, CONTEXT))]

    def timed(n):
        generate(model, prompt, n)  # compile
        t0 = time.perf_counter()
        for _ in range(3):
            generate(model, prompt, n)
        return (time.perf_counter() - t0) / 3

    return (NEW_TOKENS - 1) / (timed(NEW_TOKENS) - timed(1))


def main() -> None:
    start = time.perf_counter()
    runs, args = seeded_variants({name: overrides + HEADS for name, overrides in ATTENTIONS.items()})
    results = train_variants("tiny", runs, args.steps)
    rows = []
    for name, overrides in ATTENTIONS.items():
        finals = [[r for r in results[f"{name}|{s}"] if "val_loss" in r][-1]["val_loss"] for s in args.seeds]
        rows.append({"name": name, "val": np.array(finals), **describe(overrides),
                     "decode": decode_tokens_per_s(overrides)})
        print(rows[-1], flush=True)
    write_results(rows, results, args, time.perf_counter() - start)


def write_results(rows, results, args, runtime) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mla = rows[0]
    lines = ["# MLA vs MHA / GQA / MQA (tiny preset, CPU)", "",
             f"Command: `uv run python experiments/mla_vs_mha.py --steps {args.steps} --seeds "
             f"{' '.join(map(str, args.seeds))}`; runtime {runtime / 60:.1f} min on a 2-core CPU (jax "
             f"{jax.__version__}, fp32).", "",
             f"The `tiny` preset (d_model 128, 4 heads, 4 layers + 1 MTP, 8 routed experts) with V3's attention "
             f"ratios at d_h = 32 (`{' '.join(HEADS)}`): qk head dim 48 (32 + 16 rotary), v head dim 32; MLA "
             "also has q_lora_rank 64 and the latent C = 128. Everything outside the attention is identical; "
             f"{args.steps} steps of batch 16 x 128 tokens on the stdlib corpus, seeds {args.seeds} "
             "(initialisation; the data order is the same). Validation loss: main head, MTP dropped.", "",
             "| attention | val loss mean | min | max | params (model) | attention params / layer | "
             "cache values / token / layer | cache bytes / token (bf16, all layers) | vs MLA | "
             f"decode tok/s (batch 1, context {CONTEXT}) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['val'].mean():.4f} | {r['val'].min():.4f} | {r['val'].max():.4f} | "
                     f"{r['params']:,} | {r['attention_params']:,} | {r['cache_values']} | {r['cache_bytes']:,} | "
                     f"{r['cache_bytes'] / mla['cache_bytes']:.2f}x | {r['decode']:.0f} |")
    lines += ["", "Per-seed validation losses: " + "; ".join(
        f"{r['name']}: {', '.join(f'{v:.4f}' for v in r['val'])}" for r in rows), ""]
    RESULTS.mkdir(exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, r in enumerate(rows):
        color = f"C{i}"
        for j, seed in enumerate(args.seeds):
            evals = [(m["step"], m["val_loss"]) for m in results[f"{r['name']}|{seed}"] if "val_loss" in m]
            left.plot(*zip(*evals), "o-", color=color, alpha=0.7, label=r["name"] if j == 0 else None)
        contexts = np.array([512, 2048, 8192, 32768])
        right.plot(contexts, contexts * r["cache_bytes"] / 2 ** 20, "o-", color=color, label=r["name"])
    left.set(xlabel="step", ylabel="validation loss (main head)", title="quality")
    right.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="KV cache MiB per sequence (bf16)",
              title="cache")
    finish(fig, (left, right), "mla_vs_mha.png")
    (RESULTS / "mla_vs_mha.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
