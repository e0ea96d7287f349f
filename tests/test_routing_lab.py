"""Each router and balancer of the routing lab: its defining property, and a train step with it."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import Config, ConfigError, TrainConfig
from dsv3_jax.model.routing import (BALANCERS, ROUTERS, Balancing, GlobalAuxLoss, ProportionalBiasBalancer, register_router,
                                    RouterZLoss, SignBiasBalancer, check_balancer, check_routing, chosen_mask,
                                    expert_load, router_for, token_choice)
from dsv3_jax.parallel.sharding import per_batch_shard
from dsv3_jax.train.state import create_train_state
from dsv3_jax.train.step import make_train_step
from tests.conftest import cli_env, need_devices, tiny_model_config

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


def _readme_plugin() -> str:
    """The README's "Prototype a router" file, verbatim, plus a balancer with a misspelled method."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**Prototype a router**"):]
    code = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]
    return code + textwrap.dedent('''

        @register_balancer("misspelled")
        class Misspelled:
            def coefficient(self, train):
                return 1.0

            def bias_updat(self, bias_LE, load_LE, rate):
                return bias_LE
    ''')


PLUGIN = _readme_plugin()
TINY_CLI = ["--data", "synthetic", "--quiet", "--set", "model.top_k=2", "--set", "model.n_layers=2",
            "--set", "model.vocab_size=384", "--set", "train.batch_size=2", "--set", "train.seq_len=32"]


