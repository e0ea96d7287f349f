"""Why the FP8 GEMMs promote to fp32 every 128 of K (report §3.3.2, "increasing accumulation precision").

Command:   uv run python experiments/fp8_accumulation.py
Runtime:   about 30 s on a 2-core CPU.
Shows:     the report measured that H800 tensor cores keep ~14 bits in their FP8 GEMM accumulator,
           giving a maximum relative error of nearly 2% at K = 4096, and that adding each 128-deep
           partial (4 WGMMAs) to an fp32 accumulator on CUDA cores removes it. This runs the
           emulator `pallas_kernels.fp8_gemm.limited_accumulation_matmul` (the running sum rounded
           to 13 explicit mantissa bits after every 32-deep instruction) on block-quantized random
           operands, with and without promotion, against the exact (float64) product of the same
           e4m3 operands, so quantization error is excluded and only accumulation error is left.
           Writes experiments/results/fp8_accumulation.md.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from pallas_kernels.fp8_gemm import block_scaled_matmul_ref, limited_accumulation_matmul
from pallas_kernels.fp8_quant import dequantize_blocks, dequantize_rows, quantize_blocks_ref, quantize_rows_ref
from variants import RESULTS

M, N = 128, 128
K_VALUES = (256, 1024, 4096, 16384)
SEEDS = (0, 1, 2)


def errors(k: int, seed: int) -> dict[str, float]:
    """Max |error| / max |exact| over the output, per accumulation scheme, for one K."""
    key_a, key_b = jax.random.split(jax.random.key(seed))
    # Positive-mean operands (like post-activation inputs) make the running sum grow with K, which
    # is when a narrow accumulator loses the low bits of every new partial.
    qa, sa = quantize_rows_ref(jax.random.uniform(key_a, (M, k)))
    qb, sb = quantize_blocks_ref(jax.random.uniform(key_b, (k, N)))
    exact = np.asarray(dequantize_rows(qa, sa), np.float64) @ np.asarray(dequantize_blocks(qb, sb), np.float64)
    err = lambda got: float(np.abs(np.asarray(got, np.float64) - exact).max() / np.abs(exact).max())
    emulate = lambda **kw: err(limited_accumulation_matmul(qa, sa, qb, sb, **kw))
    return {"14-bit chopped, no promotion": emulate(promote=False, truncate=True),
            "14-bit chopped, promoted every 128": emulate(promote=True, truncate=True),
            "14-bit rounded, no promotion": emulate(promote=False),
            "14-bit rounded, promoted every 128": emulate(promote=True),
            "fp32 per 128-block (our kernels)": err(block_scaled_matmul_ref(qa, sa, qb, sb))}


def main() -> None:
    start = time.perf_counter()
    rows = {k: [errors(k, seed) for seed in SEEDS] for k in K_VALUES}
    schemes = list(rows[K_VALUES[0]][0])
    lines = ["# FP8 GEMM accumulation: a ~14-bit accumulator with and without fp32 promotion", "",
             f"Max relative error (max |error| / max |exact|) of a {M} x K x {N} product of block-quantized e4m3 "
             "operands (uniform [0, 1) inputs, 1x128 / 128x128 scales) against the float64 product of the same "
             f"e4m3 values: accumulation error only. Mean over seeds {list(SEEDS)} (min-max in brackets). "
             "Emulator: `pallas_kernels/fp8_gemm.py::limited_accumulation_matmul` (13 explicit mantissa bits, "
             "rounded after every 32 of K; 'chopped' drops the low bits, 'rounded' rounds to nearest).", "",
             "| K | " + " | ".join(schemes) + " |", "|---|" + "---|" * len(schemes)]
    for k, per_seed in rows.items():
        cells = []
        for scheme in schemes:
            values = [r[scheme] for r in per_seed]
            cells.append(f"{np.mean(values):.2e} [{min(values):.1e}-{max(values):.1e}]")
        lines.append(f"| {k:,} | " + " | ".join(cells) + " |")
    lines += ["", "Report §3.3.2: 'when K = 4096 ... the limited accumulation precision in Tensor Cores results in a "
              "maximum relative error of nearly 2%'; promotion every 128 of K (N_C = 128) is its fix. What this "
              "emulation shows: without promotion the error grows with K (about linearly when the accumulator chops, "
              "since every add loses up to an ulp in the same direction; about as sqrt(K) when it rounds, since "
              "those errors cancel), and promotion holds it at the level of one 128-deep partial, 10-90x lower at "
              "K = 4096-16384. What it does not: the magnitude. Chopping after every 32-deep instruction gives 0.3% "
              "at K = 4096, not 2%; the report does not say how the accumulator rounds, and chopping inside each "
              "instruction (per product alignment) would lose more. Our kernels add every 128-deep partial to an "
              "fp32 accumulator, so they sit at fp32 rounding (last column).",
              "", f"Command: `uv run python experiments/fp8_accumulation.py` ({time.perf_counter() - start:.0f} s on "
              f"{jax.devices()[0].platform})."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fp8_accumulation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
