"""Block-scaled FP8 GEMM with fp32 promotion every 128 of K (report §3.3.2, "increasing
accumulation precision"): out = sum_k (a_k @ b_k) * s_a[:, k] * s_b[k, n], where a_k, b_k are
the e4m3 operands' k-th 128-wide slices, each partial product is formed with fp32 accumulation,
and the scales are applied to that 128-deep partial before it joins the fp32 accumulator.

`block_scaled_matmul` is the Pallas kernel: on TPU a grid over (M, N, K) tiles with K last, an fp32
VMEM accumulator and the scales applied per 128-deep step; on GPU (Triton) one program per
(block_m x 128) output tile looping over K in steps of 128. `block_scaled_matmul_ref` is the pure-jnp reference (what the
`xla` backend runs as `dequantized_matmul`, the same sum in one fp32 GEMM). `limited_accumulation_matmul` emulates a tensor core whose accumulator keeps
only ~14 mantissa bits, with and without promotion, to show why promotion matters.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import BLOCK, compiler_params, variant
from pallas_kernels.fp8_quant import dequantize_blocks, dequantize_rows


def block_scaled_matmul_ref(a_MK: jax.Array, scale_a_MKb: jax.Array, b_KN: jax.Array, scale_b_KbNb: jax.Array,
                            out_dtype=jnp.float32) -> jax.Array:
    M, K = a_MK.shape
    N = b_KN.shape[1]
    a = a_MK.reshape(M, K // BLOCK, BLOCK)
    b = b_KN.reshape(K // BLOCK, BLOCK, N)
    partial_kMN = jnp.einsum("mkc,kcn->kmn", a, b, preferred_element_type=jnp.float32)  # per-K-block fp32
    scale_kMN = scale_a_MKb.T[:, :, None] * jnp.repeat(scale_b_KbNb, BLOCK, axis=1)[:, None, :]
    return jnp.sum(partial_kMN * scale_kMN, axis=0).astype(out_dtype)


def dequantized_matmul(a_MK: jax.Array, scale_a_MKb: jax.Array, b_KN: jax.Array, scale_b_KbNb: jax.Array,
                       out_dtype=jnp.float32) -> jax.Array:
    """The same sum as one fp32 GEMM over the dequantized operands (what the `xla` backend trains
    with): e4m3 values times their scales are exact to fp32 rounding, and accumulating all of K in
    fp32 is what per-128 promotion buys on a tensor core. Equals `block_scaled_matmul_ref` within
    fp32 rounding (tested) and runs ~7x faster on XLA:CPU, which has no (K/128, M, N) partials to sum."""
    a = dequantize_rows(a_MK, scale_a_MKb)
    b = dequantize_blocks(b_KN, scale_b_KbNb)
    return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(out_dtype)


def _gemm_loop_kernel(a_ref, sa_ref, b_ref, sb_ref, o_ref, *, n_kblocks):
    """GPU (Triton) variant: one program per (block_m x 128) output tile, looping over K."""
    def body(k, acc):
        a = a_ref[:, pl.ds(k * BLOCK, BLOCK)]
        b = b_ref[pl.ds(k * BLOCK, BLOCK), :]
        partial = jnp.dot(a, b, preferred_element_type=jnp.float32)  # fp8 x fp8 -> fp32 (wgmma on Hopper)
        sa = sa_ref[:, pl.ds(k, 1)]  # [bm, 1]
        sb = sb_ref[pl.ds(k, 1), :]  # [1, 1]: this output tile's 128 columns share one weight block
        return acc + partial * sa * sb  # promotion: the scaled partial joins the fp32 accumulator

    acc = jax.lax.fori_loop(0, n_kblocks, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def tile_scale_column(sa_ref, k) -> jax.Array:
    """Column k of a [bm, K/128] block of tile scales, as [bm, 1]: a masked lane sum, since Mosaic
    slices lanes only at static offsets (and the block holds all of K/128 to meet the (8, 128) rule)."""
    sa = sa_ref[...]
    lane = jax.lax.broadcasted_iota(jnp.int32, sa.shape, 1)
    return jnp.sum(jnp.where(lane == k, sa, 0.0), axis=1, keepdims=True)


def block_scale_row(sb_ref, index, n_col_blocks: int) -> jax.Array:
    """[1, 128 * n_col_blocks]: each 128-column block's weight scale sb_ref[*index, c] (from SMEM)."""
    *lead, first = index
    cols = [jnp.full((1, BLOCK), sb_ref[(*lead, first + c)], jnp.float32) for c in range(n_col_blocks)]
    return cols[0] if n_col_blocks == 1 else jnp.concatenate(cols, axis=1)


def promote(acc_ref, a, b, sa_col, sb_row, k, o_ref) -> None:
    """One 128-deep step of the TPU variant: the fp32 partial a @ b, scaled by its tiles' scales,
    joins the fp32 VMEM accumulator (report §3.3.2: promotion every N_C = 128); the last K step
    writes the tile. e4m3 tiles enter the MXU as bf16 (exact: e4m3 values are bf16 values), as
    TPUs before v7 have no FP8 matrix unit."""
    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    partial = jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    acc_ref[...] += partial * sa_col * sb_row

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _gemm_grid_kernel(a_ref, sa_ref, b_ref, sb_ref, o_ref, acc_ref, *, n_col_blocks):
    """TPU (Mosaic) variant: grid (M / bm, N / bn, K / 128), K last and sequential."""
    j, k = pl.program_id(1), pl.program_id(2)
    promote(acc_ref, a_ref[...], b_ref[...], tile_scale_column(sa_ref, k),
            block_scale_row(sb_ref, (k, j * n_col_blocks), n_col_blocks), k, o_ref)