def test_a_plugin_router_with_its_own_hyperparameter_and_a_loss_only_balancer_train_through_the_cli(tmp_path):
    (tmp_path / "my_routers.py").write_text(PLUGIN)
    env = cli_env(PYTHONPATH=str(tmp_path))
    run = tmp_path / "run"
    args = ["3", "--set", "train.eval_every=1", "--set", "model.router=my_routers:softmax_temp",
            "--set", "model.router_args.temperature=0.5",
            "--set", "model.balancer=aux_free+my_routers:load_entropy",
            "--set", "model.balancer_args.load_entropy.alpha=0.25", *TINY_CLI]
    out = subprocess.run([sys.executable, "-m", "dsv3_jax.cli", "train", "--run-dir", str(run), "--steps", *args],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    # Each balancer's coefficient and term by name; the loss-only one is the whole balance loss.
    term = "balance/my_routers:load_entropy"
    assert all(r["coefficient/my_routers:load_entropy"] == 0.25 and r["coefficient/aux_free"] == pytest.approx(1e-2)
               for r in records)
    assert all(r[term] > 0 and r[term] == pytest.approx(r["balance_loss"], rel=1e-6) for r in records)
    assert "balance/aux_free" not in records[0]  # a bias-only balancer has no loss term
    saved = json.loads((run / "config.json").read_text())["model"]
    assert saved["router_args"] == [["temperature", 0.5]] and saved["balancer_args"] == [["load_entropy.alpha", 0.25]]
    # router.jsonl: per layer (1 MoE layer) the loads, MaxVio and load entropy of each step.
    router = [json.loads(line) for line in (run / "router.jsonl").read_text().splitlines()]
    load = np.array(router[-1]["expert_load"][0])
    assert router[-1]["max_vio"][0] == pytest.approx(load.max() / load.mean() - 1)
    share = load[load > 0] / load.sum()
    assert router[-1]["load_entropy"][0] == pytest.approx(-np.sum(share * np.log(share)))
    # Evaluations at steps 1, 2, 3: from the second on, the fraction of validation tokens whose
    # experts changed since the previous one (from the signatures that evaluation left).
    assert "topk_changed" not in router[0] and "val_topk_changed" not in records[0]
    signatures = {step: np.load(run / "routing_signatures" / f"{step}.npy") for step in (2, 3)}
    changed = np.mean(signatures[2] != signatures[3], axis=-1)
    assert router[-1]["topk_changed"] == pytest.approx(changed.tolist()) and records[-1]["val_topk_changed"] == \
        pytest.approx(changed.mean())

    # The router's learned temperature is a parameter of the model: stopped after 2 steps and
    # resumed, the run's third step is the uninterrupted run's.
    resumed = tmp_path / "resumed"
    for steps, more in (("2", []), ("3", ["--resume"])):
        out = subprocess.run([sys.executable, "-m", "dsv3_jax.cli", "train", "--steps", steps, "--run-dir", str(resumed),
                              *more, *args[1:]], capture_output=True, text=True,
                             env=env, timeout=300)
        assert out.returncode == 0, out.stderr
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [1, 2, 3] and again[-1]["loss"] == records[-1]["loss"]
    # ... and the resumed run compares its step-3 routing with the same step-2 evaluation.
    again_router = [json.loads(line) for line in (resumed / "router.jsonl").read_text().splitlines()]
    assert again_router[-1]["topk_changed"] == router[-1]["topk_changed"]


@pytest.mark.parametrize("overrides, message", [
    (["model.balancer=aux_free+my_routers:misspelled"],
     "model.balancer='my_routers:misspelled': balancer 'my_routers:misspelled' defines bias_updat, which a balancer does not call"),
    (["model.router=my_routers:softmax_temp", "model.router_args.temprature=0.5"],
     "model.router_args.temprature: router 'my_routers:softmax_temp' has no hyperparameter 'temprature'; its Args: temperature"),
    (["model.router=my_routers:softmax_temp", "model.router_args.temperature=hot"],
     "model.router_args.temperature='hot': router 'my_routers:softmax_temp' declares it float"),
    (["model.balancer_args.sequence_los.alpha=1"], "model.balancer_args.sequence_los.alpha: 'sequence_los' is not one of"),
])
def test_a_plugin_that_breaks_its_contract_is_one_line_and_exit_2_before_any_compile(tmp_path, overrides, message):
    (tmp_path / "my_routers.py").write_text(PLUGIN)
    run = tmp_path / "run"
    args = [a for o in overrides for a in ("--set", o)]
    out = subprocess.run([sys.executable, "-m", "dsv3_jax.cli", "train", "--steps", "3", "--run-dir", str(run),
                          *args, *TINY_CLI], capture_output=True, text=True, env=cli_env(PYTHONPATH=str(tmp_path)),
                         timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()  # nothing ran


def test_a_bias_only_or_loss_only_balancer_needs_no_stub_of_the_other_method():
    class LossOnly:
        def coefficient(self, train):
            return 1.0

        def loss(self, routing, batch, seq, cfg):
            return jnp.zeros(())

    class Nothing:
        def coefficient(self, train):
            return 1.0

    check_balancer("loss_only", LossOnly())
    balancing = Balancing((("loss_only", LossOnly(), 1.0),))
    np.testing.assert_array_equal(balancing.update_bias(jnp.ones((1, 4)), jnp.ones((1, 4))), 1.0)  # no bias step
    with pytest.raises(ConfigError, match="neither loss.*nor bias_update"):
        check_balancer("nothing", Nothing())


def test_plugin_hyperparameters_parse_merge_and_survive_config_json():
    from dsv3_jax.config import apply_overrides, config_from_json, get_preset

    config = apply_overrides(get_preset("tiny"), ["model.router_args.temperature=0.5", "model.router_args.hard=true",
                                                  "model.balancer_args.pkg.mod:ent.alpha=2", "model.router_args.temperature=0.7"])
    assert config.model.router_args == (("temperature", 0.7), ("hard", True))  # a later value wins
    assert config.model.args_of_balancer("pkg.mod:ent") == (("alpha", 2),)
    assert config.model.args_of_balancer("other.mod:ent") == ()  # another module's "ent"
    assert config_from_json(config.to_json()) == config  # and the model config stays hashable (a static of the graph)
    hash(config.model)
    with pytest.raises(ConfigError, match="must look like model.balancer_args.NAME.FIELD=VALUE"):
        apply_overrides(config, ["model.balancer_args.alpha=1"])


CONTRACT_ROUTERS = sorted(r for r in ROUTERS if ":" not in r)


@pytest.mark.parametrize("name", CONTRACT_ROUTERS)
def test_every_built_in_router_keeps_the_router_contract(name):
    from dsv3_jax.model.router_contract import check_router, contract_config

    need_devices(4)
    checks = check_router(contract_config(tiny_model_config(), name))
    sharded = next(c for c in checks if c.name == "sharded == unsharded")
    split = re.search(r"\((\d+) of 64 per device\)", sharded.detail)  # the compiled program split the tokens
    assert split and int(split.group(1)) < 64, sharded.detail
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]


class _ClaimsNormalised:
    """Softmax top-2 that claims gates summing to 1 but does not renormalise them (planted)."""

    def gate_sum(self, cfg):
        return 1.0

    def __call__(self, logits_NE, bias_E, token_ids_N, cfg):
        probs_NE = jax.nn.softmax(logits_NE, axis=-1)
        idx_NK = jax.lax.top_k(probs_NE, cfg.top_k)[1]
        return token_choice(idx_NK, jnp.take_along_axis(probs_NE, idx_NK, -1), probs_NE, logits_NE)


class _PerShardTopK:
    """Each token's top-K among the experts, ranked against its own batch shard's mean affinity
    (planted: a per-device statistic, so the routing changes with the sharding)."""

    def __call__(self, logits_NE, bias_E, token_ids_N, cfg):
        def select(logits_nE):
            centred = logits_nE - logits_nE.mean(0, keepdims=True)  # this shard's mean, not the batch's
            return jax.lax.top_k(centred, cfg.top_k)[1]

        idx_NK = per_batch_shard(select, logits_NE)
        probs_NE = jax.nn.softmax(logits_NE, axis=-1)
        gates_NK = jnp.take_along_axis(probs_NE, idx_NK, -1)
        return token_choice(idx_NK, gates_NK, probs_NE, logits_NE)


@pytest.mark.parametrize("planted, failing", [(_ClaimsNormalised, "gates sum to what the router claims"),
                                              (_PerShardTopK, "sharded == unsharded")])
def test_the_router_contract_fails_a_planted_router(monkeypatch, planted, failing):
    from dsv3_jax.model.router_contract import check_router, contract_config

    need_devices(4)
    monkeypatch.setitem(ROUTERS, "planted", planted)
    router_for.cache_clear()
    checks = {c.name: c for c in check_router(contract_config(tiny_model_config(), "planted"))}
    router_for.cache_clear()
    assert not checks[failing].passed
    assert [name for name, c in checks.items() if not c.passed] == [failing]  # only what was planted


def test_dsv3_check_router_exits_1_on_a_broken_plugin_and_0_on_the_readme_one(tmp_path):
    (tmp_path / "bad_router.py").write_text(textwrap.dedent("""
        import jax, jax.numpy as jnp
        from dsv3_jax.model.routing import register_router, token_choice

        @register_router("same_expert_twice")
        class SameExpertTwice:
            def __call__(self, logits_NE, bias_E, token_ids_N, cfg):
                best_N = jnp.argmax(logits_NE, axis=-1)
                idx_NK = jnp.stack([best_N] * cfg.top_k, axis=-1)
                return token_choice(idx_NK, jnp.full(idx_NK.shape, 0.5), jax.nn.sigmoid(logits_NE), logits_NE)
    """))
    (tmp_path / "my_routers.py").write_text(PLUGIN)
    env = cli_env(PYTHONPATH=str(tmp_path))
    bad = subprocess.run([sys.executable, "-m", "dsv3_jax.cli", "check-router", "bad_router:same_expert_twice"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1, bad.stderr
    assert "FAIL  token choice: K distinct experts per token: 64 tokens got an expert twice" in bad.stdout
    good = subprocess.run([sys.executable, "-m", "dsv3_jax.cli", "check-router", "my_routers:softmax_temp",
                           "--set", "model.router_args.temperature=0.5"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert good.returncode == 0 and "FAIL" not in good.stdout and "PASS  sharded == unsharded" in good.stdout, good.stdout


@register_router("test_noisy_topk")
class _NoisyTopK:
    """Exploration noise on the logits that anneals to 0 over 4 steps (uses key= and step=)."""

    def __call__(self, logits_NE, bias_E, token_ids_N, cfg, key, step):
        scale = 3.0 * jnp.maximum(0.0, 1.0 - step / 4.0)
        noisy_NE = logits_NE + scale * jax.random.gumbel(key, logits_NE.shape)
        idx_NK = jax.lax.top_k(noisy_NE + bias_E[None, :], cfg.top_k)[1]
        probs_NE = jax.nn.softmax(logits_NE, -1)
        return token_choice(idx_NK, jnp.take_along_axis(probs_NE, idx_NK, -1), probs_NE, logits_NE)


def test_a_router_gets_a_key_per_layer_and_step_and_the_step_it_is_at():
    from dsv3_jax.model.routing import RouterClock
    from dsv3_jax.train.step import make_eval_step

    config = Config(model=tiny_model_config(router="test_noisy_topk", n_layers=3, mtp_depth=0, n_group=1,
                                            topk_group=1),
                    train=TrainConfig(steps=5, batch_size=2, seq_len=16))
    graphdef, optimizer, state = create_train_state(config, 0)
    clocks = lambda s: [v.get_value() for v in jax.tree.leaves(s.routing_bias, is_leaf=lambda x: isinstance(x, RouterClock))
                        if isinstance(v, RouterClock)]
    (clock_L2,) = clocks(state)  # (seed, step) per MoE layer: 2 layers, distinct seeds, at step 0
    assert clock_L2.shape == (2, 2) and clock_L2[0, 0] != clock_L2[1, 0] and list(clock_L2[:, 1]) == [0, 0]
    tokens = jax.random.randint(jax.random.key(0), (2, 17), 0, config.model.vocab_size)
    evaluate = jax.jit(make_eval_step(config, graphdef))
    loads = lambda s: np.asarray(evaluate(s, tokens)["expert_load"])
    step = jax.jit(make_train_step(config, graphdef, optimizer))
    state, _ = step(state, tokens)
    state, _ = step(state, tokens)
    (after_L2,) = clocks(state)
    np.testing.assert_array_equal(after_L2, clock_L2 + np.array([[0, 2]]))  # seeds kept, two steps taken
    # Only the clock moves the routing here (no bias balancer, same weights): another step, another key.
    moved = state.replace(routing_bias=jax.tree.map(
        lambda v: v.replace(v.get_value().at[:, 1].add(1)) if isinstance(v, RouterClock) else v,
        state.routing_bias, is_leaf=lambda x: isinstance(x, RouterClock)))
    assert not np.array_equal(loads(moved), loads(state))
    # At step 4 the noise has annealed away: the routing is the noiseless top-k, whatever the seed.
    at_step = lambda s, n: s.replace(routing_bias=jax.tree.map(
        lambda v: v.replace(v.get_value().at[:, 1].set(n).at[:, 0].add(n)) if isinstance(v, RouterClock) else v,
        s.routing_bias, is_leaf=lambda x: isinstance(x, RouterClock)))
    np.testing.assert_array_equal(loads(at_step(state, 4)), loads(at_step(state, 5)))
    # A router that takes no key has no clock in its state.
    plain = Config(model=tiny_model_config(n_layers=3, mtp_depth=0), train=config.train)
    assert clocks(create_train_state(plain, 0)[2]) == []


def test_a_router_that_takes_a_key_keeps_the_router_contract():
    from dsv3_jax.model.router_contract import check_router, contract_config

    checks = {c.name: c for c in check_router(contract_config(tiny_model_config(), "test_noisy_topk"))}
    assert all(c.passed for c in checks.values()), [c for c in checks.values() if not c.passed]
    assert checks["deterministic given its key"].detail == "called twice with the same key"


def test_choice_signature_is_equal_exactly_for_equal_expert_sets():
    from dsv3_jax.model.routing import Routing, choice_signature

    rng = np.random.default_rng(0)
    n, k, e = 400, 3, 16
    experts_NK = np.stack([rng.choice(e, k, replace=False) for _ in range(n)])
    gates_NK = rng.uniform(0.1, 1, (n, k)).astype(np.float32)
    gates_NK[::7, 0] = 0.0  # dropped assignments do not count
    routing = lambda x_NK, g_NK: token_choice(jnp.asarray(x_NK), jnp.asarray(g_NK), jnp.zeros((n, e)), jnp.zeros((n, e)))
    sig = np.asarray(choice_signature(routing(experts_NK, gates_NK), n, token_choice=True))
    # Shuffled within each token: the same sets, the same signatures (and the scatter path agrees).
    order = np.argsort(rng.uniform(size=(n, k)), axis=1)
    shuffled = routing(np.take_along_axis(experts_NK, order, 1), np.take_along_axis(gates_NK, order, 1))
    np.testing.assert_array_equal(choice_signature(shuffled, n, token_choice=True), sig)
    np.testing.assert_array_equal(choice_signature(shuffled, n, token_choice=False), sig)
    # Against python sets: every pair of tokens has equal signatures exactly when its kept sets are equal.
    kept = [frozenset(x for x, g in zip(row, gs) if g != 0) for row, gs in zip(experts_NK, gates_NK)]
    same_set = np.array([[a == b for b in kept] for a in kept])
    np.testing.assert_array_equal(sig[:, None] == sig[None, :], same_set)
    assert 1 < len(set(kept)) < n  # some tokens share a set, many do not


def _readme_compare_args(sweep_dir: Path) -> list[str]:
    """The README's `dsv3 compare` command after `dsv3`, into `sweep_dir`."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**Prototype a router**"):]
    block = section[section.index("```bash") + len("```bash"):section.index("```", section.index("```bash") + 7)]
    words = block.replace("\\\n", " ").split()
    words = words[words.index("dsv3") + 1:]
    words[words.index("--sweep-dir") + 1] = str(sweep_dir)
    return words


SMALL_COMPARE = ["--data", "synthetic", "--parallel", "1", "--set", "model.n_layers=2", "--set", "model.top_k=2",
                 "--set", "model.vocab_size=384", "--set", "train.batch_size=2", "--set", "train.seq_len=32",
                 "--set", "train.eval_every=2"]


def test_the_readme_comparison_writes_its_table_and_plot_and_resumes_after_sigterm(tmp_path):
    (tmp_path / "my_routers.py").write_text(PLUGIN)
    sweep = tmp_path / "sweep"
    readme_args = _readme_compare_args(sweep)
    assert readme_args[0] == "compare" and readme_args.count("--variant") == 2 and "--seeds" in readme_args
    # The README's command on a smaller model and fewer steps (the shrinking --set go before its
    # variants: they are every variant's; the last --steps wins).
    args = [readme_args[0], *SMALL_COMPARE, *readme_args[1:], "--steps", "4"]
    env = cli_env(PYTHONPATH=str(tmp_path))
    cli = [sys.executable, "-m", "dsv3_jax.cli"]
    first = subprocess.Popen([*cli, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             cwd=tmp_path)
    lines = []
    for line in first.stdout:  # stop the sweep as soon as its second run starts
        lines.append(line)
        if line.strip().startswith("start  deepseek_v3/seed_1"):
            first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=300) == 128 + signal.SIGTERM, "".join(lines)
    assert any("done   deepseek_v3/seed_0" in line for line in lines) and "--resume" in lines[-1]
    finished = (sweep / "deepseek_v3" / "seed_0" / "metrics.jsonl").read_text()
    assert not (sweep / "softmax_temp").exists() and not (sweep / "compare.md").exists()

    out = subprocess.run([*cli, "compare", "--sweep-dir", str(sweep), "--resume"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 runs (2 variants x 2 seeds), 1 finished" in out.stdout
    assert (sweep / "deepseek_v3" / "seed_0" / "metrics.jsonl").read_text() == finished  # kept, not rerun
    summaries = json.loads((sweep / "compare.json").read_text())
    assert sorted(summaries) == ["deepseek_v3/seed_0", "deepseek_v3/seed_1", "softmax_temp/seed_0", "softmax_temp/seed_1"]
    assert all(s["steps"] == 4 for s in summaries.values())
    # Each variant's row: the mean over its two seeds, with their range.
    table = (sweep / "compare.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| softmax_temp |"))
    losses = sorted(summaries[f"softmax_temp/seed_{s}"]["final_val_loss"] for s in (0, 1))
    assert f"| 2 | {np.mean(losses):.4f} ({losses[0]:.4f}..{losses[1]:.4f}) |" in row
    assert (sweep / "comparison.png").stat().st_size > 10_000
    # The variants differ only in their overrides: same tokenizer and data, their own router.
    configs = {v: json.loads((sweep / v / "seed_1" / "config.json").read_text()) for v in ("deepseek_v3", "softmax_temp")}
    assert configs["deepseek_v3"]["data"] == configs["softmax_temp"]["data"]
    assert configs["softmax_temp"]["model"]["router"] == "my_routers:softmax_temp"
    assert configs["deepseek_v3"]["train"]["seed"] == 1
    # dsv3 report draws any runs together, with the same table (here two of the sweep's).
    runs = [str(sweep / v / "seed_0") for v in ("deepseek_v3", "softmax_temp")]
    out = subprocess.run([*cli, "report", *runs, "--out", str(tmp_path / "both")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    report = (tmp_path / "both" / "comparison.md").read_text()
    loss = summaries["softmax_temp/seed_0"]["final_val_loss"]
    assert f"| softmax_temp/seed_0 | 1 | {loss:.4f} |" in report and "| deepseek_v3/seed_0 | 1 |" in report
    assert (tmp_path / "both" / "comparison.png").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--variant", "a", "--variant", "b", "--set", "data.source=synthetic"], "--variant b changes data.* or model.vocab_size"),
    (["--variant", "a", "--set", "model.routr=x"], "--variant a: "),
    (["--variant", "a b"], "--variant 'a b': a name of letters"),
])
def test_a_bad_comparison_is_one_line_and_exit_2_before_anything_is_written(tmp_path, extra, message):
    sweep = tmp_path / "sweep"
    out = subprocess.run([sys.executable, "-m", "dsv3_jax.cli", "compare", "--sweep-dir", str(sweep), *extra],
                         capture_output=True, text=True, env=cli_env(), timeout=120)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not sweep.exists()


def test_the_comparison_table_is_each_variants_mean_and_range(tmp_path):
    from dsv3_jax.report import comparison_table, run_summary

    def run(name, val_losses, vio):
        d = tmp_path / name
        d.mkdir()
        lines = [{"step": s, "loss": 5.0, "max_vio": vio, "tokens_per_s": 100.0 * s, "dropped_fraction": 0.0}
                 for s in range(1, 21)]
        for step, loss in val_losses.items():
            lines[step - 1].update(val_loss=loss, val_max_vio=vio)
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        return d

    a0, a1 = run("a0", {10: 3.0, 20: 3.5}, 0.2), run("a1", {10: 2.5, 20: 2.0}, 0.4)
    s = run_summary(a0)
    assert (s["final_val_loss"], s["best_val_loss"], s["steps"]) == (3.5, 3.0, 20)
    assert s["tokens_per_s"] == np.median([100.0 * k for k in range(2, 21)])  # step 1 (compiling) left out
    table = comparison_table({"a": [a0, a1], "b": [run("b", {20: 4.0}, 1.0)]})
    assert table[2].startswith("| a | 2 | 2.7500 (2.0000..3.5000) | 2.5000 (2.0000..3.0000) | 0.300 (0.200..0.400) |")
    assert table[3].startswith("| b | 1 | 4.0000 | 4.0000 | 1.000 |")
