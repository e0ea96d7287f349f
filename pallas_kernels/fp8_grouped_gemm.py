"""Grouped block-scaled FP8 GEMM for routed experts (report §3.3 applied to DeepSeekMoE).

Rows of `a` come in the padded block layout of `dsv3_jax/model/grouped_gemm.py`: sorted by expert,
each expert's rows padded to a multiple of 128, so every 128-row block belongs to one expert
(`expert_B`). Each output tile looks up its block's expert and runs the same promoted K steps as `fp8_gemm`,
reading only that expert's weight tiles: on TPU the expert ids are scalar-prefetched into SMEM and
chosen in the weight BlockSpec's index map; on GPU each program reads its block's id.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import BLOCK, compiler_params, variant
from pallas_kernels.fp8_gemm import (block_scale_row, block_scaled_matmul_ref, gemm_block_n, promote,
                                     tile_scale_column)


def grouped_block_scaled_matmul_ref(a_PK, scale_a_PKb, b_EKN, scale_b_EKbNb, expert_B, out_dtype=jnp.float32):
    """Reference: each 128-row block through the dense block-scaled reference with its expert's weight."""
    blocks = lambda x: x.reshape(expert_B.shape[0], BLOCK, x.shape[1])
    out_BRN = jax.vmap(lambda a, sa, e: block_scaled_matmul_ref(a, sa, b_EKN[e], scale_b_EKbNb[e]))(
        blocks(a_PK), blocks(scale_a_PKb), expert_B)
    return out_BRN.reshape(a_PK.shape[0], -1).astype(out_dtype)


def _grouped_loop_kernel(expert_ref, a_ref, sa_ref, b_ref, sb_ref, o_ref, *, n_kblocks):
    """GPU (Triton) variant: one program per (128-row block, 128 columns), looping over K."""
    e = expert_ref[0]

    def body(k, acc):
        a = a_ref[:, pl.ds(k * BLOCK, BLOCK)]
        b = b_ref[e, pl.ds(k * BLOCK, BLOCK), :]
        partial = jnp.dot(a, b, preferred_element_type=jnp.float32)
        return acc + partial * sa_ref[:, pl.ds(k, 1)] * sb_ref[e, pl.ds(k, 1), :]

    o_ref[...] = jax.lax.fori_loop(0, n_kblocks, body, jnp.zeros(o_ref.shape, jnp.float32)).astype(o_ref.dtype)


def _grouped_grid_kernel(expert_ref, used_ref, a_ref, sa_ref, b_ref, sb_ref, o_ref, acc_ref, *, n_col_blocks):
    """TPU (Mosaic) variant: grid (blocks, N / bn, K / 128); the block's expert (scalar-prefetched)
    picks the weight tile in the index map. Padding-only blocks (i >= used) compute nothing."""
    i, j, k = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(i < used_ref[0])
    def _():
        promote(acc_ref, a_ref[...], b_ref[...], tile_scale_column(sa_ref, k),
                block_scale_row(sb_ref, (0, k * n_col_blocks), n_col_blocks), k, o_ref)

    @pl.when((i >= used_ref[0]) & (k == pl.num_programs(2) - 1))
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "platform", "interpret", "block_n"))
def grouped_block_scaled_matmul(a_PK, scale_a_PKb, b_EKN, scale_b_EKbNb, expert_B, used_blocks=None,
                                out_dtype=jnp.float32, platform: str = "cpu", interpret: bool | None = None,
                                block_n: int = 256):
    """Every 128-row block b of a times its expert's weight b[expert_B[b]], one launch for all
    blocks. `used_blocks` (a scalar, default all): blocks from there on hold only padding and give
    zeros without being computed."""
    P, K = a_PK.shape
    E, _, N = b_EKN.shape
    B = expert_B.shape[0]
    if P != B * BLOCK or K % BLOCK or N % BLOCK:
        raise ValueError(f"grouped_block_scaled_matmul needs {B} blocks of {BLOCK} rows (got {P} rows) "
                         f"and K={K}, N={N} multiples of {BLOCK}")
    kind, interpret = variant(platform, interpret)
    expert_B = expert_B.astype(jnp.int32)
    if kind == "gpu":
        return pl.pallas_call(
            functools.partial(_grouped_loop_kernel, n_kblocks=K // BLOCK),
            out_shape=jax.ShapeDtypeStruct((P, N), out_dtype),
            grid=(B, N // BLOCK),
            in_specs=[pl.BlockSpec((1,), lambda i, j: (i,)),
                      pl.BlockSpec((BLOCK, K), lambda i, j: (i, 0)),
                      pl.BlockSpec((BLOCK, K // BLOCK), lambda i, j: (i, 0)),
                      pl.BlockSpec((E, K, BLOCK), lambda i, j: (0, 0, j)),
                      pl.BlockSpec((E, K // BLOCK, 1), lambda i, j: (0, 0, j))],
            out_specs=pl.BlockSpec((BLOCK, BLOCK), lambda i, j: (i, j)),
            compiler_params=compiler_params(kind), interpret=interpret,
        )(expert_B, a_PK, scale_a_PKb, b_EKN, scale_b_EKbNb)
    from jax.experimental.pallas import tpu as pltpu

    used = jnp.full((1,), B if used_blocks is None else used_blocks, jnp.int32)
    block_n = gemm_block_n(N, block_n)
    n_col_blocks = block_n // BLOCK
    # [E, K/128, N/128] -> [E, N/bn, 1, K/128 * bn/128]: row (e, j) holds the scales one N tile of
    # expert e needs, K step by K step.
    scale_b_EJ1S = scale_b_EKbNb.reshape(E, K // BLOCK, N // block_n, n_col_blocks).transpose(0, 2, 1, 3).reshape(
        E, N // block_n, 1, (K // BLOCK) * n_col_blocks)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,  # expert_B and used: in SMEM before the grid runs, read by the index maps
        grid=(B, N // block_n, K // BLOCK),
        in_specs=[pl.BlockSpec((BLOCK, BLOCK), lambda i, j, k, e, u: (i, k)),
                  pl.BlockSpec((BLOCK, K // BLOCK), lambda i, j, k, e, u: (i, 0)),
                  pl.BlockSpec((None, BLOCK, block_n), lambda i, j, k, e, u: (e[i], k, j)),
                  # Only this block's expert and N tile of the weight scales (K/128 x bn/128 scalars,
                  # one row: the (8, 128) rule holds for SMEM blocks too), not every expert's: 8
                  # experts at N 18432 would put 258 KB of scales in SMEM.
                  pl.BlockSpec((None, None, 1, (K // BLOCK) * n_col_blocks), lambda i, j, k, e, u: (e[i], j, 0, 0),
                               memory_space=pltpu.SMEM)],
        out_specs=pl.BlockSpec((BLOCK, block_n), lambda i, j, k, e, u: (i, j)),
        scratch_shapes=[pltpu.VMEM((BLOCK, block_n), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_grouped_grid_kernel, n_col_blocks=n_col_blocks),
        out_shape=jax.ShapeDtypeStruct((P, N), out_dtype), grid_spec=grid_spec,
        compiler_params=compiler_params(kind, "parallel", "parallel", "arbitrary"), interpret=interpret,
    )(expert_B, used, a_PK, scale_a_PKb, b_EKN, scale_b_EJ1S)
