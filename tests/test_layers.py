"""Hand-written VJPs of the basic layers against JAX's autodiff of the plain formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.model.layers import attention_mask, dot_product_attention, linear_product, masked_softmax


@pytest.mark.parametrize("x_shape, w_shape, n_in", [
    ((2, 5, 8), (8, 6), 1),        # a plain projection
    ((2, 5, 8), (8, 3, 4), 1),     # to heads (MLA's up-projections)
    ((2, 5, 3, 4), (3, 4, 8), 2),  # from heads (the output projection)
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_linear_product_vjp_is_jaxs(x_shape, w_shape, n_in, dtype):
    """Same products as JAX's rule for dot_general (fp32 accumulation, gradients in the operands'
    dtypes), only oriented differently: equal up to summation order."""
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, x_shape, dtype), jax.random.normal(kw, w_shape, dtype)
    contract = (tuple(range(len(x_shape) - n_in, len(x_shape))), tuple(range(n_in)))
    plain = lambda x, w: jax.lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=jnp.float32)
    dy = jax.random.normal(kd, plain(x, w).shape)
    got_y, got_vjp = jax.vjp(lambda x, w: linear_product(x, w, n_in), x, w)
    want_y, want_vjp = jax.vjp(plain, x, w)
    np.testing.assert_array_equal(got_y, want_y)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
    for got, want in zip(got_vjp(dy), want_vjp(dy)):
        assert got.dtype == want.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)


def _plain_attention(q, k, v, mask, scale):
    """softmax(scale q.k masked) v with K/V head h // (H / G) per query head, by JAX's autodiff."""
    H, G = q.shape[2], k.shape[2]
    k, v = jnp.repeat(k, H // G, axis=2), jnp.repeat(v, H // G, axis=2)
    probs = masked_softmax(scale * jnp.einsum("bthk,bshk->bhts", q, k), mask[:, None])
    return jnp.einsum("bhts,bshv->bthv", probs, v)


@pytest.mark.parametrize("kv_heads, causal, dtype", [
    (4, True, jnp.float32), (2, True, jnp.float32), (1, True, jnp.float32),  # MLA / MHA, GQA, MQA
    (4, False, jnp.float32), (2, False, jnp.float32), (1, False, jnp.float32),
    (4, True, jnp.bfloat16), (1, False, jnp.bfloat16),
])
def test_attention_vjp_is_the_plain_softmaxs(kv_heads, causal, dtype):
    """The recompute-from-log-sum-exp VJP of `dot_product_attention` against autodiff of the
    textbook formula: packed segments, T = 300 (three causal chunks), and one query row that sees
    no key at all (zeros out, zero gradients, no NaN). bf16: against the fp32 formula on the same
    bf16 inputs (scores and softmax stay fp32; products and gradients round to bf16)."""
    B, T, H, K, V = 2, 300, 4, 12, 8
    k = jax.random.split(jax.random.key(5), 5)
    q = jax.random.normal(k[0], (B, T, H, K))
    kk, v = (jax.random.normal(key, (B, T, kv_heads, d)) for key, d in zip(k[1:3], (K, V)))
    segments = jnp.cumsum(jax.random.bernoulli(k[3], 0.01, (B, T)), axis=1)
    mask = attention_mask(T, segments).at[1, 200].set(False)
    r = jax.random.normal(k[4], (B, T, H, V))
    q, kk, v = (a.astype(dtype) for a in (q, kk, v))
    loss = lambda f: jax.value_and_grad(
        lambda q, kk, v: jnp.sum(f(q, kk, v, mask, 0.3).astype(jnp.float32) * r), argnums=(0, 1, 2))
    got, got_grads = loss(lambda *a: dot_product_attention(*a, causal=causal))(q, kk, v)
    want, want_grads = loss(_plain_attention)(*(a.astype(jnp.float32) for a in (q, kk, v)))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == jnp.float32 else dict(rtol=3e-2, atol=3e-2)
    if dtype == jnp.float32:
        np.testing.assert_allclose(got, want, rtol=1e-5)
    else:  # elementwise: the summed loss cancels too much to compare at bf16's precision
        out = dot_product_attention(q, kk, v, mask, 0.3, causal)
        np.testing.assert_allclose(np.asarray(out, np.float32), _plain_attention(
            *(a.astype(jnp.float32) for a in (q, kk, v)), mask, 0.3), atol=3e-2)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == dtype and np.isfinite(np.asarray(g, np.float32)).all()
        np.testing.assert_allclose(np.asarray(g, np.float32), w, **tol)
    np.testing.assert_array_equal(got_grads[0][1, 200], 0.0)
