import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dsv3_jax.config import TrainConfig
from dsv3_jax.model.model import DeepSeekV3
from dsv3_jax.model.routing import Balancing, RoutingBias
from dsv3_jax.train.loss import total_loss
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def model_and_fn(tiny_cfg):
    model = DeepSeekV3(tiny_cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    return tiny_cfg, model, state, forward


def test_shapes_and_stats(model_and_fn):
    cfg, model, state, forward = model_and_fn
    out = forward(state, jnp.zeros((2, 12), jnp.int32))
    assert out.logits_BTV.shape == (2, 12, cfg.vocab_size) and out.logits_BTV.dtype == jnp.float32
    assert out.mtp_logits_PBTV.shape == (cfg.mtp_depth, 2, 12, cfg.vocab_size)
    n_moe = cfg.n_layers - cfg.first_k_dense
    assert out.stats.moe_layers.expert_load.shape == (n_moe, cfg.n_routed_experts)
    np.testing.assert_array_equal(out.stats.moe_layers.expert_load.sum(-1), 2 * 12 * cfg.top_k)
    assert out.stats.mtp.expert_load.shape == (cfg.mtp_depth, cfg.n_routed_experts)


def test_weights_carry_logical_axes_and_bias_is_not_a_param(model_and_fn):
    cfg, model, state, _ = model_and_fn
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var.get_value().ndim, path
    biases = nnx.to_flat_state(nnx.state(model, RoutingBias))
    assert len(biases) == 2  # MoE stack [L, E] and MTP stack [P, E]
    assert all(not isinstance(v, nnx.Param) for _, v in biases)
    # The MoE stack is what a pipeline cuts into stages (stored over `pipeline`); the others are plain stacks.
    assert model.moe_layers.ffn.w_gate_EDF.get_metadata()["logical_axes"] == ("stage_layers", "expert", "stage_embed",
                                                                              "moe_ffn")
    assert model.dense_layers.ffn.gate.kernel.get_metadata()["logical_axes"][0] == "layers"


def test_causality_main_and_mtp_heads(model_and_fn):
    cfg, _, state, forward = model_and_fn
    tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, cfg.vocab_size)
    t = 9
    changed = tokens.at[0, t].set((tokens[0, t] + 1) % cfg.vocab_size)
    a, b = forward(state, tokens), forward(state, changed)
    np.testing.assert_array_equal(a.logits_BTV[:, :t], b.logits_BTV[:, :t])
    assert not np.allclose(a.logits_BTV[:, t:], b.logits_BTV[:, t:])
    for k in range(1, cfg.mtp_depth + 1):
        # depth k at position i reads tokens up to i + k: positions < t - k must not move.
        np.testing.assert_array_equal(a.mtp_logits_PBTV[k - 1, :, :t - k], b.mtp_logits_PBTV[k - 1, :, :t - k])
        assert not np.allclose(a.mtp_logits_PBTV[k - 1, :, t - k], b.mtp_logits_PBTV[k - 1, :, t - k])


def test_dense_only_and_no_mtp_configs_run():
    forward = nnx.jit(lambda model, tokens: model(tokens))  # one compile, not one per eager op
    cfg = tiny_model_config(first_k_dense=2, n_layers=2, mtp_depth=0)
    out = forward(DeepSeekV3(cfg, nnx.Rngs(0)), jnp.zeros((1, 4), jnp.int32))
    assert out.mtp_logits_PBTV is None and out.stats == (None, None)
    cfg = tiny_model_config(first_k_dense=0, n_layers=2, q_lora_rank=0, score_func="softmax", n_group=1, topk_group=1)
    out = forward(DeepSeekV3(cfg, nnx.Rngs(0)), jnp.zeros((1, 4), jnp.int32))
    assert out.stats.moe_layers.expert_load.shape == (2, cfg.n_routed_experts)


def test_overfits_one_batch(tiny_cfg):
    model = DeepSeekV3(tiny_cfg, nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(5), (4, 17), 0, tiny_cfg.vocab_size)
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)
    balancing = Balancing.from_config(tiny_cfg, TrainConfig(balance_alpha=1e-4))

    def loss_fn(p):
        out = nnx.merge(graphdef, p, rest)(tokens[:, :-1])
        return total_loss(out.logits_BTV, out.mtp_logits_PBTV, out.stats, tokens, 0.3, balancing).total

    @jax.jit
    def step(p, o):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, o = opt.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    losses = []
    for _ in range(60):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_bfloat16_compute_tracks_float32(tiny_cfg):
    import dataclasses

    tokens = jax.random.randint(jax.random.key(7), (2, 16), 0, tiny_cfg.vocab_size)
    logits = nnx.jit(lambda model, tokens: model(tokens).logits_BTV)  # one compile, not one per eager op
    f32 = logits(DeepSeekV3(tiny_cfg, nnx.Rngs(0)), tokens)
    bf16_cfg = dataclasses.replace(tiny_cfg, dtype="bfloat16")
    bf16 = logits(DeepSeekV3(bf16_cfg, nnx.Rngs(0)), tokens)
    assert bf16.dtype == jnp.float32  # logits are promoted for the softmax
    x, y = np.asarray(f32, np.float64), np.asarray(bf16, np.float64)
    assert 1 - 2 * np.sum(x * y) / (np.sum(x * x) + np.sum(y * y)) < 1e-2
