"""Expert parallelism with explicit dispatch (parallel/expert.py: all-to-all, ring) equals the
single-device MoE: outputs and gradients of the routed experts, and a whole train step, on 8 host devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import Config, ConfigError, MeshConfig, TrainConfig
from dsv3_jax.model.moe import MoE, grouped_swiglu, routed_experts
from dsv3_jax.parallel.expert import expert_parallel_routed_experts
from dsv3_jax.parallel.mesh import make_mesh
from dsv3_jax.parallel.sharding import RULES
from dsv3_jax.train.state import create_train_state
from dsv3_jax.train.step import make_train_step
from tests.conftest import tiny_model_config

pytestmark = pytest.mark.multidevice


def _needs_8():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (host) devices")


@pytest.mark.parametrize("dispatch,sizes", [("a2a", dict(data=2, expert=4)), ("a2a", dict(expert=2, tensor=2, fsdp=2)),
                                            ("ring", dict(data=2, expert=4)), ("ring", dict(expert=2, tensor=2, fsdp=2))])
def test_expert_parallel_dispatch_equals_local_experts_with_gradients(dispatch, sizes):
    _needs_8()
    cfg = tiny_model_config(n_routed_experts=8, top_k=3, n_group=1, topk_group=1)
    moe = MoE(cfg, nnx.Rngs(0))
    # Skewed routing: experts 0 and 5 take most assignments, so one rank receives far more rows.
    moe.router.bias_E[...] = jnp.array([3.0, 0, 0, 0, 0, 2.0, 0, -1.0])
    x_ND = jax.random.normal(jax.random.key(1), (64, cfg.d_model))
    routing, _ = moe.router(x_ND.reshape(8, 8, -1))
    expert_NK, gate_NK = routing.expert_M.reshape(64, 3), routing.gate_M.reshape(64, 3)
    weights = (moe.w_gate_EDF[...], moe.w_up_EDF[...], moe.w_down_EFD[...])
    mesh = make_mesh(MeshConfig(**sizes))
    r_ND = jax.random.normal(jax.random.key(2), (64, cfg.d_model))

    def loss_local(x, *w):
        return jnp.sum(routed_experts(x, routing, *w) * r_ND)

    def loss_ep(x, *w):
        return jnp.sum(expert_parallel_routed_experts(x, expert_NK, gate_NK, *w, mesh, dispatch, grouped_swiglu) * r_ND)

    want_y = routed_experts(x_ND, routing, *weights)
    want_g = jax.grad(loss_local, argnums=(0, 1, 2, 3))(x_ND, *weights)
    with jax.set_mesh(mesh):
        ep = jax.jit(lambda x, *w: expert_parallel_routed_experts(x, expert_NK, gate_NK, *w, mesh, dispatch,
                                                                  grouped_swiglu))
        got_y = ep(x_ND, *weights)
        got_g = jax.jit(jax.grad(loss_ep, argnums=(0, 1, 2, 3)))(x_ND, *weights)
        hlo = ep.lower(x_ND, *weights).compile().as_text()
    assert ("all-to-all" if dispatch == "a2a" else "reduce-scatter") in hlo
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
    for g, h in zip(got_g, want_g):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)


def test_train_step_with_all_to_all_dispatch_equals_unsharded():
    _needs_8()
    model = tiny_model_config(n_routed_experts=8)
    config = Config(model=model, train=TrainConfig(batch_size=8, seq_len=16, warmup_steps=1))
    graphdef, optimizer, state = create_train_state(config, 0)
    tokens = jax.random.randint(jax.random.key(0), (8, 17), 0, model.vocab_size)
    want_state, want = jax.jit(make_train_step(config, graphdef, optimizer))(state, tokens)

    ep_config = dataclasses.replace(config, model=dataclasses.replace(model, expert_dispatch="a2a"))
    graphdef, optimizer, state = create_train_state(ep_config, 0)
    mesh = make_mesh(MeshConfig(data=2, expert=2, tensor=2))
    shardings = RULES.tree(state, mesh)
    step = jax.jit(make_train_step(ep_config, graphdef, optimizer), in_shardings=(shardings, RULES.batch(mesh)),
                   out_shardings=(shardings, None))
    with jax.set_mesh(mesh):
        assert "stablehlo.all_to_all" in step.lower(state, tokens).as_text()
        got_state, got = step(jax.device_put(state, shardings), tokens)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["expert_load"], want["expert_load"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got_state.params,
                 want_state.params)


def test_explicit_dispatch_needs_a_token_choice_router():
    with pytest.raises(ConfigError, match="expert_dispatch=ring needs a token-choice router"):
        tiny_model_config(expert_dispatch="ring", router="expert_choice")
