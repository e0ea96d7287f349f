"""FP8 block-scaled kernels (interpret mode on CPU) against their references and the report's claims."""

import dataclasses

import jax
import ml_dtypes
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


# Both kernel variants on CPU: the TPU one (Mosaic: K grid, VMEM accumulator, SMEM scalars) and the
# GPU one (Triton: a K loop per output tile), each in interpret mode.
VARIANTS = [pytest.param(dict(platform="cpu"), id="tpu-variant"),
            pytest.param(dict(platform="gpu", interpret=True), id="gpu-variant")]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pow2", [False, True])
def test_quantization_kernels_equal_their_references(pow2, variant):
    x = with_outliers(jax.random.key(0), (200, 384), rows=(3,), cols=(200,))  # 200 rows: off the 128 grid
    q, s = quantize_rows(x, pow2=pow2, **variant)
    q_ref, s_ref = quantize_rows_ref(x, pow2=pow2)
    np.testing.assert_array_equal(q.astype(jnp.float32), q_ref.astype(jnp.float32))
    np.testing.assert_array_equal(s, s_ref)
    assert s.shape == (200, 3)  # one scale per row per 128 columns
    if not pow2:
        np.testing.assert_allclose(s[3, 0], jnp.abs(x[3, :128]).max() / 448, rtol=1e-6)
    w = with_outliers(jax.random.key(1), (384, 256), rows=(7,))
    qw, sw = quantize_blocks(w, pow2=pow2, **variant)
    qw_ref, sw_ref = quantize_blocks_ref(w, pow2=pow2)
    np.testing.assert_array_equal(qw.astype(jnp.float32), qw_ref.astype(jnp.float32))
    np.testing.assert_array_equal(sw, sw_ref)
    assert sw.shape == (3, 2)
    if pow2:
        np.testing.assert_array_equal(np.log2(np.asarray(sw)) % 1, 0)  # powers of two
    # Dequantized values are within e4m3's relative spacing of the inputs.
    assert np.max(np.abs(dequantize_rows(q, s) - x) / np.repeat(s * 448, 128, 1)) <= 2 ** -4


def assert_summation_order_only(got, want):
    """FP32 results of the same e4m3 operands and scales: only the order of the fp32 sums differs."""
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", [384, 512])  # TPU tiles of 128 columns (384) and of 256 (two scales per tile)
def test_gemm_kernel_equals_reference(variant, n):
    a = jax.random.normal(jax.random.key(2), (200, 640)).at[5, 300].set(1e4)  # an outlier in one 1x128 tile
    b = jax.random.normal(jax.random.key(3), (640, n))
    qa, sa = quantize_rows_ref(a)
    qb, sb = quantize_blocks_ref(b)
    want = block_scaled_matmul_ref(qa, sa, qb, sb)
    assert_summation_order_only(block_scaled_matmul(qa, sa, qb, sb, **variant), want)
    # Every tile's scale matters: one dropped (set to 1) is caught far above the tolerance.
    dropped = block_scaled_matmul(qa, sa.at[7, 2].set(1.0), qb, sb, **variant)
    assert np.abs(np.asarray(dropped) - np.asarray(want))[7].max() > 1e-3 * np.abs(np.asarray(want)).max()


def test_xla_backend_computes_the_same_sum_in_one_gemm():
    a = jax.random.normal(jax.random.key(2), (256, 512))
    b = jax.random.normal(jax.random.key(3), (512, 384))
    qa, sa = quantize_rows_ref(a)
    qb, sb = quantize_blocks_ref(b)
    # The xla backend's one-GEMM form (dequantized operands, fp32 over all of K) is the same sum.
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


# An independent reference in numpy: quantise with the documented tiles (scale = amax / 448 in
# fp32, round to e4m3 with ml_dtypes), dequantise and multiply in float64. Fprop, Dgrad and Wgrad
# must each equal their own reference to fp32 rounding: an fp32 GEMM, other tiles or one
# per-tensor scale all miss it by ~3e-2.
MACHINE = 2e-6  # fp32 rounding of the dequantised operands and of the accumulation (measured <= 6e-7)


