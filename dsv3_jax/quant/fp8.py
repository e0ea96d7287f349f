"""The FP8 training recipe (report §3.3): block-scaled e4m3 GEMMs for Fprop, Dgrad and Wgrad.

    Fprop  y  = x @ W        x: 1x128 tiles (per token, per 128 channels); W: 128x128 blocks
    Dgrad  dx = dy @ W^T     dy: 1x128 tiles; W^T: the same 128x128 blocks, transposed
    Wgrad  dW = x^T @ dy     x^T: 1x128 tiles along the token axis (128x1 tiles of x);
                             dy: 128x128 blocks over (tokens, out channels)
Each GEMM accumulates every 128-deep partial in fp32 and applies its scales there. Inputs,
master weights and gradients stay fp32/bf16; only GEMM operands are e4m3.

Backends: "xla" runs the pure-jnp reference (what CPU training uses: XLA compiles it well);
"pallas" runs the Pallas kernels (interpret mode on CPU, Triton on GPU).
Dimensions that are not multiples of 128 are zero-padded up to the next multiple (zeros add
nothing to a dot product and get their own, unused, scales); the `tiny` preset therefore runs
FP8 GEMMs on padded 128-wide operands.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import BLOCK
from pallas_kernels.fp8_gemm import block_scaled_matmul, block_scaled_matmul_ref
from pallas_kernels.fp8_quant import quantize_blocks, quantize_blocks_ref, quantize_rows, quantize_rows_ref

BACKENDS = ("xla", "pallas")


def _pad_to(x: jax.Array, axis: int) -> jax.Array:
    extra = -x.shape[axis] % BLOCK
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _ops(backend: str):
    if backend == "pallas":
        on_cpu = jax.default_backend() == "cpu"
        return (functools.partial(quantize_rows, interpret=on_cpu), functools.partial(quantize_blocks, interpret=on_cpu),
                functools.partial(block_scaled_matmul, interpret=on_cpu))
    if backend == "xla":
        return quantize_rows_ref, quantize_blocks_ref, block_scaled_matmul_ref
    raise ValueError(f"fp8 backend {backend!r} must be one of {BACKENDS}")


def fp8_gemm(a_MK: jax.Array, b_KN: jax.Array, rhs: str, backend: str) -> jax.Array:
    """a @ b with a quantized in 1x128 tiles and b in 128x128 blocks (`rhs="blocks"`), fp32 out.

    Shapes need not be multiples of 128: K and N are zero-padded, the result sliced back.
    """
    quantize_rows_fn, quantize_blocks_fn, gemm = _ops(backend)
    M, N = a_MK.shape[0], b_KN.shape[1]
    a = _pad_to(_pad_to(a_MK, 1), 0) if backend == "pallas" else _pad_to(a_MK, 1)
    b = _pad_to(_pad_to(b_KN, 0), 1)
    qa, sa = quantize_rows_fn(a)
    qb, sb = quantize_blocks_fn(b)
    return gemm(qa, sa, qb, sb)[:M, :N]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fp8_matmul(x_MK: jax.Array, w_KN: jax.Array, backend: str = "xla") -> jax.Array:
    """y = x @ w, all three GEMMs (forward and both gradients) in block-scaled FP8."""
    return fp8_gemm(x_MK, w_KN, "blocks", backend).astype(x_MK.dtype)


def _fwd(x_MK, w_KN, backend):
    return fp8_matmul(x_MK, w_KN, backend), (x_MK, w_KN)


def _bwd(backend, residuals, dy_MN):
    x_MK, w_KN = residuals
    dy = dy_MN.astype(jnp.float32)
    dx_MK = fp8_gemm(dy, w_KN.T.astype(jnp.float32), "blocks", backend)  # Dgrad
    dw_KN = fp8_gemm(x_MK.T.astype(jnp.float32), dy, "blocks", backend)  # Wgrad: x^T tiles run along tokens
    return dx_MK.astype(x_MK.dtype), dw_KN.astype(w_KN.dtype)


fp8_matmul.defvjp(_fwd, _bwd)


def fp8_ragged_matmul(x_MK: jax.Array, w_EKN: jax.Array, group_sizes_E: jax.Array, backend: str = "xla"
                      ) -> jax.Array:
    """Grouped FP8 GEMM for routed experts: rows sorted by expert, group sizes given.

    x is quantized in 1x128 tiles, each expert's weight in 128x128 blocks. "pallas": the grouped
    kernel (pallas_kernels/fp8_grouped_gemm.py). "xla": per 128-wide K block, one `ragged_dot` of
    the e4m3 values (exact products, fp32 accumulation) times the activation scales (per row) and
    the weight block's scales (folded into that block's dequantized e4m3 values): the same
    promoted sum as the kernel, block by block.
    """
    M, K = x_MK.shape
    E, _, N = w_EKN.shape
    x = _pad_to(x_MK.astype(jnp.float32), 1)
    w = _pad_to(_pad_to(w_EKN.astype(jnp.float32), 1), 2)
    Kp, Np = x.shape[1], w.shape[2]
    if backend == "pallas":
        from pallas_kernels.fp8_grouped_gemm import grouped_block_scaled_matmul

        quantize_rows_fn, quantize_blocks_fn, _ = _ops("pallas")
        qx, sx = quantize_rows_fn(x)
        qw, sw = jax.vmap(quantize_blocks_fn)(w)
        out = grouped_block_scaled_matmul(qx, sx, qw, sw, group_sizes_E, interpret=jax.default_backend() == "cpu")
        return out[:, :N]
    qx, sx_MKb = quantize_rows_ref(x)
    qw, sw_EKbNb = jax.vmap(quantize_blocks_ref)(w)
    wq_scaled = (qw.astype(jnp.float32).reshape(E, Kp // BLOCK, BLOCK, Np // BLOCK, BLOCK)
                 * sw_EKbNb[:, :, None, :, None]).reshape(E, Kp // BLOCK, BLOCK, Np)
    qx_blocks = qx.astype(jnp.float32).reshape(M, Kp // BLOCK, BLOCK)

    def one_block(acc, k):
        partial = jax.lax.ragged_dot(qx_blocks[:, k], wq_scaled[:, k], group_sizes_E,
                                     preferred_element_type=jnp.float32)
        return acc + partial * sx_MKb[:, k:k + 1], None

    acc = jnp.zeros((M, Np), jnp.float32)
    for k in range(Kp // BLOCK):  # static, short (K/128)
        acc, _ = one_block(acc, k)
    return acc[:, :N]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fp8_grouped(x_MK: jax.Array, w_EKN: jax.Array, group_sizes_E: jax.Array, backend: str = "xla") -> jax.Array:
    """ragged_dot(x, w, group_sizes) with Fprop, Dgrad and Wgrad as block-scaled FP8 GEMMs."""
    return fp8_ragged_matmul(x_MK, w_EKN, group_sizes_E, backend).astype(x_MK.dtype)


def _grouped_fwd(x_MK, w_EKN, group_sizes_E, backend):
    return fp8_grouped(x_MK, w_EKN, group_sizes_E, backend), (x_MK, w_EKN, group_sizes_E)


def _grouped_bwd(backend, residuals, dy_MN):
    x_MK, w_EKN, group_sizes_E = residuals
    dy = dy_MN.astype(jnp.float32)
    dx = fp8_ragged_matmul(dy, jnp.swapaxes(w_EKN, 1, 2), group_sizes_E, backend)  # Dgrad per expert
    # Wgrad per expert: x_e^T @ dy_e. Rows of other experts are masked to zero per group.
    E = w_EKN.shape[0]
    ends = jnp.cumsum(group_sizes_E)
    starts = ends - group_sizes_E
    rows = jnp.arange(x_MK.shape[0])

    def wgrad(e):
        mask = ((rows >= starts[e]) & (rows < ends[e]))[:, None]
        return fp8_gemm(jnp.where(mask, x_MK, 0).T.astype(jnp.float32), jnp.where(mask, dy, 0), "blocks", backend)

    dw = jax.lax.map(wgrad, jnp.arange(E))
    return dx.astype(x_MK.dtype), dw.astype(w_EKN.dtype), None


fp8_grouped.defvjp(_grouped_fwd, _grouped_bwd)
