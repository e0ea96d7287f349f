import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.model.layers import attention_mask, dot_product_attention
from dsv3_jax.model.mla import MLA
from dsv3_jax.model.rope import inv_frequencies, rope_tables, softmax_scale
from tests.conftest import tiny_model_config


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope_np(x, pos, inv_freq):
    """Interleaved rotation via complex numbers, as DeepSeek's reference does."""
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * np.exp(1j * pos[:, None] * inv_freq).reshape((len(pos),) + (1,) * (x.ndim - 2) + (-1,))
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def _mla_np(m: MLA, cfg, x):
    """Eq. 1-11 for one sequence, with per-head keys [k_C; k_R] and queries [q_C; q_R] assembled."""
    T = x.shape[0]
    W = lambda lin: np.asarray(lin.kernel[...], np.float64)
    pos = np.arange(T, dtype=np.float64)
    inv_freq = inv_frequencies(cfg)
    if cfg.q_lora_rank:
        c_q = _rms(x @ W(m.w_dq), np.asarray(m.q_norm.scale[...]), cfg.norm_eps)  # eq. 6
        q = np.einsum("tq,qhk->thk", c_q, W(m.w_uq))
    else:
        q = np.einsum("td,dhk->thk", x, W(m.w_q))
    q_c, q_r = q[..., :cfg.qk_nope_dim], _rope_np(q[..., cfg.qk_nope_dim:], pos, inv_freq)  # eq. 7-8
    kv = x @ W(m.w_dkv)
    c_kv = _rms(kv[:, :cfg.kv_lora_rank], np.asarray(m.kv_norm.scale[...]), cfg.norm_eps)  # eq. 1
    k_r = _rope_np(kv[:, cfg.kv_lora_rank:], pos, inv_freq)  # eq. 3
    k_c = np.einsum("tc,chn->thn", c_kv, W(m.w_uk))  # eq. 2
    v = np.einsum("tc,chv->thv", c_kv, W(m.w_uv))  # eq. 5
    H = cfg.n_heads
    q_full = np.concatenate([q_c, q_r], -1)  # eq. 9
    k_full = np.concatenate([k_c, np.repeat(k_r[:, None], H, 1)], -1)  # eq. 4
    logits = np.einsum("thk,shk->hts", q_full, k_full) * softmax_scale(cfg)
    logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("hts,shv->thv", p, v)  # eq. 10
    return np.einsum("thv,hvd->td", o, W(m.w_o))  # eq. 11


# T = 300: three query chunks of causal attention (layers.CAUSAL_CHUNK = 128), the last one short.
@pytest.mark.parametrize("q_lora_rank, yarn, T", [(16, 1.0, 9), (0, 1.0, 9), (16, 8.0, 9), (16, 1.0, 300)])
def test_mla_matches_eq_1_to_11(q_lora_rank, yarn, T):
    cfg = tiny_model_config(q_lora_rank=q_lora_rank, yarn_factor=yarn, original_max_position=4)
    m = MLA(cfg, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, T, cfg.d_model))
    cos, sin = rope_tables(cfg, jnp.arange(T)[None])
    got = np.asarray(m(x, cos, sin))[0]
    np.testing.assert_allclose(got, _mla_np(m, cfg, np.asarray(x[0], np.float64)), rtol=1e-4, atol=1e-6)
    assert hasattr(m, "w_q") == (q_lora_rank == 0)


def test_mla_is_causal():
    cfg = tiny_model_config()
    m = MLA(cfg, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (1, 10, cfg.d_model))
    cos, sin = rope_tables(cfg, jnp.arange(10)[None])
    y0 = m(x, cos, sin)
    y1 = m(x.at[:, 6].add(1.0), cos, sin)
    np.testing.assert_array_equal(y0[:, :6], y1[:, :6])
    assert not np.allclose(y0[:, 6:], y1[:, 6:])


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MLA / MHA, GQA, MQA
def test_causal_chunks_give_the_gradients_of_the_full_score_matrix(kv_heads):
    """Chunked causal attention (queries skip the keys after their chunk) against the same attention
    over the whole masked score matrix, with packed segments, values and gradients, at T = 300; and
    shared K/V heads against each query head given its own copy of them."""
    B, T, H, K, V = 2, 300, 4, 12, 8
    k = jax.random.split(jax.random.key(5), 4)
    q = jax.random.normal(k[0], (B, T, H, K))
    kk, v = (jax.random.normal(key, (B, T, kv_heads, d)) for key, d in zip(k[1:3], (K, V)))
    segments = jnp.cumsum(jax.random.bernoulli(k[3], 0.01, (B, T)), axis=1)
    mask = attention_mask(T, segments)
    r = jax.random.normal(jax.random.key(6), (B, T, H, V))
    loss = lambda causal: jax.jit(jax.value_and_grad(  # jitted: one compile, not one per eager op
        lambda q, kk, v: jnp.sum(dot_product_attention(q, kk, v, mask, 0.3, causal) * r), argnums=(0, 1, 2)))
    (got, got_grads), (want, want_grads) = loss(True)(q, kk, v), loss(False)(q, kk, v)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    copies = lambda x: jnp.repeat(x, H // kv_heads, axis=2)  # query head h reads K/V head h // (H / G)
    attend = jax.jit(lambda kk, v: dot_product_attention(q, kk, v, mask, 0.3, True))
    np.testing.assert_allclose(attend(kk, v), attend(copies(kk), copies(v)), rtol=1e-5, atol=1e-6)
