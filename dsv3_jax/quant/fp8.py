"""The FP8 training recipe (report §3.3): block-scaled e4m3 GEMMs for Fprop, Dgrad and Wgrad.

    Fprop  y  = x @ W        x: 1x128 tiles (per token, per 128 channels); W: 128x128 blocks
    Dgrad  dx = dy @ W^T     dy: 1x128 tiles; W^T: the same 128x128 blocks, transposed
    Wgrad  dW = x^T @ dy     x^T: 1x128 tiles along the token axis (128x1 tiles of x);
                             dy: 128x128 blocks over (tokens, out channels)
Each GEMM accumulates every 128-deep partial in fp32 and applies its scales there. Inputs,
master weights and gradients stay fp32/bf16; only GEMM operands are e4m3.

Backends: "xla" quantizes with the pure-jnp references and runs one fp32 GEMM over the dequantized
e4m3 operands (`dequantized_matmul`: the promoted sum within fp32 rounding; what CPU training
uses); "pallas" runs the Pallas kernels (interpret mode in programs built for CPU; Mosaic on TPU,
Mosaic GPU on GPU).
Dimensions that are not multiples of 128 are zero-padded up to the next multiple (zeros add
nothing to a dot product and get their own, unused, scales); the `tiny` preset therefore runs
FP8 GEMMs on padded 128-wide operands.
"""

from __future__ import annotations

import functools
import typing

import jax
import jax.numpy as jnp

from dsv3_jax.config import Fp8Backend
from dsv3_jax.parallel.sharding import per_batch_shard
from dsv3_jax.platform import current_platform
from pallas_kernels import BLOCK
from pallas_kernels.fp8_gemm import block_scaled_matmul, dequantized_matmul
from pallas_kernels.fp8_grouped_gemm import grouped_block_scaled_matmul
from pallas_kernels.fp8_quant import (dequantize_rows, quantize_blocks, quantize_blocks_ref, quantize_rows,
                                      quantize_rows_ref)

BACKENDS: tuple[str, ...] = typing.get_args(Fp8Backend)


def _pad_to(x: jax.Array, axis: int) -> jax.Array:
    extra = -x.shape[axis] % BLOCK
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _ops(backend: str):
    if backend == "pallas":
        # Each kernel's variant follows the platform the program is built for (the mesh in context,
        # not the host): interpret mode on CPU, Mosaic for TPU, Triton for GPU.
        platform = current_platform()
        return (functools.partial(quantize_rows, platform=platform), functools.partial(quantize_blocks, platform=platform),
                functools.partial(block_scaled_matmul, platform=platform))
    if backend == "xla":
        return quantize_rows_ref, quantize_blocks_ref, dequantized_matmul
    raise ValueError(f"fp8 backend {backend!r} must be one of {BACKENDS}")


def fp8_gemm(a_MK: jax.Array, b_KN: jax.Array, backend: Fp8Backend) -> jax.Array:
    """a @ b with a quantized in 1x128 tiles and b in 128x128 blocks, fp32 out.

    Shapes need not be multiples of 128: K and N are zero-padded, the result sliced back.
    """
    quantize_rows_fn, quantize_blocks_fn, gemm = _ops(backend)
    M, N = a_MK.shape[0], b_KN.shape[1]
    a = _pad_to(_pad_to(a_MK, 1), 0) if backend == "pallas" else _pad_to(a_MK, 1)
    b = _pad_to(_pad_to(b_KN, 0), 1)
    qa, sa = quantize_rows_fn(a)
    qb, sb = quantize_blocks_fn(b)
    return gemm(qa, sa, qb, sb)[:M, :N]