def np_dequantized(x, tile_rows: int, tile_cols: int, per_tensor: bool = False) -> np.ndarray:
    x = np.asarray(x, np.float32)
    x = np.pad(x, ((0, -x.shape[0] % tile_rows), (0, -x.shape[1] % tile_cols)))
    R, C = x.shape
    tiles = x.reshape(R // tile_rows, tile_rows, C // tile_cols, tile_cols)
    amax = np.abs(tiles).max(keepdims=True) if per_tensor else np.abs(tiles).max(axis=(1, 3), keepdims=True)
    scale = np.maximum(amax, np.float32(1e-12)) / np.float32(448)
    q = (tiles / scale).astype(ml_dtypes.float8_e4m3fn)
    return (q.astype(np.float64) * scale.astype(np.float64)).reshape(R, C)


def np_fp8_gemm(a_MK, b_KN, per_tensor_a: bool = False) -> np.ndarray:
    """a in 1x128 tiles (or one scale), b in 128x128 blocks, the product in float64."""
    M, N = a_MK.shape[0], b_KN.shape[1]
    a = np_dequantized(a_MK, 1, 128, per_tensor_a)
    return (a @ np_dequantized(b_KN, 128, 128)[:a.shape[1]])[:M, :N]


def max_err(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_fprop_dgrad_wgrad_each_equal_their_block_scaled_reference(backend):
    # Odd shapes on purpose: 200 tokens (Wgrad's token tiles are padded), K=320, N=192.
    x = np.asarray(jax.random.normal(jax.random.key(8), (200, 320)))
    w = np.asarray(jax.random.normal(jax.random.key(9), (320, 192))) * 0.05
    dy = np.asarray(jax.random.normal(jax.random.key(10), (200, 192)))
    y, vjp = jax.vjp(lambda x, w: fp8_matmul(x, w, backend), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(dy))
    for name, got, want, fp32 in [("Fprop", y, np_fp8_gemm(x, w), x @ w),
                                  ("Dgrad", dx, np_fp8_gemm(dy, w.T), dy @ w.T),  # dy 1x128, W^T blocks
                                  ("Wgrad", dw, np_fp8_gemm(x.T, dy), x.T @ dy)]:  # x^T tiles along tokens
        assert max_err(got, want) < MACHINE, name
        assert max_err(fp32, want) > 1000 * MACHINE, name  # the reference is not just the fp32 product


def test_cached_activations_are_e4m3_tiles_and_the_wgrad_reads_them():
    """§3.3.4: with `cache_fp8` the forward keeps x as e4m3 1x128 tiles and fp32 scales, not x; the
    Wgrad is the block-scaled product of those dequantized tiles (quantized again along tokens), the
    Dgrad is unchanged. Planted: caching x itself leaves no e4m3 residual and x among them."""
    x = np.asarray(jax.random.normal(jax.random.key(8), (200, 320)))
    w = np.asarray(jax.random.normal(jax.random.key(9), (320, 192))) * 0.05
    dy = jnp.asarray(jax.random.normal(jax.random.key(10), (200, 192)))
    _, vjp_cached = jax.vjp(lambda x, w: fp8_matmul(x, w, "xla", cache_fp8=True), jnp.asarray(x), jnp.asarray(w))
    _, vjp_plain = jax.vjp(lambda x, w: fp8_matmul(x, w, "xla"), jnp.asarray(x), jnp.asarray(w))
    kept = {(leaf.shape, jnp.dtype(leaf.dtype)) for leaf in jax.tree.leaves(vjp_cached)}
    assert ((200, 384), jnp.dtype(jnp.float8_e4m3fn)) in kept and ((200, 3), jnp.dtype(jnp.float32)) in kept, kept
    assert ((200, 320), jnp.dtype(jnp.float32)) not in kept, kept  # x itself is not kept
    (dx, dw), (dx_plain, _) = vjp_cached(dy), vjp_plain(dy)
    np.testing.assert_array_equal(dx, dx_plain)
    x_cached = np_dequantized(x, 1, 128)[:, :320]
    assert max_err(dw, np_fp8_gemm(x_cached.T, np.asarray(dy))) < MACHINE


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_grouped_fp8_gemms_equal_the_per_expert_reference(backend):
    sizes = [60, 0, 150, 50]  # an empty expert and one spanning two 128-row blocks
    x = np.asarray(jax.random.normal(jax.random.key(13), (260, 160)))
    w = np.asarray(jax.random.normal(jax.random.key(14), (4, 160, 96))) * 0.1
    dy = np.asarray(jax.random.normal(jax.random.key(15), (260, 96)))
    y, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, jnp.array(sizes), fp8_backend=backend), jnp.asarray(x),
                     jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(dy))
    # Each expert's rows start a fresh 128-row block (grouped_gemm.block_layout), so its tiles and
    # blocks are those of a dense FP8 GEMM on its own rows.
    rows = np.split(np.arange(260), np.cumsum(sizes)[:-1])
    for e, r in enumerate(rows):
        if not len(r):
            np.testing.assert_array_equal(dw[e], 0.0)  # no rows, no gradient
            continue
        assert max_err(y[r], np_fp8_gemm(x[r], w[e])) < MACHINE, e
        assert max_err(dx[r], np_fp8_gemm(dy[r], w[e].T)) < MACHINE, e
        assert max_err(dw[e], np_fp8_gemm(x[r].T, dy[r])) < MACHINE, e
        assert max_err(x[r].T @ dy[r], np_fp8_gemm(x[r].T, dy[r])) > 1000 * MACHINE


