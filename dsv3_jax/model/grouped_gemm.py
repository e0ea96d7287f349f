"""Grouped GEMM for routed experts: rows sorted by expert, one weight matrix per expert.

    y[rows of expert e] = x[rows of expert e] @ w[e]        (what `jax.lax.ragged_dot` computes)

Two implementations (`impl`):
- "ragged_dot": XLA's primitive. XLA:TPU lowers it to its grouped (ragged-dot) kernels; XLA:CPU
  and, in jaxlib 0.10.2, XLA:GPU lower it densely: every row against every expert, then a mask,
  so E times the FLOPs and an [E, M, N] fp32 intermediate per GEMM (on `small`, data=2,expert=4,
  compiled for 8 H100s: 64 MiB buffers of f32[4, 8192, 512], 2.18 GiB of temporaries against
  1.20 GiB blocked; experiments/results/plan_vs_compiler.md).
- "blocked": every expert's rows are padded to a multiple of 128, so each 128-row block belongs
  to one expert; a loop over the used blocks (`over_used_blocks`) runs one (128 x K) @ (K x N) GEMM
  per block against its expert's weight (the padding-only blocks at the end are never visited).
  On CPU it is 11x faster than the dense lowering at the `small` preset's expert shapes, 3.6x at
  `tiny`'s (experiments/results/grouped_gemm_cpu.md).
"auto" is "ragged_dot" for TPU and "blocked" for CPU and GPU: the platform of the mesh in context
(`dsv3_jax/platform.py`), so a step compiled for a TPU target from a CPU host gets "ragged_dot".

The block layout is also what the FP8 recipe needs for experts (report §3.3): Wgrad quantizes
x^T in 1x128 tiles along tokens, and with 128-row blocks no tile straddles two experts.
`fp8_backend` picks the per-block GEMM: None (operands as given, fp32 accumulation) or a
block-scaled e4m3 GEMM for Fprop, Dgrad and Wgrad on that backend (`dsv3_jax/quant/fp8.py`).
"""

from __future__ import annotations

import functools
import typing
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from dsv3_jax.config import Fp8Backend, GroupedGemmImpl
from dsv3_jax.platform import current_platform
from dsv3_jax.quant.fp8 import cache_rows, fp8_gemm, fp8_grouped_pallas, uncache_rows

ROWS = 128  # rows per block: the FP8 tile length along tokens (report §3.3)
IMPLS: tuple[str, ...] = typing.get_args(GroupedGemmImpl)


class BlockLayout(NamedTuple):
    destination_M: Int[Array, "M"]  # padded row of each sorted row
    expert_B: Int[Array, "B"]  # the expert owning each 128-row block
    used_blocks: Int[Array, ""]  # blocks [used_blocks, B) hold only padding


def block_layout(group_sizes_E: Int[Array, "E"], n_rows: int) -> BlockLayout:
    """Pad each expert's rows to a multiple of ROWS. Rows past sum(group_sizes) (as `ragged_dot`
    allows: they give zeros) land in blocks after the used ones. The block count is a static
    bound: sum_e ceil(g_e / 128) blocks hold at most M + E * 127 rows."""
    E = group_sizes_E.shape[0]
    blocks_E = (group_sizes_E + ROWS - 1) // ROWS
    block_end_E = jnp.cumsum(blocks_E)
    used_blocks = block_end_E[-1]
    # One more "group" for the rows past the end, starting right after the used blocks.
    row_end_G = jnp.cumsum(jnp.append(group_sizes_E, n_rows))
    slot_start_G = jnp.append(block_end_E - blocks_E, used_blocks) * ROWS
    rows_M = jnp.arange(n_rows)
    group_M = jnp.searchsorted(row_end_G, rows_M, side="right")
    destination_M = slot_start_G[group_M] + rows_M - (row_end_G - jnp.append(group_sizes_E, n_rows))[group_M]
    n_blocks = -(-(n_rows + E * (ROWS - 1)) // ROWS)
    expert_B = jnp.minimum(jnp.searchsorted(block_end_E, jnp.arange(n_blocks), side="right"), E - 1)
    return BlockLayout(destination_M, expert_B.astype(jnp.int32), used_blocks)


def to_blocks(x_MK: Array, layout: BlockLayout) -> Array:
    n_blocks = layout.expert_B.shape[0]
    padded = jnp.zeros((n_blocks * ROWS, x_MK.shape[1]), x_MK.dtype)
    return padded.at[layout.destination_M].set(x_MK, unique_indices=True).reshape(n_blocks, ROWS, -1)


def from_blocks(y_BRN: Array, layout: BlockLayout) -> Array:
    return y_BRN.reshape(-1, y_BRN.shape[-1])[layout.destination_M]


def block_gemm(fp8_backend: Fp8Backend | None):
    """(a [R, K], b [K, N]) -> fp32 [R, N]."""
    if fp8_backend is None:
        return lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)
    return lambda a, b: fp8_gemm(a, b, fp8_backend)


