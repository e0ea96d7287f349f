"""MHA / GQA / MQA beside MLA (model.attention): the formula, cached decoding, cache bytes, config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import Config, ConfigError, MeshConfig, TrainConfig, apply_overrides, get_preset
from dsv3_jax.errors import UsageError
from dsv3_jax.infer.cache import bytes_per_token, init_caches
from dsv3_jax.infer.generate import _decode, generate, generate_speculative
from dsv3_jax.interop.hf import config_to_hf
from dsv3_jax.model.gqa import GroupedQueryAttention
from dsv3_jax.model.model import DeepSeekV3
from dsv3_jax.model.rope import inv_frequencies, rope_tables, softmax_scale
from dsv3_jax.parallel.mesh import make_mesh
from dsv3_jax.parallel.sharding import DEFAULT_RULES
from dsv3_jax.train.state import create_train_state
from dsv3_jax.train.step import make_loss_and_grads
from tests.conftest import need_devices, tiny_model_config
from tests.test_mla import _rope_np

VARIANTS = [("mha", 0, 4), ("gqa", 2, 2), ("mqa", 0, 1)]  # (attention, n_kv_heads, K/V heads with 4 query heads)


def _attention_np(m: GroupedQueryAttention, cfg, x):
    """Per query head h: softmax(q_h . k_{h // (H/G)}^T * scale) v_{h // (H/G)}, RoPE on each head's last R dims."""
    T, N = x.shape[0], cfg.qk_nope_dim
    W = lambda lin: np.asarray(lin.kernel[...], np.float64)
    pos, inv_freq = np.arange(T, dtype=np.float64), inv_frequencies(cfg)
    rope = lambda a: np.concatenate([a[..., :N], _rope_np(a[..., N:], pos, inv_freq)], -1)
    q = rope(np.einsum("td,dhk->thk", x, W(m.w_q)))
    k = rope(np.einsum("td,dgk->tgk", x, W(m.w_k)))
    v = np.einsum("td,dgv->tgv", x, W(m.w_v))
    H, G = q.shape[1], k.shape[1]
    k, v = np.repeat(k, H // G, axis=1), np.repeat(v, H // G, axis=1)  # query head h reads K/V head h // (H/G)
    logits = np.einsum("thk,shk->hts", q, k) * softmax_scale(cfg)
    logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("thv,hvd->td", np.einsum("hts,shv->thv", p, v), W(m.w_o))


@pytest.mark.parametrize("attention,n_kv_heads,kv_heads", VARIANTS)
def test_standard_attention_matches_its_formula(attention, n_kv_heads, kv_heads):
    cfg = tiny_model_config(n_heads=4, attention=attention, n_kv_heads=n_kv_heads)
    m = GroupedQueryAttention(cfg, nnx.Rngs(0))
    assert cfg.kv_heads == kv_heads and m.w_k.kernel.shape == (cfg.d_model, kv_heads, cfg.qk_head_dim)
    x = jax.random.normal(jax.random.key(1), (1, 9, cfg.d_model))
    cos, sin = rope_tables(cfg, jnp.arange(9)[None])
    got = np.asarray(m(x, cos, sin))[0]
    np.testing.assert_allclose(got, _attention_np(m, cfg, np.asarray(x[0], np.float64)), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attention,n_kv_heads,kv_heads", VARIANTS)
def test_cached_decoding_matches_full_forward(attention, n_kv_heads, kv_heads):
    # YaRN on with a short original context, so decoding runs past it; MTP blocks use the variant too.
    cfg = tiny_model_config(n_heads=4, attention=attention, n_kv_heads=n_kv_heads, mtp_depth=1, yarn_factor=4.0,
                            original_max_position=8)
    model = DeepSeekV3(cfg, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 20), 0, cfg.vocab_size)
    full = model(tokens).logits_BTV
    caches = init_caches(cfg, 2, 24, "absorbed", jnp.float32)
    assert caches["moe"][0].shape == (cfg.n_moe_layers, 2, 24, kv_heads, cfg.qk_head_dim)
    graphdef, state = nnx.split(model)
    logits, _, caches = _decode(graphdef, state, caches, tokens[:, :7], jnp.broadcast_to(jnp.arange(7), (2, 7)),
                                "absorbed")
    steps = [logits]
    for t in range(7, 20):
        logits, _, caches = _decode(graphdef, state, caches, tokens[:, t:t + 1], jnp.full((2, 1), t), "absorbed")
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-5)
    # Batched generation with prompts of different lengths, and MTP drafting, on the variant's cache.
    prompts = [[5, 17, 33, 2, 9], [4, 8]]
    batched = generate(model, prompts, max_new_tokens=8, cache_dtype=jnp.float32)
    assert batched == [generate(model, [p], max_new_tokens=8, cache_dtype=jnp.float32)[0] for p in prompts]
    spec, _ = generate_speculative(model, prompts[0], max_new_tokens=8, cache_dtype=jnp.float32)
    assert spec == batched[0]


def test_cache_bytes_per_token_follow_each_layout():
    """Measured from the (abstract) cache arrays of V3's shapes, against each layout's formula."""
    v3 = get_preset("deepseek-v3-671b").model
    L, H, K, Vh = v3.n_layers, v3.n_heads, v3.qk_head_dim, v3.v_head_dim
    expected = {("mla", 0): L * (v3.kv_lora_rank + v3.qk_rope_dim) * 2,  # 576 values: 70,272 B
                ("mha", 0): L * H * (K + Vh) * 2, ("gqa", 8): L * 8 * (K + Vh) * 2, ("mqa", 0): L * (K + Vh) * 2}
    for (attention, n_kv_heads), formula in expected.items():
        cfg = dataclasses.replace(v3, attention=attention, n_kv_heads=n_kv_heads)
        abstract = jax.eval_shape(lambda: init_caches(cfg, 1, 128, "absorbed", jnp.bfloat16))
        assert bytes_per_token(abstract, 1, 128) == formula == L * cfg.kv_cache_values_per_token_per_layer * 2
    # Report §2.1.1: MLA's cache equals GQA with 2.25 groups (576 = 2.25 x 2 x 128 values).
    assert expected[("mla", 0)] * 71 < expected[("mha", 0)]


@pytest.mark.parametrize("changes,message", [
    (dict(attention="gqa"), r"model.n_kv_heads=0 must be a positive divisor of model.n_heads=4"),
    (dict(attention="gqa", n_kv_heads=3), r"model.n_kv_heads=3 must be a positive divisor"),
    (dict(attention="mha", n_kv_heads=2), r"model.n_kv_heads=2 is only used with model.attention=gqa"),
    (dict(attention="sliding"), r"model.attention='sliding' must be one of: mla, mha, gqa, mqa"),
])
def test_bad_attention_settings_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        tiny_model_config(n_heads=4, **changes)


def test_only_mla_exports_to_the_deepseek_layout():
    with pytest.raises(UsageError, match="model.attention='gqa' has no DeepSeek-V3 checkpoint layout"):
        config_to_hf(tiny_model_config(n_heads=4, attention="gqa", n_kv_heads=2))


@pytest.mark.parametrize("order", [1, -1])
def test_attention_and_its_kv_heads_can_be_set_in_either_order(order):
    overrides = ["model.attention=gqa", "model.n_kv_heads=2", "model.n_heads=4"][::order]
    model = apply_overrides(get_preset("tiny"), overrides).model
    assert (model.attention, model.kv_heads) == ("gqa", 2)


@pytest.mark.multidevice
def test_gqa_sharded_over_tensor_and_data_equals_unsharded():
    """Query heads split over `tensor`, the 2 K/V heads replicated (`kv_heads` maps to no axis)."""
    need_devices(8)
    config = Config(model=tiny_model_config(n_heads=4, attention="gqa", n_kv_heads=2),
                    train=TrainConfig(batch_size=4, seq_len=16))
    graphdef, _, state = create_train_state(config, 0)
    tokens = jax.random.randint(jax.random.key(0), (4, 17), 0, config.model.vocab_size)
    loss_and_grads = make_loss_and_grads(config, graphdef)
    (want_loss, _), want_grads = jax.jit(loss_and_grads)(state.params, state.routing_bias, tokens)
    mesh = make_mesh(MeshConfig(data=2, tensor=2, expert=2))
    shardings = DEFAULT_RULES.tree(state, mesh)
    state = jax.device_put(state, shardings)
    with jax.set_mesh(mesh):
        (loss, _), grads = jax.jit(loss_and_grads, in_shardings=(shardings.params, shardings.routing_bias,
                                                                 DEFAULT_RULES.batch(mesh)))(state.params, state.routing_bias,
                                                                                     tokens)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(want_grads))  # numpy: no compile per leaf
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale), grads, want_grads)
    w_q = state.params["moe_layers"]["attn"]["w_q"]["kernel"].get_value()
    assert not w_q.sharding.is_fully_replicated
    assert state.params["moe_layers"]["attn"]["w_k"]["kernel"].get_value().sharding.is_fully_replicated
