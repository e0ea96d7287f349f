"""Block quantization to float8 e4m3 (report §3.3.2, fine-grained quantization).

- `quantize_rows`: activations [M, K] -> e4m3 [M, K] + fp32 scales [M, K/128] (1x128 tiles).
  The 128x1 tiles of Wgrad's transposed operand are `quantize_rows(x.T)`.
- `quantize_blocks`: weights [K, N] -> e4m3 [K, N] + fp32 scales [K/128, N/128] (128x128 blocks).
Dequantized value = e4m3 value * scale. Shapes must be multiples of 128 here; callers pad
(`dsv3_jax/quant/fp8.py`). Each has a Pallas kernel and a `*_ref` pure-jnp reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import BLOCK, E4M3_MAX, compiler_params, variant

FP8 = jnp.float8_e4m3fn
_TINY = 1e-12  # an all-zero tile gets a tiny scale instead of a division by zero


def _scale(amax: jax.Array, pow2: bool) -> jax.Array:
    scale = jnp.maximum(amax, _TINY) / E4M3_MAX
    if pow2:  # round up to a power of two: scaling is then exact in any float format
        scale = jnp.exp2(jnp.ceil(jnp.log2(scale)))
    return scale


def _check(x: jax.Array, block_dims: tuple[int, ...]) -> None:
    for axis in block_dims:
        if x.shape[axis] % BLOCK:
            raise ValueError(f"FP8 block quantization needs dimension {axis} of shape {x.shape} to be a multiple of "
                             f"{BLOCK}; pad it first (dsv3_jax.quant.fp8 does)")


# References ------------------------------------------------------------------------------------

def quantize_rows_ref(x_MK: jax.Array, pow2: bool = False) -> tuple[jax.Array, jax.Array]:
    M, K = x_MK.shape
    tiles = x_MK.astype(jnp.float32).reshape(M, K // BLOCK, BLOCK)
    scale_MKb = _scale(jnp.abs(tiles).max(-1), pow2)
    q = (tiles / scale_MKb[..., None]).astype(FP8).reshape(M, K)
    return q, scale_MKb


def quantize_blocks_ref(w_KN: jax.Array, pow2: bool = False) -> tuple[jax.Array, jax.Array]:
    K, N = w_KN.shape
    blocks = w_KN.astype(jnp.float32).reshape(K // BLOCK, BLOCK, N // BLOCK, BLOCK)
    scale_KbNb = _scale(jnp.abs(blocks).max(axis=(1, 3)), pow2)
    q = (blocks / scale_KbNb[:, None, :, None]).astype(FP8).reshape(K, N)
    return q, scale_KbNb


def dequantize_rows(q_MK: jax.Array, scale_MKb: jax.Array) -> jax.Array:
    return q_MK.astype(jnp.float32) * jnp.repeat(scale_MKb, BLOCK, axis=1)


def dequantize_blocks(q_KN: jax.Array, scale_KbNb: jax.Array) -> jax.Array:
    return q_KN.astype(jnp.float32) * jnp.repeat(jnp.repeat(scale_KbNb, BLOCK, axis=0), BLOCK, axis=1)


# Kernels ---------------------------------------------------------------------------------------

def _rows_tile_kernel(x_ref, q_ref, s_ref, *, pow2):
    """GPU (Triton) variant: one program per (block_m x 128) tile."""
    tile = x_ref[...].astype(jnp.float32)  # [bm, 128]: one tile per row
    scale = _scale(jnp.max(jnp.abs(tile), axis=1, keepdims=True), pow2)
    q_ref[...] = (tile / scale).astype(q_ref.dtype)
    s_ref[...] = scale


def _rows_kernel(x_ref, q_ref, s_ref, *, pow2, n_kblocks):
    """TPU (Mosaic) variant: one program per block_m rows and all of K, so the scale block
    [bm, K/128] spans its array's last dim ((8, 128) rule); the 1x128 tiles are visited in turn."""
    def tile(c, scales):
        cols = pl.ds(pl.multiple_of(c * BLOCK, BLOCK), BLOCK)
        x = x_ref[:, cols].astype(jnp.float32)
        scale = _scale(jnp.max(jnp.abs(x), axis=1, keepdims=True), pow2)  # [bm, 1]
        q_ref[:, cols] = (x / scale).astype(q_ref.dtype)
        lane = jax.lax.broadcasted_iota(jnp.int32, scales.shape, 1)
        return jnp.where(lane == c, scale, scales)

    s_ref[...] = jax.lax.fori_loop(0, n_kblocks, tile, jnp.zeros(s_ref.shape, jnp.float32))


