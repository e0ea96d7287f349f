"""Each router and balancer of the routing lab: its defining property, and a train step with it."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import Config, ConfigError, TrainConfig
from dsv3_jax.model.routing import (BALANCERS, ROUTERS, GlobalAuxLoss, ProportionalBiasBalancer, RouterZLoss,
                                    SignBiasBalancer, check_routing, chosen_mask, expert_load)
from dsv3_jax.train.state import create_train_state
from dsv3_jax.train.step import make_train_step
from tests.conftest import cli_env, tiny_model_config

N, E = 48, 8


def _logits(seed=0):
    return jax.random.normal(jax.random.key(seed), (N, E)) * 2


def _run(name, **cfg_changes):
    cfg = tiny_model_config(router=name, **cfg_changes)
    return ROUTERS[name]()(_logits(), jnp.zeros(E), jnp.arange(N) % 13, cfg), cfg


def test_expert_choice_gives_every_expert_exactly_its_capacity():
    routing, cfg = _run("expert_choice", n_group=1, topk_group=1)
    capacity = N * cfg.top_k // E
    np.testing.assert_array_equal(expert_load(routing, E), capacity)
    # Each expert's tokens are its top-capacity tokens by probability.
    probs = jax.nn.softmax(_logits(), axis=-1)
    for e in range(E):
        mine = np.sort(np.asarray(routing.token_M[routing.expert_M == e]))
        assert set(mine) == set(np.argsort(-np.asarray(probs[:, e]))[:capacity])


def test_switch_router_is_softmax_top_k_renormalised():
    routing, cfg = _run("switch", n_group=1, topk_group=1)
    probs = jax.nn.softmax(_logits(), axis=-1)
    top_vals, top_idx = jax.lax.top_k(probs, cfg.top_k)
    np.testing.assert_array_equal(routing.expert_M.reshape(N, -1), top_idx)
    np.testing.assert_allclose(routing.gate_M.reshape(N, -1), top_vals / top_vals.sum(-1, keepdims=True), rtol=1e-6)


def test_deepseek_v2_router_softmax_device_limited():
    routing, cfg = _run("deepseek_v2", n_group=4, topk_group=1, routed_scaling_factor=1.0)
    probs = np.asarray(jax.nn.softmax(_logits(), axis=-1))
    groups = np.asarray(routing.expert_M.reshape(N, -1)) // 2
    best_group = probs.reshape(N, 4, 2).max(-1).argmax(-1)
    np.testing.assert_array_equal(groups, np.repeat(best_group[:, None], cfg.top_k, 1))  # all in the max group
    np.testing.assert_allclose(routing.gate_M.reshape(N, -1),
                               np.take_along_axis(probs, np.asarray(routing.expert_M.reshape(N, -1)), 1), rtol=1e-6)


def test_hash_router_depends_only_on_the_token_id_and_gets_no_gradient():
    cfg = tiny_model_config(router="hash")
    ids = jnp.array([3, 5, 3, 7, 5, 3])
    a = ROUTERS["hash"]()(_logits(0)[:6], jnp.zeros(E), ids, cfg)
    b = ROUTERS["hash"]()(_logits(1)[:6], jnp.zeros(E), ids, cfg)
    np.testing.assert_array_equal(a.expert_M, b.expert_M)
    experts = np.asarray(a.expert_M).reshape(6, -1)
    assert all(len(set(row)) == cfg.top_k for row in experts)
    np.testing.assert_array_equal(experts[0], experts[2])
    g = jax.grad(lambda l: ROUTERS["hash"]()(l, jnp.zeros(E), ids, cfg).gate_M.sum())(_logits()[:6])
    np.testing.assert_array_equal(g, 0.0)


def test_sign_and_proportional_bias_updates():
    bias = jnp.zeros((1, 4))
    load = jnp.array([[10.0, 2.0, 4.0, 4.0]])  # mean 5: expert 0 overloaded, the rest under
    np.testing.assert_allclose(SignBiasBalancer().bias_update(bias, load, 0.1), [[-0.1, 0.1, 0.1, 0.1]])
    np.testing.assert_allclose(ProportionalBiasBalancer().bias_update(bias, load, 0.1),
                               [[-0.1, 0.06, 0.02, 0.02]], rtol=1e-6)


def test_z_loss_matches_its_formula():
    routing, cfg = _run("deepseek_v3", n_group=1, topk_group=1)
    lse = np.log(np.exp(np.asarray(_logits(), np.float64)).sum(-1))
    np.testing.assert_allclose(RouterZLoss().loss(routing, 1, N, cfg), np.mean(lse ** 2), rtol=1e-5)


def test_global_aux_loss_formula_and_its_minimum():
    routing, cfg = _run("switch", n_group=1, topk_group=1)
    probs = np.asarray(jax.nn.softmax(_logits(), -1))
    f = np.bincount(np.asarray(routing.expert_M), minlength=E) / (N * cfg.top_k)
    np.testing.assert_allclose(GlobalAuxLoss().loss(routing, 1, N, cfg), E * np.sum(f * probs.mean(0)), rtol=1e-5)
    balanced, _ = _run("expert_choice", n_group=1, topk_group=1)
    uniform = balanced._replace(scores_NE=jnp.full((N, E), 1.0 / E))
    np.testing.assert_allclose(GlobalAuxLoss().loss(uniform, 1, N, cfg), 1.0, rtol=1e-6)


def test_expert_choice_can_leave_tokens_without_an_expert():
    # Every token prefers expert 0; experts 1..7 all rank tokens alike, so they pick the same ones.
    per_token_N = jax.random.normal(jax.random.key(3), (N, 1))
    logits = jnp.concatenate([jnp.full((N, 1), 5.0), jnp.broadcast_to(per_token_N, (N, E - 1))], axis=1)
    cfg = tiny_model_config(router="expert_choice", n_group=1, topk_group=1)
    routing = ROUTERS["expert_choice"]()(logits, jnp.zeros(E), jnp.zeros(N, jnp.int32), cfg)
    covered = np.asarray(chosen_mask(routing, N, E)).max(-1)
    assert covered.sum() <= 2 * N * cfg.top_k // E  # at most expert 0's and the others' shared picks


def test_unknown_router_or_balancer_is_a_config_error():
    with pytest.raises(ConfigError, match="model.router='nope': unknown router 'nope'; registered: .*deepseek_v3"):
        check_routing(tiny_model_config(router="nope"))
    with pytest.raises(ConfigError, match="model.balancer='bogus'"):
        check_routing(tiny_model_config(balancer="aux_free+bogus"))


ALL_BALANCERS = "+".join(b for b in sorted(BALANCERS) if ":" not in b and b not in ("none", "aux_free"))


@pytest.mark.parametrize("router, balancer", [(r, "aux_free") for r in sorted(ROUTERS) if ":" not in r] +
                         [("deepseek_v3", "none"), ("deepseek_v3", ALL_BALANCERS)])
def test_every_router_and_balancer_trains_through_the_same_step(router, balancer):
    model_cfg = tiny_model_config(router=router, balancer=balancer, n_layers=1, first_k_dense=0, mtp_depth=0,
                                  n_group=1, topk_group=1)
    config = Config(model=model_cfg, train=TrainConfig(steps=5, batch_size=2, seq_len=16, bias_gamma=0.05,
                                                       balance_alpha=0.1))
    graphdef, optimizer, state = create_train_state(config, 0)
    step = jax.jit(make_train_step(config, graphdef, optimizer))
    tokens = jax.random.randint(jax.random.key(0), (2, 17), 0, model_cfg.vocab_size)
    bias_before = jax.tree.leaves(state.routing_bias)[0]
    state, metrics = step(state, tokens)
    state, metrics = step(state, tokens)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    moved = not np.allclose(jax.tree.leaves(state.routing_bias)[0], bias_before)
    updates_bias = any(BALANCERS[b]().bias_update(jnp.zeros((1, 2)), jnp.array([[1.0, 3.0]]), 1.0) is not None
                       for b in balancer.split("+"))
    # Expert choice loads every expert exactly to capacity, so a load-driven bias never moves.
    assert moved == (updates_bias and router != "expert_choice")
    probe, probe_cfg = _run("deepseek_v3", n_group=1, topk_group=1)
    has_loss = any(BALANCERS[b]().loss(probe, 1, N, probe_cfg) is not None for b in balancer.split("+"))
    assert (float(metrics["balance_loss"]) > 0) == has_loss


def test_a_new_router_from_the_readme_works_with_dsv3_train(tmp_path):
    (tmp_path / "my_routers.py").write_text(textwrap.dedent('''
        import jax, jax.numpy as jnp
        from dsv3_jax.model.routing import register_router, token_choice

        @register_router("top1_plus_random")
        class Top1PlusRandom:
            """Best expert by sigmoid score, plus one chosen by a hash of the token id."""

            def __call__(self, logits_NE, bias_E, token_ids_N, cfg):
                scores_NE = jax.nn.sigmoid(logits_NE)
                best_N = jnp.argmax(scores_NE + bias_E, axis=-1)
                other_N = (best_N + 1 + token_ids_N % (cfg.n_routed_experts - 1)) % cfg.n_routed_experts
                idx_NK = jnp.stack([best_N, other_N], axis=-1)
                gates_NK = jnp.take_along_axis(scores_NE, idx_NK, axis=-1)
                return token_choice(idx_NK, gates_NK, scores_NE, logits_NE)
    '''))
    env = cli_env(PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "dsv3_jax.cli", "train", "--steps", "3", "--data", "synthetic",
                          "--quiet", "--run-dir", str(tmp_path / "run"), "--set", "model.router=my_routers:top1_plus_random",
                          "--set", "model.top_k=2", "--set", "model.n_layers=2", "--set", "model.vocab_size=384",
                          "--set", "train.batch_size=2", "--set", "train.seq_len=32"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 3
