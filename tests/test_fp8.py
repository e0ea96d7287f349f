"""FP8 block-scaled kernels (interpret mode on CPU) against their references and the report's claims."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.model.grouped_gemm import grouped_matmul
from dsv3_jax.quant.fp8 import fp8_gemm, fp8_matmul
from pallas_kernels.fp8_gemm import (block_scaled_matmul, block_scaled_matmul_ref, dequantized_matmul,
                                     limited_accumulation_matmul)
from pallas_kernels.fp8_quant import (dequantize_blocks, dequantize_rows, quantize_blocks, quantize_blocks_ref,
                                      quantize_rows, quantize_rows_ref)


def rel_diff(x, y) -> float:
    """DeepGEMM's measure: 1 - 2<x,y> / (|x|^2 + |y|^2)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(1 - 2 * np.sum(x * y) / (np.sum(x * x) + np.sum(y * y)))


def with_outliers(key, shape, rows=(), cols=(), scale=100.0):
    x = jax.random.normal(key, shape)
    x = x.at[jnp.array(rows, int)].multiply(scale) if rows else x
    return x.at[:, jnp.array(cols, int)].multiply(scale) if cols else x


@pytest.mark.parametrize("pow2", [False, True])
def test_quantization_kernels_equal_their_references(pow2):
    x = with_outliers(jax.random.key(0), (256, 384), rows=(3,), cols=(200,))
    q, s = quantize_rows(x, pow2=pow2)
    q_ref, s_ref = quantize_rows_ref(x, pow2=pow2)
    np.testing.assert_array_equal(q.astype(jnp.float32), q_ref.astype(jnp.float32))
    np.testing.assert_array_equal(s, s_ref)
    assert s.shape == (256, 3)  # one scale per row per 128 columns
    if not pow2:
        np.testing.assert_allclose(s[3, 0], jnp.abs(x[3, :128]).max() / 448, rtol=1e-6)
    w = with_outliers(jax.random.key(1), (384, 256), rows=(7,))
    qw, sw = quantize_blocks(w, pow2=pow2)
    qw_ref, sw_ref = quantize_blocks_ref(w, pow2=pow2)
    np.testing.assert_array_equal(qw.astype(jnp.float32), qw_ref.astype(jnp.float32))
    np.testing.assert_array_equal(sw, sw_ref)
    assert sw.shape == (3, 2)
    if pow2:
        np.testing.assert_array_equal(np.log2(np.asarray(sw)) % 1, 0)  # powers of two
    # Dequantized values are within e4m3's relative spacing of the inputs.
    assert np.max(np.abs(dequantize_rows(q, s) - x) / np.repeat(s * 448, 128, 1)) <= 2 ** -4


def test_gemm_kernel_equals_reference():
    a = jax.random.normal(jax.random.key(2), (256, 512))
    b = jax.random.normal(jax.random.key(3), (512, 384))
    qa, sa = quantize_rows_ref(a)
    qb, sb = quantize_blocks_ref(b)
    np.testing.assert_allclose(block_scaled_matmul(qa, sa, qb, sb), block_scaled_matmul_ref(qa, sa, qb, sb),
                               rtol=1e-5, atol=1e-4)
    # ... and the xla backend's one-GEMM form (dequantized operands, fp32 over all of K) is the same sum.
    got = dequantized_matmul(qa, sa, qb, sb)
    np.testing.assert_allclose(got, block_scaled_matmul_ref(qa, sa, qb, sb), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got, dequantize_rows(qa, sa) @ dequantize_blocks(qb, sb), rtol=1e-5, atol=1e-4)


def test_block_scaling_handles_outliers_where_a_per_tensor_scale_fails():
    a = with_outliers(jax.random.key(4), (256, 1024), rows=(5, 77), cols=(33, 600), scale=1e4)
    b = with_outliers(jax.random.key(5), (1024, 256), rows=(900,), scale=1e4)
    exact = a @ b
    block = rel_diff(fp8_gemm(a, b, "pallas"), exact)
    assert block < 1e-3, block
    # One scale for the whole tensor: the outliers set it, the bulk underflows into e4m3's subnormals.
    per_tensor = lambda x: (x / (jnp.abs(x).max() / 448)).astype(jnp.float8_e4m3fn).astype(jnp.float32) * (
        jnp.abs(x).max() / 448)
    tensor_out = per_tensor(a) @ per_tensor(b)
    tensor = rel_diff(tensor_out, exact)
    assert tensor > 1e-3 > block, (tensor, block)
    # Away from the outliers' rows and columns the per-tensor result is far worse still.
    bulk = (slice(100, 250), slice(0, 30))
    assert rel_diff(tensor_out[bulk], exact[bulk]) > 10 * rel_diff(fp8_gemm(a, b, "xla")[bulk], exact[bulk])