def rows_block_m(M: int, K: int, block_m: int) -> int:
    """Rows per TPU program: a multiple of 32 (e4m3's (32, 128) VMEM tile) whose fp32 input block
    stays within 2 MiB (K = 7168: 64 rows), or all of M when it is smaller."""
    fit = max(32, (2 * 2 ** 20 // (4 * K)) // 32 * 32)
    return M if M <= min(block_m, fit) else min(block_m, fit)


@functools.partial(jax.jit, static_argnames=("pow2", "platform", "interpret", "block_m"))
def quantize_rows(x_MK: jax.Array, pow2: bool = False, platform: str = "cpu", interpret: bool | None = None,
                  block_m: int = 128):
    _check(x_MK, (1,))
    M, K = x_MK.shape
    kind, interpret = variant(platform, interpret)
    out_shape = (jax.ShapeDtypeStruct((M, K), FP8), jax.ShapeDtypeStruct((M, K // BLOCK), jnp.float32))
    if kind == "gpu":
        block_m = min(block_m, M)
        return pl.pallas_call(
            functools.partial(_rows_tile_kernel, pow2=pow2), out_shape=out_shape,
            grid=(pl.cdiv(M, block_m), K // BLOCK),
            in_specs=[pl.BlockSpec((block_m, BLOCK), lambda i, k: (i, k))],
            out_specs=(pl.BlockSpec((block_m, BLOCK), lambda i, k: (i, k)),
                       pl.BlockSpec((block_m, 1), lambda i, k: (i, k))),
            compiler_params=compiler_params(kind), interpret=interpret,
        )(x_MK)
    block_m = rows_block_m(M, K, block_m)
    return pl.pallas_call(
        functools.partial(_rows_kernel, pow2=pow2, n_kblocks=K // BLOCK), out_shape=out_shape,
        grid=(pl.cdiv(M, block_m),),
        in_specs=[pl.BlockSpec((block_m, K), lambda i: (i, 0))],
        out_specs=(pl.BlockSpec((block_m, K), lambda i: (i, 0)), pl.BlockSpec((block_m, K // BLOCK), lambda i: (i, 0))),
        compiler_params=compiler_params(kind, "parallel"), interpret=interpret,
    )(x_MK)


def _blocks_tile_kernel(w_ref, q_ref, s_ref, *, pow2):
    """GPU (Triton) variant: the block's scale written as a (1, 1) block."""
    block = w_ref[...].astype(jnp.float32)  # [128, 128]
    scale = _scale(jnp.max(jnp.abs(block)), pow2)
    q_ref[...] = (block / scale).astype(q_ref.dtype)
    s_ref[...] = jnp.full((1, 1), scale, jnp.float32)


def _blocks_kernel(w_ref, q_ref, s_ref, *, pow2):
    """TPU (Mosaic) variant: the block's scale is one scalar of the [K/128, N/128] scales, which
    live in SMEM (a (1, 1) VMEM block would break the (8, 128) rule)."""
    block = w_ref[...].astype(jnp.float32)
    scale = _scale(jnp.max(jnp.abs(block)), pow2)
    q_ref[...] = (block / scale).astype(q_ref.dtype)
    s_ref[pl.program_id(0), pl.program_id(1)] = scale


@functools.partial(jax.jit, static_argnames=("pow2", "platform", "interpret"))
def quantize_blocks(w_KN: jax.Array, pow2: bool = False, platform: str = "cpu", interpret: bool | None = None):
    _check(w_KN, (0, 1))
    K, N = w_KN.shape
    kind, interpret = variant(platform, interpret)
    out_shape = (jax.ShapeDtypeStruct((K, N), FP8), jax.ShapeDtypeStruct((K // BLOCK, N // BLOCK), jnp.float32))
    tile = pl.BlockSpec((BLOCK, BLOCK), lambda i, j: (i, j))
    if kind == "gpu":
        return pl.pallas_call(
            functools.partial(_blocks_tile_kernel, pow2=pow2), out_shape=out_shape, grid=(K // BLOCK, N // BLOCK),
            in_specs=[tile], out_specs=(tile, pl.BlockSpec((1, 1), lambda i, j: (i, j))),
            compiler_params=compiler_params(kind), interpret=interpret,
        )(w_KN)
    from jax.experimental.pallas import tpu as pltpu

    return pl.pallas_call(
        functools.partial(_blocks_kernel, pow2=pow2), out_shape=out_shape, grid=(K // BLOCK, N // BLOCK),
        in_specs=[tile], out_specs=(tile, pl.BlockSpec(memory_space=pltpu.SMEM)),
        # Sequential: every program writes into the one SMEM scale array.
        compiler_params=compiler_params(kind, "arbitrary", "arbitrary"), interpret=interpret,
    )(w_KN)
