"""Grouped block-scaled FP8 GEMM for routed experts (report §3.3 applied to DeepSeekMoE).

Rows of `a` come in the padded block layout of `dsv3_jax/model/grouped_gemm.py`: sorted by expert,
each expert's rows padded to a multiple of 128, so every 128-row block belongs to one expert
(`expert_B`). One program per (128-row block, 128 output columns) looks up its block's expert and
runs the same promoted K loop as `fp8_gemm`, reading only that expert's weight columns.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import BLOCK
from pallas_kernels.fp8_gemm import block_scaled_matmul_ref


def grouped_block_scaled_matmul_ref(a_PK, scale_a_PKb, b_EKN, scale_b_EKbNb, expert_B, out_dtype=jnp.float32):
    """Reference: each 128-row block through the dense block-scaled reference with its expert's weight."""
    blocks = lambda x: x.reshape(expert_B.shape[0], BLOCK, x.shape[1])
    out_BRN = jax.vmap(lambda a, sa, e: block_scaled_matmul_ref(a, sa, b_EKN[e], scale_b_EKbNb[e]))(
        blocks(a_PK), blocks(scale_a_PKb), expert_B)
    return out_BRN.reshape(a_PK.shape[0], -1).astype(out_dtype)


def _grouped_kernel(expert_ref, a_ref, sa_ref, b_ref, sb_ref, o_ref, *, n_kblocks):
    e = expert_ref[0]

    def body(k, acc):
        a = a_ref[:, pl.ds(k * BLOCK, BLOCK)]
        b = b_ref[e, pl.ds(k * BLOCK, BLOCK), :]
        partial = jnp.dot(a, b, preferred_element_type=jnp.float32)
        return acc + partial * sa_ref[:, pl.ds(k, 1)] * sb_ref[e, pl.ds(k, 1), :]

    o_ref[...] = jax.lax.fori_loop(0, n_kblocks, body, jnp.zeros(o_ref.shape, jnp.float32)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret"))
def grouped_block_scaled_matmul(a_PK, scale_a_PKb, b_EKN, scale_b_EKbNb, expert_B, out_dtype=jnp.float32,
                                interpret: bool = True):
    P, K = a_PK.shape
    E, _, N = b_EKN.shape
    if P != expert_B.shape[0] * BLOCK or K % BLOCK or N % BLOCK:
        raise ValueError(f"grouped_block_scaled_matmul needs {expert_B.shape[0]} blocks of {BLOCK} rows (got {P} rows) "
                         f"and K={K}, N={N} multiples of {BLOCK}")
    return pl.pallas_call(
        functools.partial(_grouped_kernel, n_kblocks=K // BLOCK),
        out_shape=jax.ShapeDtypeStruct((P, N), out_dtype),
        grid=(P // BLOCK, N // BLOCK),
        in_specs=[pl.BlockSpec((1,), lambda i, j: (i,)),
                  pl.BlockSpec((BLOCK, K), lambda i, j: (i, 0)),
                  pl.BlockSpec((BLOCK, K // BLOCK), lambda i, j: (i, 0)),
                  pl.BlockSpec((E, K, BLOCK), lambda i, j: (0, 0, j)),
                  pl.BlockSpec((E, K // BLOCK, 1), lambda i, j: (0, 0, j))],
        out_specs=pl.BlockSpec((BLOCK, BLOCK), lambda i, j: (i, j)),
        interpret=interpret,
    )(expert_B, a_PK, scale_a_PKb, b_EKN, scale_b_EKbNb)