E4M3_BOUND = 0.05  # norm-wise error of a product of two e4m3-rounded operands (3 mantissa bits; measured 0.037)


def test_backward_outliers_where_a_per_tensor_gradient_scale_fails():
    """A 1e5x outlier token in dy (Dgrad) and a 1e5x outlier channel in dy (Wgrad): 1x128 tiles and
    128x128 blocks keep the rest of the gradient within e4m3's error; one scale for all of dy
    pushes the bulk into e4m3's subnormals."""
    x = np.asarray(jax.random.normal(jax.random.key(8), (200, 320)))
    w = np.asarray(jax.random.normal(jax.random.key(9), (320, 192))) * 0.05
    dy = np.asarray(jax.random.normal(jax.random.key(10), (200, 192)))
    _, vjp = jax.vjp(lambda x, w: fp8_matmul(x, w, "xla"), jnp.asarray(x), jnp.asarray(w))
    rel = lambda got, want: float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))

    dy_token = dy.copy()
    dy_token[7] *= 1e5
    others = np.arange(200) != 7
    exact = dy_token.astype(np.float64) @ w.T
    dx = np.asarray(vjp(jnp.asarray(dy_token))[0])
    per_tensor = np_fp8_gemm(dy_token, w.T, per_tensor_a=True)
    assert rel(dx[others], exact[others]) < E4M3_BOUND < rel(per_tensor[others], exact[others])

    dy_channel = dy.copy()
    dy_channel[:, 5] *= 1e5
    far = np.arange(192) >= 128  # output channels outside the outlier's 128x128 blocks
    exact = x.T.astype(np.float64) @ dy_channel
    dw = np.asarray(vjp(jnp.asarray(dy_channel))[1])
    per_tensor = np_dequantized(x.T, 1, 128)[:, :200] @ np_dequantized(dy_channel, 200, 192, per_tensor=True)
    assert rel(dw[:, far], exact[:, far]) < E4M3_BOUND < rel(per_tensor[:, far], exact[:, far])


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


@pytest.mark.parametrize("variant", VARIANTS)
def test_grouped_kernel_equals_reference(variant):
    from pallas_kernels.fp8_grouped_gemm import grouped_block_scaled_matmul, grouped_block_scaled_matmul_ref

    from dsv3_jax.model.grouped_gemm import block_layout, to_blocks

    x = jax.random.normal(jax.random.key(17), (300, 256))
    w = jax.random.normal(jax.random.key(18), (4, 256, 512))
    layout = block_layout(jnp.array([100, 0, 130, 70]), 300)  # ragged groups, one empty, padded to 128-row blocks
    qa, sa = quantize_rows_ref(to_blocks(x, layout).reshape(-1, 256))
    qw, sw = jax.vmap(quantize_blocks_ref)(w)
    used = int(layout.used_blocks)
    got = grouped_block_scaled_matmul(qa, sa, qw, sw, layout.expert_B, layout.used_blocks, **variant)
    want = grouped_block_scaled_matmul_ref(qa, sa, qw, sw, layout.expert_B)
    assert_summation_order_only(got[:used * 128], want[:used * 128])
    if variant.get("platform") == "cpu":  # the TPU variant skips padding-only blocks: they are zeros
        assert used < layout.expert_B.shape[0] and not np.any(np.asarray(got[used * 128:]))
    # Block b used expert_B[b]'s weights: its rows equal the dense reference with that weight.
    b = 2  # the second block of expert 2 (expert 0 fills block 0, expert 1 has none)
    dense = block_scaled_matmul_ref(qa[b * 128:(b + 1) * 128], sa[b * 128:(b + 1) * 128], qw[2], sw[2])
    assert int(layout.expert_B[b]) == 2
    assert_summation_order_only(got[b * 128:(b + 1) * 128], dense)


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