def over_used_blocks(layout: BlockLayout, body, init):
    """`init` carried through body(b, expert_b, carry) for the used blocks b = 0 .. used_blocks - 1:
    a while loop whose trip count is the used-block count, so the padding-only blocks at the end
    cost nothing and no block needs a branch."""
    return jax.lax.fori_loop(0, layout.used_blocks, lambda b, carry: body(b, layout.expert_B[b], carry), init)


def _per_expert(x_BRK: Array, w_EKN: Array, layout: BlockLayout, fp8_backend: Fp8Backend | None
                ) -> Float[Array, "B R N"]:
    """y_b = x_b @ w[expert_b] (zeros for padding-only blocks); FP8 on "pallas": one grouped kernel
    launch for all blocks."""
    if fp8_backend == "pallas":
        return fp8_grouped_pallas(x_BRK, w_EKN, layout.expert_B, layout.used_blocks)
    gemm = block_gemm(fp8_backend)
    y_BRN = jnp.zeros(x_BRK.shape[:2] + w_EKN.shape[2:], jnp.float32)
    return over_used_blocks(layout, lambda b, e, y_BRN: y_BRN.at[b].set(gemm(x_BRK[b], w_EKN[e])), y_BRN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def blocked_matmul(x_BRK: Array, w_EKN: Array, layout: BlockLayout, fp8_backend: Fp8Backend | None = None,
                   cached_dtype=None) -> Float[Array, "B R N"]:
    """Per-block GEMM on the padded layout; Dgrad and Wgrad use the same per-block GEMM.
    `cached_dtype` (x's dtype, with FP8): x kept for the Wgrad in e4m3 tiles (report §3.3.4)."""
    return _per_expert(x_BRK, w_EKN, layout, fp8_backend)


def _blocked_fwd(x_BRK, w_EKN, layout, fp8_backend, cached_dtype):
    kept = x_BRK if cached_dtype is None else cache_rows(x_BRK)
    return blocked_matmul(x_BRK, w_EKN, layout, fp8_backend, cached_dtype), (kept, w_EKN, layout)


def _blocked_bwd(fp8_backend, cached_dtype, residuals, dy_BRN):
    kept, w_EKN, layout = residuals
    x_BRK = kept if cached_dtype is None else uncache_rows(kept, w_EKN.shape[1])
    if fp8_backend is None:  # plain GEMMs take their operands in the forward's dtype
        dy_BRN = dy_BRN.astype(x_BRK.dtype)
    dx_BRK = _per_expert(dy_BRN, jnp.swapaxes(w_EKN, 1, 2), layout, fp8_backend)  # Dgrad
    gemm = block_gemm(fp8_backend)

    # Wgrad: x_b^T @ dy_b, added to the block's expert (in place).
    dw_EKN = over_used_blocks(layout, lambda b, e, dw_EKN: dw_EKN.at[e].add(gemm(x_BRK[b].T, dy_BRN[b])),
                              jnp.zeros(w_EKN.shape, jnp.float32))
    return dx_BRK.astype(cached_dtype or x_BRK.dtype), dw_EKN.astype(w_EKN.dtype), None


blocked_matmul.defvjp(_blocked_fwd, _blocked_bwd)


def resolve_impl(impl: GroupedGemmImpl) -> str:
    if impl not in IMPLS:
        raise ValueError(f"grouped GEMM impl {impl!r} must be one of {IMPLS}")
    if impl == "auto":
        return "ragged_dot" if current_platform() == "tpu" else "blocked"
    return impl


def grouped_matmul(x_MK: Array, w_EKN: Array, group_sizes_E: Int[Array, "E"], impl: GroupedGemmImpl = "auto",
                   fp8_backend: Fp8Backend | None = None, cache_fp8: bool = False) -> Float[Array, "M N"]:
    """Rows [sum(g[:e]), sum(g[:e+1])) of x times w[e], fp32 out.

    With `fp8_backend`, Fprop / Dgrad / Wgrad are block-scaled e4m3 GEMMs (report §3.3); FP8
    always uses the block layout, whose 128-row blocks keep Wgrad's token tiles within one expert;
    `cache_fp8` keeps x for the Wgrad in e4m3 tiles (report §3.3.4)."""
    if fp8_backend is None and resolve_impl(impl) == "ragged_dot":
        return jax.lax.ragged_dot(x_MK, w_EKN, group_sizes_E, preferred_element_type=jnp.float32)
    layout = block_layout(group_sizes_E, x_MK.shape[0])
    cached_dtype = jnp.dtype(x_MK.dtype) if (cache_fp8 and fp8_backend is not None) else None
    return from_blocks(blocked_matmul(to_blocks(x_MK, layout), w_EKN, layout, fp8_backend, cached_dtype), layout)
