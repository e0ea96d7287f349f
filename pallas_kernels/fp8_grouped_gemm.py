"""Grouped block-scaled FP8 GEMM for routed experts (report §3.3 applied to DeepSeekMoE).

Rows of `a` are sorted by expert (`group_sizes[e]` rows for expert e, as `jax.lax.ragged_dot`
takes them). Each group is padded to a multiple of 128 rows so that every 128-row block belongs to
one expert; one program per (128-row block, 128 output columns) looks up its block's expert and
runs the same promoted K loop as `fp8_gemm`, reading only that expert's weight slab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import BLOCK
from pallas_kernels.fp8_gemm import block_scaled_matmul_ref


def grouped_block_scaled_matmul_ref(a_MK, scale_a_MKb, b_EKN, scale_b_EKbNb, group_sizes_E, out_dtype=jnp.float32):
    """Reference: each expert's rows through the dense block-scaled reference, masked and summed."""
    ends = jnp.cumsum(group_sizes_E)
    starts = ends - group_sizes_E
    rows = jnp.arange(a_MK.shape[0])[:, None]
    out = jnp.zeros((a_MK.shape[0], b_EKN.shape[2]), jnp.float32)
    for e in range(b_EKN.shape[0]):
        mine = (rows >= starts[e]) & (rows < ends[e])
        out = out + jnp.where(mine, block_scaled_matmul_ref(a_MK, scale_a_MKb, b_EKN[e], scale_b_EKbNb[e]), 0.0)
    return out.astype(out_dtype)


def _grouped_kernel(expert_ref, a_ref, sa_ref, b_ref, sb_ref, o_ref, *, n_kblocks):
    e = expert_ref[0]

    def body(k, acc):
        a = a_ref[:, pl.ds(k * BLOCK, BLOCK)]
        b = b_ref[e, pl.ds(k * BLOCK, BLOCK), :]
        partial = jnp.dot(a, b, preferred_element_type=jnp.float32)
        return acc + partial * sa_ref[:, pl.ds(k, 1)] * sb_ref[e, pl.ds(k, 1), :]

    o_ref[...] = jax.lax.fori_loop(0, n_kblocks, body, jnp.zeros(o_ref.shape, jnp.float32)).astype(o_ref.dtype)


def padded_layout(group_sizes_E: jax.Array, n_rows: int) -> tuple[jax.Array, jax.Array, int]:
    """Where each sorted row goes when every group is padded to a multiple of 128 rows, and the
    expert of every 128-row block. The padded length is static: n_rows + E * 127, rounded up."""
    E = group_sizes_E.shape[0]
    padded_sizes = (group_sizes_E + BLOCK - 1) // BLOCK * BLOCK
    padded_starts = jnp.cumsum(padded_sizes) - padded_sizes
    starts = jnp.cumsum(group_sizes_E) - group_sizes_E
    row_expert = jnp.searchsorted(jnp.cumsum(group_sizes_E), jnp.arange(n_rows), side="right")
    row_expert = jnp.minimum(row_expert, E - 1)
    destination = padded_starts[row_expert] + jnp.arange(n_rows) - starts[row_expert]
    total = -(-(n_rows + E * (BLOCK - 1)) // BLOCK) * BLOCK
    block_starts = jnp.arange(total // BLOCK) * BLOCK
    block_expert = jnp.searchsorted(jnp.cumsum(padded_sizes), block_starts, side="right")
    return destination, jnp.minimum(block_expert, E - 1).astype(jnp.int32), total


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret"))
def grouped_block_scaled_matmul(a_MK, scale_a_MKb, b_EKN, scale_b_EKbNb, group_sizes_E, out_dtype=jnp.float32,
                                interpret: bool = True):
    M, K = a_MK.shape
    E, _, N = b_EKN.shape
    if K % BLOCK or N % BLOCK:
        raise ValueError(f"grouped_block_scaled_matmul needs K={K} and N={N} to be multiples of {BLOCK}")
    destination, block_expert, total = padded_layout(group_sizes_E, M)
    a_pad = jnp.zeros((total, K), a_MK.dtype).at[destination].set(a_MK)
    sa_pad = jnp.ones((total, K // BLOCK), jnp.float32).at[destination].set(scale_a_MKb)
    out_pad = pl.pallas_call(
        functools.partial(_grouped_kernel, n_kblocks=K // BLOCK),
        out_shape=jax.ShapeDtypeStruct((total, N), out_dtype),
        grid=(total // BLOCK, N // BLOCK),
        in_specs=[pl.BlockSpec((1,), lambda i, j: (i,)),
                  pl.BlockSpec((BLOCK, K), lambda i, j: (i, 0)),
                  pl.BlockSpec((BLOCK, K // BLOCK), lambda i, j: (i, 0)),
                  pl.BlockSpec((E, K, BLOCK), lambda i, j: (0, 0, j)),
                  pl.BlockSpec((E, K // BLOCK, 1), lambda i, j: (0, 0, j))],
        out_specs=pl.BlockSpec((BLOCK, BLOCK), lambda i, j: (i, j)),
        interpret=interpret,
    )(block_expert, a_pad, sa_pad, b_EKN, scale_b_EKbNb)
    return out_pad[destination]
