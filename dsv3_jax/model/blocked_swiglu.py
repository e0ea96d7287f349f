"""The routed experts' SwiGLU on the 128-row block layout, fused into one loop over blocks.

    y_b = (g_b * silu(x_b W_gate[e_b]) * (x_b W_up[e_b])) W_down[e_b]    for each 128-row block b of expert e_b

g_b holds the rows' gates (eq. 12's g_i,t), folded in before the down projection: the combine is
then a plain sum, and the gates' gradient, sum_F(dh' * h), comes from the SwiGLU this backward
recomputes anyway. Gating the output instead would keep each row's [D] expert output for it.

Three grouped GEMMs (`grouped_gemm.py`) would each lay the rows out in blocks and loop over them,
and their backward passes would loop six times more. Here the forward is one loop over the used
blocks (`over_used_blocks`), keeping each block's gate and up products for the backward, and the
backward is one more loop: per block the six GEMMs (Dgrad and Wgrad of all three, the weight
gradients added into the block's expert). On the `tiny` preset's train step the routed experts'
fwd + bwd fell from 30.6 to 21.4 ms on XLA:CPU (experiments/results/bench_vs_hf.md).

Rows past sum(group_sizes) (expert-parallel receive buffers end in them) land in blocks after
the used ones: they give zeros and get zero gradients, as with `jax.lax.ragged_dot`.
`fp8_backend` ("xla") makes every per-block GEMM the block-scaled e4m3 GEMM of report §3.3.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from dsv3_jax.config import Fp8Backend
from dsv3_jax.model.grouped_gemm import block_gemm, block_layout, from_blocks, over_used_blocks, to_blocks
from dsv3_jax.model.remat import name
from dsv3_jax.quant.fp8 import cache_rows, uncache_rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def blocked_swiglu(x_MD: Float[Array, "M D"], group_sizes_E: Int[Array, "E"], gate_M: Float[Array, "M"],
                   w_gate_EDF: Array, w_up_EDF: Array, w_down_EFD: Array, fp8_backend: Fp8Backend | None = None,
                   cached_dtype=None) -> Float[Array, "M D"]:
    """Gated SwiGLU of rows sorted by expert (rows [sum(g[:e]), sum(g[:e+1])) use expert e); fp32
    gates in, fp32 out. `cached_dtype` (x's dtype, with `fp8_backend`): the backward's input rows and
    SwiGLU inputs kept as e4m3 1x128 tiles with their scales (report §3.3.4)."""
    return _forward(x_MD, group_sizes_E, gate_M, w_gate_EDF, w_up_EDF, w_down_EFD, fp8_backend, cached_dtype)[0]


def _forward(x_MD, group_sizes_E, gate_M, w_gate_EDF, w_up_EDF, w_down_EFD, fp8_backend, cached_dtype):
    gemm = block_gemm(fp8_backend)
    layout = block_layout(group_sizes_E, x_MD.shape[0])
    x_BRD = to_blocks(x_MD, layout)
    g_BR1 = to_blocks(gate_M[:, None], layout)
    n_blocks, rows, D = x_BRD.shape
    F = w_gate_EDF.shape[2]

    def block(b, e, carry):
        y_BRD, gate_BRF, up_BRF = carry
        x_RD = x_BRD[b]
        gate_RF, up_RF = gemm(x_RD, w_gate_EDF[e]), gemm(x_RD, w_up_EDF[e])
        y_RD = gemm((g_BR1[b] * jax.nn.silu(gate_RF) * up_RF).astype(x_MD.dtype), w_down_EFD[e])
        return y_BRD.at[b].set(y_RD), gate_BRF.at[b].set(gate_RF), up_BRF.at[b].set(up_RF)

    zeros = lambda *shape: jnp.zeros(shape, jnp.float32)
    y_BRD, gate_BRF, up_BRF = over_used_blocks(layout, block, (zeros(n_blocks, rows, D), zeros(n_blocks, rows, F),
                                                               zeros(n_blocks, rows, F)))
    # The SwiGLU's inputs, named so a remat policy can keep them (model/remat.py) and recompute the
    # SwiGLU alone in the backward (§3.3.4), not this whole forward loop.
    kept = (x_BRD, gate_BRF, up_BRF)
    if cached_dtype is not None:
        kept = tuple(cache_rows(a) for a in kept)
    kept = tuple(jax.tree.map(lambda a: name(a, n), k) for k, n in zip(kept, ("expert_in", "swiglu_in", "swiglu_in")))
    return from_blocks(y_BRD, layout), (kept, g_BR1, w_gate_EDF, w_up_EDF, w_down_EFD, layout)


def _bwd(fp8_backend, cached_dtype, residuals, dy_MD):
    kept, g_BR1, w_gate_EDF, w_up_EDF, w_down_EFD, layout = residuals
    if cached_dtype is not None:
        D, F = w_down_EFD.shape[2], w_down_EFD.shape[1]
        x_BRD, gate_BRF, up_BRF = (uncache_rows(k, n) for k, n in zip(kept, (D, F, F)))
        x_BRD = x_BRD.astype(cached_dtype)
    else:
        x_BRD, gate_BRF, up_BRF = kept
    dtype = x_BRD.dtype  # plain GEMMs take their operands in the forward's dtype
    gemm = block_gemm(fp8_backend)
    dy_BRD = to_blocks(dy_MD.astype(dtype) if fp8_backend is None else dy_MD, layout)
    # Every per-block GEMM as [R, K] x [K, N], its operands transposed once outside the loop: a
    # transposed operand inside it made XLA:CPU fall back from its fast small-GEMM kernels (YNNPACK)
    # to Eigen (tiny: backward loop 5.1 -> 3.5 ms per layer).
    swap = lambda a: jnp.swapaxes(a, 1, 2)
    w_gate_EFD, w_up_EFD, w_down_EDF, x_BDR = swap(w_gate_EDF), swap(w_up_EDF), swap(w_down_EFD), swap(x_BRD)
    # The down projection's Wgrad is formed transposed, dy^T h; FP8 keeps h^T dy, whose operands it
    # quantizes in the tiles of report §3.3 (1x128 for the first, 128x128 for the second).
    dy_BDR = swap(dy_BRD) if fp8_backend is None else None

    def block(b, e, carry):
        dx_BRD, dg_BR1, dw_gate_EDF, dw_up_EDF, dw_down = carry
        dy_RD, g_R1 = dy_BRD[b], g_BR1[b]
        gate_RF, up_RF = gate_BRF[b], up_BRF[b]
        sigmoid_RF = jax.nn.sigmoid(gate_RF)
        silu_RF = gate_RF * sigmoid_RF
        h_RF = silu_RF * up_RF  # ungated
        gated_h_RF = (g_R1 * h_RF).astype(dtype)
        dgated_h_RF = gemm(dy_RD, w_down_EDF[e])
        dg_R1 = jnp.sum(dgated_h_RF * h_RF, axis=1, keepdims=True)
        dh_RF = g_R1 * dgated_h_RF
        dgate_RF = (dh_RF * up_RF * sigmoid_RF * (1.0 + gate_RF * (1.0 - sigmoid_RF))).astype(dtype)
        dup_RF = (dh_RF * silu_RF).astype(dtype)
        dx_RD = gemm(dgate_RF, w_gate_EFD[e]) + gemm(dup_RF, w_up_EFD[e])
        dw_down_block = gemm(dy_BDR[b], gated_h_RF) if fp8_backend is None else gemm(gated_h_RF.T, dy_RD)
        return (dx_BRD.at[b].set(dx_RD.astype(dtype)), dg_BR1.at[b].set(dg_R1),
                dw_gate_EDF.at[e].add(gemm(x_BDR[b], dgate_RF)),
                dw_up_EDF.at[e].add(gemm(x_BDR[b], dup_RF)),
                dw_down.at[e].add(dw_down_block))

    zeros = lambda w: jnp.zeros(w.shape, jnp.float32)
    dx_BRD, dg_BR1, dw_gate, dw_up, dw_down = over_used_blocks(
        layout, block, (jnp.zeros(x_BRD.shape, dtype), zeros(g_BR1), zeros(w_gate_EDF), zeros(w_up_EDF),
                        zeros(w_down_EDF if fp8_backend is None else w_down_EFD)))
    dw_down_EFD = swap(dw_down) if fp8_backend is None else dw_down
    return (from_blocks(dx_BRD, layout), None, from_blocks(dg_BR1, layout)[:, 0],
            dw_gate.astype(w_gate_EDF.dtype), dw_up.astype(w_up_EDF.dtype), dw_down_EFD.astype(w_down_EFD.dtype))


blocked_swiglu.defvjp(_forward, _bwd)
