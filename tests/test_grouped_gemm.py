"""The grouped expert GEMM: the 128-row block layout and the "blocked" implementation against
`jax.lax.ragged_dot` (values and gradients) and against a per-expert numpy loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.model.blocked_swiglu import blocked_swiglu
from dsv3_jax.model.grouped_gemm import ROWS, block_layout, from_blocks, grouped_matmul, to_blocks

SIZES = [0, 300, 1, 128, 0, 83]  # empty groups, a group of one, one exactly a block, one over two blocks


def _numpy_grouped(x, w, sizes):
    ends = np.cumsum(sizes)
    return np.concatenate([x[end - n:end] @ w[e] for e, (n, end) in enumerate(zip(sizes, ends))])


def test_block_layout_puts_each_expert_in_its_own_blocks():
    sizes = jnp.array(SIZES)
    layout = block_layout(sizes, sum(SIZES))
    dest = np.asarray(layout.destination_M)
    assert len(set(dest.tolist())) == len(dest)  # no two rows share a slot
    row_expert = np.repeat(np.arange(len(SIZES)), SIZES)
    np.testing.assert_array_equal(np.asarray(layout.expert_B)[dest // ROWS], row_expert)
    assert int(layout.used_blocks) == sum(-(-n // ROWS) for n in SIZES)  # 3 + 1 + 1 + 1
    assert layout.expert_B.shape[0] >= int(layout.used_blocks)
    x = jnp.arange(sum(SIZES) * 2.0).reshape(-1, 2)
    np.testing.assert_array_equal(from_blocks(to_blocks(x, layout), layout), x)


@pytest.mark.parametrize("impl", ["blocked", "ragged_dot"])
def test_grouped_matmul_matches_per_expert_loop_and_ragged_dot_grads(impl):
    M, K, N = sum(SIZES), 48, 40
    x = jax.random.normal(jax.random.key(0), (M, K))
    w = jax.random.normal(jax.random.key(1), (len(SIZES), K, N))
    sizes = jnp.array(SIZES, jnp.int32)
    y = grouped_matmul(x, w, sizes, impl)
    np.testing.assert_allclose(y, _numpy_grouped(np.asarray(x), np.asarray(w), SIZES), rtol=1e-5, atol=1e-4)
    r = jax.random.normal(jax.random.key(2), (M, N))
    loss = lambda fn: lambda x, w: jnp.sum(fn(x, w) * r)
    got = jax.grad(loss(lambda x, w: grouped_matmul(x, w, sizes, impl)), argnums=(0, 1))(x, w)
    want = jax.grad(loss(lambda x, w: jax.lax.ragged_dot(x, w, sizes)), argnums=(0, 1))(x, w)
    for g, h in zip(got, want):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(got[1][0], 0.0)  # empty groups get no weight gradient


def test_blocked_grouped_matmul_keeps_bf16_operands_and_jits():
    sizes = jnp.array([5, 0, 7], jnp.int32)
    x = jax.random.normal(jax.random.key(3), (12, 16)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(4), (3, 16, 8)).astype(jnp.bfloat16)
    fn = jax.jit(jax.grad(lambda x, w: jnp.sum(grouped_matmul(x, w, sizes, "blocked")), argnums=(0, 1)))
    dx, dw = fn(x, w)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    want = jax.grad(lambda x, w: jnp.sum(jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32)),
                    argnums=(0, 1))(x, w)
    np.testing.assert_allclose(dw.astype(np.float32), want[1].astype(np.float32), rtol=2e-2, atol=2e-2)


def test_unknown_impl_is_refused():
    # The function's own check, or (with the suite's shape checks on) its Literal annotation's.
    with pytest.raises((ValueError, TypeError), match=r"must be one of|Literal\['auto', 'ragged_dot', 'blocked'\]"):
        grouped_matmul(jnp.zeros((2, 2)), jnp.zeros((1, 2, 2)), jnp.array([2]), "dense")


@pytest.mark.parametrize("impl", ["blocked", "ragged_dot"])
def test_rows_past_the_groups_give_zeros_like_ragged_dot(impl):
    """Expert-parallel receive buffers end in padding rows that belong to no expert."""
    sizes = jnp.array([3, 0, 130], jnp.int32)
    x = jax.random.normal(jax.random.key(5), (200, 24))
    w = jax.random.normal(jax.random.key(6), (3, 24, 16))
    y = grouped_matmul(x, w, sizes, impl)
    np.testing.assert_allclose(y[:133], _numpy_grouped(np.asarray(x[:133]), np.asarray(w), [3, 0, 130]),
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(y[133:], 0.0)
    dx = jax.grad(lambda x: jnp.sum(grouped_matmul(x, w, sizes, impl) ** 2))(x)
    np.testing.assert_array_equal(dx[133:], 0.0)


def _gated_swiglu_by_ragged_dots(x, sizes, gate, w_gate, w_up, w_down):
    """eq. 12's g_i FFN_i(u): the gate applied to the expert's output."""
    dot = lambda a, w: jax.lax.ragged_dot(a, w, sizes, preferred_element_type=jnp.float32)
    return gate[:, None] * dot(jax.nn.silu(dot(x, w_gate)) * dot(x, w_up), w_down)


def test_fused_blocked_swiglu_matches_three_ragged_dots_with_gradients():
    """One loop over blocks for the whole gated SwiGLU (and one for its backward, the gates' gradient
    included: they are folded in before the down projection), against three `ragged_dot`s gated
    after it, differentiated by JAX; rows past the groups give zeros and get zero gradients."""
    sizes = jnp.array(SIZES, jnp.int32)
    M, D, F = sum(SIZES) + 20, 48, 40
    k = jax.random.split(jax.random.key(7), 6)
    x = jax.random.normal(k[0], (M, D))
    w = [0.2 * jax.random.normal(key, shape) for key, shape in
         zip(k[1:4], [(len(SIZES), D, F), (len(SIZES), D, F), (len(SIZES), F, D)])]
    r = jax.random.normal(k[4], (M, D))
    gate = jax.random.uniform(k[5], (M,))
    loss = lambda fn: jax.jit(jax.value_and_grad(lambda x, g, *w: jnp.sum(fn(x, sizes, g, *w) * r),
                                                 argnums=(0, 1, 2, 3, 4)))
    got_loss, got = loss(blocked_swiglu)(x, gate, *w)
    want_loss, want = loss(_gated_swiglu_by_ragged_dots)(x, gate, *w)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for g, h in zip(got, want):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-5 * float(jnp.abs(h).max()))
    np.testing.assert_array_equal(blocked_swiglu(x, sizes, gate, *w)[sum(SIZES):], 0.0)
    np.testing.assert_array_equal(got[0][sum(SIZES):], 0.0)
    np.testing.assert_array_equal(got[1][sum(SIZES):], 0.0)
    np.testing.assert_array_equal(got[2][0], 0.0)  # an empty expert gets no weight gradient


def test_fused_blocked_swiglu_in_fp8_equals_three_blocked_fp8_gemms():
    """With FP8 the fused loop runs the same per-block e4m3 GEMMs as three grouped GEMMs would."""
    sizes = jnp.array([200, 0, 56], jnp.int32)
    k = jax.random.split(jax.random.key(8), 4)
    x = jax.random.normal(k[0], (256, 128))
    w_gate, w_up = (0.1 * jax.random.normal(key, (3, 128, 128)) for key in k[1:3])
    w_down = 0.1 * jax.random.normal(k[3], (3, 128, 128))
    grouped = lambda a, w: grouped_matmul(a, w, sizes, "blocked", "xla")
    gate = jax.random.uniform(jax.random.key(9), (256,))
    want = grouped(gate[:, None] * jax.nn.silu(grouped(x, w_gate)) * grouped(x, w_up), w_down)
    got = blocked_swiglu(x, sizes, gate, w_gate, w_up, w_down, "xla")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(jnp.abs(want).max()))


def test_fp8_cached_swiglu_keeps_e4m3_tiles_and_gives_the_uncached_gradients():
    """§3.3.4 for the routed experts: the backward keeps the input rows and the SwiGLU's gate and up
    products as e4m3 1x128 tiles with fp32 scales, none of them in fp32, and its gradients are the
    uncached ones up to that rounding (DeepGEMM's relative difference, 1 - 2<a,b> / (|a|^2 + |b|^2))."""
    sizes = jnp.array([200, 0, 56], jnp.int32)
    k = jax.random.split(jax.random.key(8), 5)
    x = jax.random.normal(k[0], (256, 128))
    w = [0.1 * jax.random.normal(key, (3, 128, 128)) for key in k[1:4]]
    gate = jax.random.uniform(k[4], (256,))
    run = lambda cached: jax.vjp(lambda x, g, *w: blocked_swiglu(x, sizes, g, *w, "xla", cached), x, gate, *w)
    (_, vjp_cached), (_, vjp_plain) = run(jnp.float32), run(None)
    kept = [(leaf.shape, jnp.dtype(leaf.dtype)) for leaf in jax.tree.leaves(vjp_cached)]
    e4m3 = [shape for shape, dtype in kept if dtype == jnp.float8_e4m3fn]
    assert len(e4m3) == 3 and all(shape[-1] == 128 for shape in e4m3), kept
    # exactly the three fp32 [blocks, rows, 128] arrays replaced by 1 + 4/128 bytes a value
    kept_bytes = lambda vjp: sum(leaf.nbytes for leaf in jax.tree.leaves(vjp))
    values = sum(math.prod(shape) for shape in e4m3)
    assert kept_bytes(vjp_plain) - kept_bytes(vjp_cached) == values * (4 - 1 - 4 / 128), kept
    dy = jax.random.normal(jax.random.key(9), (256, 128))
    for name, got, want in zip(("dx", "dgate", "dw_gate", "dw_up", "dw_down"), vjp_cached(dy), vjp_plain(dy)):
        a, b = np.asarray(got, np.float64), np.asarray(want, np.float64)
        diff = 1 - 2 * np.sum(a * b) / (np.sum(a * a) + np.sum(b * b))
        assert diff < 1e-2, (name, diff)  # measured <= 2.2e-3 (dw_up: two roundings of its operands)
