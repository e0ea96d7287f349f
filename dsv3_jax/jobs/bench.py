"""Benchmarks that print a table (never timed assertions): `dsv3 bench decode`, `dsv3 bench train`."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.config import Config
from dsv3_jax.infer.cache import MODES, bytes_per_token, init_caches
from dsv3_jax.infer.generate import _decode
from dsv3_jax.info import model_info
from dsv3_jax.model.grouped_gemm import grouped_matmul
from dsv3_jax.model.model import DeepSeekV3
from dsv3_jax.platform import platform_of
from dsv3_jax.train.state import create_train_state
from dsv3_jax.train.step import make_train_step
from pallas_kernels.fp8_gemm import block_scaled_matmul, dequantized_matmul
from pallas_kernels.fp8_quant import quantize_blocks_ref, quantize_rows_ref


def _timed(fn, repeats: int) -> float:
    """Median seconds of fn() over repeats (after one warm-up call that compiles)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_decode(config: Config, batch: int, context: int, decode_steps: int = 8, modes=MODES,
                 cache_dtype=jnp.bfloat16) -> list[dict]:
    """Prefill `context` tokens, then time one-token decode steps at position `context`, per cache mode."""
    cfg = dataclasses.replace(config.model, max_seq_len=max(config.model.max_seq_len, context + decode_steps + 1))
    model = DeepSeekV3(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(0), (batch, context), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(context), (batch, context))
    slots = context + decode_steps
    rows = []
    for mode in modes:
        caches = init_caches(cfg, batch, slots, mode, cache_dtype)
        prefill_s = _timed(lambda: _decode(graphdef, state, caches, tokens, positions, mode)[0], repeats=1)
        _, _, filled = _decode(graphdef, state, caches, tokens, positions, mode)
        next_tokens = tokens[:, -1:]
        step_positions = jnp.full((batch, 1), context, jnp.int32)
        step_s = _timed(lambda: _decode(graphdef, state, filled, next_tokens, step_positions, mode)[0],
                        repeats=decode_steps)
        rows.append({"mode": mode, "batch": batch, "context": context,
                     "prefill_tokens_per_s": batch * context / prefill_s,
                     "decode_tokens_per_s": batch / step_s, "decode_ms_per_step": 1e3 * step_s,
                     "cache_bytes_per_token": bytes_per_token(caches, batch, slots),
                     "cache_MiB": sum(x.nbytes for x in jax.tree.leaves(caches)) / 2 ** 20})
    return rows


def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: (f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}") if isinstance(v, float) else (
        f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def bench_fp8(m: int, k: int, ns: list[int], backends: list[str], repeats: int = 3) -> list[dict]:
    """TFLOP/s of bf16 `jnp.dot` vs the block-scaled FP8 GEMM (quantized operands given, as in
    training where quantization is fused upstream) and its grouped form (quantization included:
    what a routed expert GEMM costs in training), at the given shapes."""

    rows = []
    platform = platform_of(jax.devices()[0])  # the benchmark runs on this machine's default device
    for n in ns:
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
        flops = 2 * m * k * n
        a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
        bf16 = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        base = _timed(lambda: bf16(a16, b16), repeats)
        rows.append({"op": "bf16 jnp.dot", "M": m, "K": k, "N": n, "ms": 1e3 * base, "TFLOP/s": flops / base / 1e12,
                     "speed-up vs bf16": 1.0})
        qa, sa = quantize_rows_ref(a)
        qb, sb = quantize_blocks_ref(b)
        for backend in backends:
            if backend == "pallas":
                fn = jax.jit(lambda *xs: block_scaled_matmul(*xs, platform=platform))
            else:
                fn = jax.jit(dequantized_matmul)
            t = _timed(lambda: fn(qa, sa, qb, sb), repeats)
            rows.append({"op": f"fp8 block-scaled ({backend})", "M": m, "K": k, "N": n, "ms": 1e3 * t,
                         "TFLOP/s": flops / t / 1e12, "speed-up vs bf16": base / t})
        experts = 8
        sizes = jnp.full((experts,), m // experts, jnp.int32)
        w = jax.random.normal(jax.random.key(2), (experts, k, n), jnp.float32)
        for backend in backends:
            grouped = jax.jit(lambda x, w, sizes: grouped_matmul(x, w, sizes, fp8_backend=backend))
            t = _timed(lambda: grouped(a, w, sizes), repeats)
            rows.append({"op": f"fp8 grouped, {experts} experts ({backend})", "M": m, "K": k, "N": n, "ms": 1e3 * t,
                         "TFLOP/s": flops / t / 1e12, "speed-up vs bf16": base / t})
    return rows


# Dense bf16 peak TFLOP/s by device kind, for MFU (vendor figures, no sparsity).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "TPU v5p": 459.0, "TPU v4": 275.0}


def peak_tflops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k.lower() in kind.lower()), None)


def measured_matmul_peak(dtype, n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of one large square `jnp.dot` in `dtype` on the default device: the peak that means
    something on any machine (a CPU has no vendor figure here; plain XLA may not reach the vendor's)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    return 2 * n ** 3 / _timed(lambda: dot(a, a), repeats)


def bench_train(config: Config, steps: int = 5, peak_matmul_n: int = 2048) -> list[dict]:
    """Train-step throughput on random tokens: tokens/s, model FLOP/s (6 x activated matmul
    weights per token + attention, forward and backward), MFU against the device's bf16 peak, and
    the fraction of a large `jnp.dot`'s FLOP/s in the model's dtype measured in the same run."""

    tc = config.train
    graphdef, optimizer, state = create_train_state(config, 0)
    step = jax.jit(make_train_step(config, graphdef, optimizer), donate_argnums=0)  # as `dsv3 train` runs it
    tokens = jax.random.randint(jax.random.key(0), (tc.batch_size, tc.seq_len + 1), 0, config.model.vocab_size)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], tokens)
        return metrics["loss"]

    seconds = _timed(run, steps)
    tokens_per_step = tc.batch_size * tc.seq_len
    flops_per_token = 3 * model_info(config.model, seq_len=tc.seq_len)["flops_per_token"]
    achieved = flops_per_token * tokens_per_step / seconds
    peak = peak_tflops(jax.devices()[0])
    matmul_peak = measured_matmul_peak(jnp.dtype(config.model.dtype), peak_matmul_n)
    return [{"batch": tc.batch_size, "seq_len": tc.seq_len, "fp8": config.model.fp8, "dtype": config.model.dtype,
             "step_ms": 1e3 * seconds, "tokens_per_s": tokens_per_step / seconds, "model_TFLOP/s": achieved / 1e12,
             "MFU": (achieved / 1e12 / peak) if peak else "n/a (unknown peak)",
             "jnp.dot_TFLOP/s": matmul_peak / 1e12, "of_jnp.dot": achieved / matmul_peak}]