def fp8_matmul(x_MK: jax.Array, w_KN: jax.Array, backend: Fp8Backend = "xla", cache_fp8: bool = False
               ) -> jax.Array:
    """y = x @ w, all three GEMMs (forward and both gradients) in block-scaled FP8.

    `cache_fp8`: keep x for the Wgrad as its e4m3 1x128 tiles and their scales (1 + 4/128 bytes a
    value instead of bf16's 2, report §3.3.4); the backward dequantizes them and quantizes x^T
    again along the tokens, the transposition the report describes (§3.5.2).

    On "pallas" under a mesh each device runs the kernels on its own rows (Pallas calls cannot be
    partitioned by GSPMD): rows stay split over the batch axes, w is seen whole, and dW, a sum over
    tokens, is summed over the shards by the shard_map's transpose."""
    cached_dtype = jnp.dtype(x_MK.dtype) if cache_fp8 else None
    if backend == "pallas":
        return per_batch_shard(lambda x, w: _fp8_matmul(x, w, backend, cached_dtype), x_MK, replicated=(w_KN,))
    return _fp8_matmul(x_MK, w_KN, backend, cached_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fp8_matmul(x_MK: jax.Array, w_KN: jax.Array, backend: Fp8Backend, cached_dtype) -> jax.Array:
    return fp8_gemm(x_MK, w_KN, backend).astype(x_MK.dtype)


def cache_rows(x_MK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., K] kept for a backward pass as e4m3 1x128 tiles (K zero-padded to a multiple of 128)
    and their fp32 scales (jnp: XLA fuses it into x's producer on every platform)."""
    q_MK, scale = quantize_rows_ref(_pad_to(x_MK.reshape(-1, x_MK.shape[-1]), 1))
    return q_MK.reshape(x_MK.shape[:-1] + q_MK.shape[-1:]), scale.reshape(x_MK.shape[:-1] + scale.shape[-1:])


def uncache_rows(cached: tuple[jax.Array, jax.Array], k: int) -> jax.Array:
    """The fp32 values `cache_rows` kept, their last dim cut back to `k`."""
    q, scale = cached
    flat = dequantize_rows(q.reshape(-1, q.shape[-1]), scale.reshape(-1, scale.shape[-1]))
    return flat.reshape(q.shape)[..., :k]


def _fwd(x_MK, w_KN, backend, cached_dtype):
    y = _fp8_matmul(x_MK, w_KN, backend, cached_dtype)
    if cached_dtype is None:
        return y, (x_MK, w_KN)
    return y, (cache_rows(x_MK), w_KN)


def _bwd(backend, cached_dtype, residuals, dy_MN):
    x, w_KN = residuals
    dy = dy_MN.astype(jnp.float32)
    x_MK = x if cached_dtype is None else uncache_rows(x, w_KN.shape[0])
    dx_MK = fp8_gemm(dy, w_KN.T.astype(jnp.float32), backend)  # Dgrad
    dw_KN = fp8_gemm(x_MK.T.astype(jnp.float32), dy, backend)  # Wgrad: x^T tiles run along tokens
    return dx_MK.astype(cached_dtype or x_MK.dtype), dw_KN.astype(w_KN.dtype)


_fp8_matmul.defvjp(_fwd, _bwd)


def fp8_grouped_pallas(x_BRK: jax.Array, w_EKN: jax.Array, expert_B: jax.Array, used_blocks=None) -> jax.Array:
    """All 128-row blocks through the grouped Pallas kernel in one launch: [B, 128, K] -> fp32 [B, 128, N].

    Routed experts reach this through `model/grouped_gemm.py`'s block layout (every 128-row block
    belongs to one expert, so activation tiles never mix experts)."""
    B, R, _ = x_BRK.shape
    N = w_EKN.shape[2]
    quantize_rows_fn, quantize_blocks_fn, _ = _ops("pallas")
    qx, sx = quantize_rows_fn(_pad_to(x_BRK.reshape(B * R, -1).astype(jnp.float32), 1))
    qw, sw = jax.vmap(quantize_blocks_fn)(_pad_to(_pad_to(w_EKN.astype(jnp.float32), 1), 2))
    out = grouped_block_scaled_matmul(qx, sx, qw, sw, expert_B, used_blocks, platform=current_platform())
    return out[:, :N].reshape(B, R, N)