def test_promotion_every_128_matters_at_k_4096():
    a = jax.random.normal(jax.random.key(6), (64, 4096))
    b = jax.random.normal(jax.random.key(7), (4096, 128))
    qa, sa = quantize_rows_ref(a)
    qb, sb = quantize_blocks_ref(b)
    exact = dequantize_rows(qa, sa) @ dequantize_blocks(qb, sb)  # isolate accumulation error
    promoted = rel_diff(limited_accumulation_matmul(qa, sa, qb, sb, promote=True), exact)
    unpromoted = rel_diff(limited_accumulation_matmul(qa, sa, qb, sb, promote=False), exact)
    assert unpromoted > 3 * promoted, (unpromoted, promoted)
    assert rel_diff(block_scaled_matmul_ref(qa, sa, qb, sb), exact) < promoted  # fp32 per block: better still


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_fp8_linear_fprop_dgrad_wgrad_match_fp32(backend):
    x = jax.random.normal(jax.random.key(8), (256, 384))
    w = jax.random.normal(jax.random.key(9), (384, 256)) * 0.05
    r = jax.random.normal(jax.random.key(10), (256, 256))  # fixed upstream gradient dy = r
    assert rel_diff(fp8_matmul(x, w, backend), x @ w) < 1e-3
    dx, dw = jax.grad(lambda x, w: jnp.sum(fp8_matmul(x, w, backend) * r), argnums=(0, 1))(x, w)
    assert rel_diff(dx, r @ w.T) < 1e-3
    assert rel_diff(dw, x.T @ r) < 1e-3


def test_odd_shapes_are_padded_and_kernels_refuse_them_clearly():
    x = jax.random.normal(jax.random.key(11), (50, 200))
    w = jax.random.normal(jax.random.key(12), (200, 70))
    for backend in ("xla", "pallas"):
        y = fp8_matmul(x, w, backend)
        assert y.shape == (50, 70) and rel_diff(y, x @ w) < 1e-3
    with pytest.raises(ValueError, match="multiple of 128"):
        quantize_rows(x)
    with pytest.raises(ValueError, match="multiples of 128"):
        block_scaled_matmul(*quantize_rows_ref(jnp.zeros((128, 128))), jnp.zeros((128, 70), jnp.float8_e4m3fn),
                            jnp.ones((1, 1)))


def test_grouped_kernel_equals_reference():
    from pallas_kernels.fp8_grouped_gemm import grouped_block_scaled_matmul, grouped_block_scaled_matmul_ref

    from dsv3_jax.model.grouped_gemm import block_layout, to_blocks

    x = jax.random.normal(jax.random.key(17), (300, 256))
    w = jax.random.normal(jax.random.key(18), (4, 256, 128))
    layout = block_layout(jnp.array([100, 0, 130, 70]), 300)  # groups of any size, padded to 128-row blocks
    qa, sa = quantize_rows_ref(to_blocks(x, layout).reshape(-1, 256))
    qw, sw = jax.vmap(quantize_blocks_ref)(w)
    got = grouped_block_scaled_matmul(qa, sa, qw, sw, layout.expert_B)
    np.testing.assert_allclose(got, grouped_block_scaled_matmul_ref(qa, sa, qw, sw, layout.expert_B), rtol=1e-5,
                               atol=1e-4)
    # Block b used expert_B[b]'s weights: its rows equal the dense reference with that weight.
    b = 2  # the second block of expert 2 (expert 0 fills block 0, expert 1 has none)
    dense = block_scaled_matmul_ref(qa[b * 128:(b + 1) * 128], sa[b * 128:(b + 1) * 128], qw[2], sw[2])
    assert int(layout.expert_B[b]) == 2
    np.testing.assert_allclose(got[b * 128:(b + 1) * 128], dense, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_grouped_fp8_matches_ragged_dot_with_gradients(backend):
    x = jax.random.normal(jax.random.key(13), (200, 160))
    w = jax.random.normal(jax.random.key(14), (4, 160, 96)) * 0.1
    sizes = jnp.array([60, 0, 90, 50])
    r = jax.random.normal(jax.random.key(15), (200, 96))
    assert rel_diff(grouped_matmul(x, w, sizes, fp8_backend=backend), jax.lax.ragged_dot(x, w, sizes)) < 1e-3
    got = jax.grad(lambda x, w: jnp.sum(grouped_matmul(x, w, sizes, fp8_backend=backend) * r), argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(jax.lax.ragged_dot(x, w, sizes) * r), argnums=(0, 1))(x, w)
    assert rel_diff(got[0], want[0]) < 1e-3 and rel_diff(got[1], want[1]) < 1e-3
    np.testing.assert_array_equal(got[1][1], 0.0)  # the empty group gets no gradient


def test_fp8_model_trains(tiny_cfg):
    from dsv3_jax.config import Config, TrainConfig
    from dsv3_jax.train.state import create_train_state
    from dsv3_jax.train.step import make_train_step

    cfg = dataclasses.replace(tiny_cfg, fp8=True, n_layers=2, mtp_depth=1)
    config = Config(model=cfg, train=TrainConfig(steps=20, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=1))
    graphdef, optimizer, state = create_train_state(config, 0)
    step = jax.jit(make_train_step(config, graphdef, optimizer))
    tokens = jax.random.randint(jax.random.key(16), (4, 17), 0, cfg.vocab_size)
    losses = []
    for _ in range(12):
        state, metrics = step(state, tokens)
        losses.append(float(metrics["lm_loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.5, losses
