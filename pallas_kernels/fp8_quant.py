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

from pallas_kernels import BLOCK, E4M3_MAX

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

def _rows_kernel(x_ref, q_ref, s_ref, *, pow2):
    tile = x_ref[...].astype(jnp.float32)  # [bm, 128]: one tile per row
    scale = _scale(jnp.max(jnp.abs(tile), axis=1, keepdims=True), pow2)
    q_ref[...] = (tile / scale).astype(q_ref.dtype)
    s_ref[...] = scale


@functools.partial(jax.jit, static_argnames=("pow2", "interpret", "block_m"))
def quantize_rows(x_MK: jax.Array, pow2: bool = False, interpret: bool = True, block_m: int = 128):
    _check(x_MK, (1,))
    M, K = x_MK.shape
    block_m = min(block_m, M)
    return pl.pallas_call(
        functools.partial(_rows_kernel, pow2=pow2),
        out_shape=(jax.ShapeDtypeStruct((M, K), FP8), jax.ShapeDtypeStruct((M, K // BLOCK), jnp.float32)),
        grid=(pl.cdiv(M, block_m), K // BLOCK),
        in_specs=[pl.BlockSpec((block_m, BLOCK), lambda i, k: (i, k))],
        out_specs=(pl.BlockSpec((block_m, BLOCK), lambda i, k: (i, k)), pl.BlockSpec((block_m, 1), lambda i, k: (i, k))),
        interpret=interpret,
    )(x_MK)


def _blocks_kernel(w_ref, q_ref, s_ref, *, pow2):
    block = w_ref[...].astype(jnp.float32)  # [128, 128]
    scale = _scale(jnp.max(jnp.abs(block)), pow2)
    q_ref[...] = (block / scale).astype(q_ref.dtype)
    s_ref[...] = jnp.full((1, 1), scale, jnp.float32)


@functools.partial(jax.jit, static_argnames=("pow2", "interpret"))
def quantize_blocks(w_KN: jax.Array, pow2: bool = False, interpret: bool = True):
    _check(w_KN, (0, 1))
    K, N = w_KN.shape
    return pl.pallas_call(
        functools.partial(_blocks_kernel, pow2=pow2),
        out_shape=(jax.ShapeDtypeStruct((K, N), FP8), jax.ShapeDtypeStruct((K // BLOCK, N // BLOCK), jnp.float32)),
        grid=(K // BLOCK, N // BLOCK),
        in_specs=[pl.BlockSpec((BLOCK, BLOCK), lambda i, j: (i, j))],
        out_specs=(pl.BlockSpec((BLOCK, BLOCK), lambda i, j: (i, j)), pl.BlockSpec((1, 1), lambda i, j: (i, j))),
        interpret=interpret,
    )(w_KN)