def gemm_block_n(N: int, block_n: int) -> int:
    """The widest multiple of 128 up to block_n that divides N."""
    block_n = min(block_n, N)
    while N % block_n:
        block_n -= BLOCK
    return block_n


@functools.partial(jax.jit, static_argnames=("out_dtype", "platform", "interpret", "block_m", "block_n"))
def block_scaled_matmul(a_MK, scale_a_MKb, b_KN, scale_b_KbNb, out_dtype=jnp.float32, platform: str = "cpu",
                        interpret: bool | None = None, block_m: int = 128, block_n: int = 256):
    """a @ b of e4m3 operands with 1x128 / 128x128 scales, fp32 promotion every 128 of K.
    M need not be a multiple of block_m (the last row block is partial); K and N are multiples of 128."""
    M, K = a_MK.shape
    N = b_KN.shape[1]
    if K % BLOCK or N % BLOCK:
        raise ValueError(f"block_scaled_matmul needs K={K} and N={N} to be multiples of {BLOCK}")
    kind, interpret = variant(platform, interpret)
    block_m = min(block_m, M)
    if kind == "gpu":
        return pl.pallas_call(
            functools.partial(_gemm_loop_kernel, n_kblocks=K // BLOCK),
            out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
            grid=(pl.cdiv(M, block_m), N // BLOCK),
            in_specs=[pl.BlockSpec((block_m, K), lambda i, j: (i, 0)),
                      pl.BlockSpec((block_m, K // BLOCK), lambda i, j: (i, 0)),
                      pl.BlockSpec((K, BLOCK), lambda i, j: (0, j)),
                      pl.BlockSpec((K // BLOCK, 1), lambda i, j: (0, j))],
            out_specs=pl.BlockSpec((block_m, BLOCK), lambda i, j: (i, j)),
            compiler_params=compiler_params(kind), interpret=interpret,
        )(a_MK, scale_a_MKb, b_KN, scale_b_KbNb)
    from jax.experimental.pallas import tpu as pltpu

    block_n = gemm_block_n(N, block_n)
    return pl.pallas_call(
        functools.partial(_gemm_grid_kernel, n_col_blocks=block_n // BLOCK),
        out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
        grid=(pl.cdiv(M, block_m), N // block_n, K // BLOCK),
        in_specs=[pl.BlockSpec((block_m, BLOCK), lambda i, j, k: (i, k)),
                  pl.BlockSpec((block_m, K // BLOCK), lambda i, j, k: (i, 0)),  # all of K/128: fetched once per i
                  pl.BlockSpec((BLOCK, block_n), lambda i, j, k: (k, j)),
                  pl.BlockSpec(memory_space=pltpu.SMEM)],  # weight-block scalars
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.float32)],
        compiler_params=compiler_params(kind, "parallel", "parallel", "arbitrary"), interpret=interpret,
    )(a_MK, scale_a_MKb, b_KN, scale_b_KbNb)


def _round_mantissa(x: jax.Array, bits: int, truncate: bool) -> jax.Array:
    """Keep `bits` explicit mantissa bits of fp32: a narrower accumulator. `truncate` chops the
    rest (round toward zero: every add loses about half a unit in the last place, in the same
    direction, so the error grows linearly in K); otherwise round to nearest."""
    drop = 23 - bits
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    if not truncate:
        u = u + jnp.uint32(1 << (drop - 1))
    u = u & jnp.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
    return jax.lax.bitcast_convert_type(u, jnp.float32)


def limited_accumulation_matmul(a_MK, scale_a_MKb, b_KN, scale_b_KbNb, promote: bool, mantissa_bits: int = 13,
                                instruction_k: int = 32, truncate: bool = False) -> jax.Array:
    """Emulate an accumulator with ~14 bits of precision (report §3.3.2 on H800 tensor cores):
    every `instruction_k` of K the running sum is rounded to `mantissa_bits`. With `promote`, the
    running sum restarts every 128 of K and is added to an fp32 accumulator (the report's fix);
    without, one low-precision sum runs across all of K. `truncate` chops instead of rounding
    (experiments/fp8_accumulation.py compares both with the report's figure)."""
    M, K = a_MK.shape
    a = a_MK.astype(jnp.float32) * jnp.repeat(scale_a_MKb, BLOCK, axis=1)
    b = b_KN.astype(jnp.float32) * jnp.repeat(jnp.repeat(scale_b_KbNb, BLOCK, axis=0), BLOCK, axis=1)
    chunks = K // instruction_k
    a_c = a.reshape(M, chunks, instruction_k).transpose(1, 0, 2)
    b_c = b.reshape(chunks, instruction_k, -1)
    per_block = BLOCK // instruction_k

    def step(carry, inputs):
        low, high = carry
        i, a_i, b_i = inputs
        low = _round_mantissa(low + a_i @ b_i, mantissa_bits, truncate)
        if promote:
            flush = (i + 1) % per_block == 0
            high = jnp.where(flush, high + low, high)
            low = jnp.where(flush, 0.0, low)
        return (low, high), None

    zeros = jnp.zeros((M, b_KN.shape[1]), jnp.float32)
    (low, high), _ = jax.lax.scan(step, (zeros, zeros), (jnp.arange(chunks), a_c, b_c))
    return high + low
