import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.model.routing import expert_load, route, sequence_balance_loss, token_choice
from tests.conftest import tiny_model_config


def _mask(idx_BTK, E):
    return jnp.any(jax.nn.one_hot(idx_BTK, E), axis=-2).astype(jnp.float32)


def _cfg(**kw):
    return tiny_model_config(**kw)


def test_bias_changes_choice_but_never_gate_values():
    cfg = _cfg(n_routed_experts=8, top_k=2, n_group=1, topk_group=1)
    logits = jax.random.normal(jax.random.key(0), (64, 8))
    plain_idx, plain_gates, _ = route(logits, jnp.zeros(8), cfg)
    bias = jnp.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0])  # force expert 7 into every choice
    biased_idx, biased_gates, _ = route(logits, bias, cfg)
    assert not np.array_equal(plain_idx, biased_idx)
    assert np.all(np.any(np.asarray(biased_idx) == 7, axis=1))
    # Gates are the unbiased sigmoid scores of the chosen experts, normalised, times the scale (eq. 13).
    s = jax.nn.sigmoid(logits)
    for idx, gates in ((plain_idx, plain_gates), (biased_idx, biased_gates)):
        chosen = jnp.take_along_axis(s, idx, axis=1)
        expected = chosen / chosen.sum(1, keepdims=True) * cfg.routed_scaling_factor
        np.testing.assert_allclose(gates, expected, rtol=1e-6)


def test_gradient_never_reaches_the_bias():
    cfg = _cfg(n_group=1, topk_group=1)
    logits = jax.random.normal(jax.random.key(1), (16, 8))
    g = jax.grad(lambda b: route(logits, b, cfg)[1].sum())(jnp.ones(8) * 0.1)
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("seed", range(5))
def test_group_limited_never_leaves_kept_groups_even_with_negative_bias(seed):
    cfg = _cfg(n_routed_experts=16, top_k=3, n_group=4, topk_group=2)
    k1, k2 = jax.random.split(jax.random.key(seed))
    logits = jax.random.normal(k1, (128, 16)) * 3
    bias = -2.0 - jax.random.uniform(k2, (16,))  # biased scores all negative (s in (0,1), b < -2)
    expert_idx, _, _ = route(logits, bias, cfg)
    biased = np.asarray(jax.nn.sigmoid(logits) + bias[None, :])
    grouped = biased.reshape(128, 4, 4)
    group_score = np.sort(grouped, axis=-1)[..., -2:].sum(-1)  # sum of each group's top-2
    kept = np.argsort(-group_score, axis=-1)[:, :2]
    chosen_groups = np.asarray(expert_idx) // 4
    for t in range(128):
        assert set(chosen_groups[t]) <= set(kept[t]), (t, chosen_groups[t], kept[t])
        # Within the kept groups, the choice is the top-3 biased scores.
        allowed = [e for e in range(16) if e // 4 in kept[t]]
        best = sorted(allowed, key=lambda e: -biased[t, e])[:3]
        assert set(np.asarray(expert_idx[t])) == set(best)


def test_softmax_routing_v2_style():
    cfg = _cfg(score_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1)
    logits = jax.random.normal(jax.random.key(2), (32, 8))
    expert_idx, gates, _ = route(logits, jnp.zeros(8), cfg)
    p = jax.nn.softmax(logits, axis=-1)
    top_vals, top_idx = jax.lax.top_k(p, 2)
    np.testing.assert_array_equal(expert_idx, top_idx)
    np.testing.assert_allclose(gates, top_vals, rtol=1e-6)


def test_expert_load_counts_assignments():
    idx = jnp.array([[0, 3], [3, 1], [3, 0]])
    routing = token_choice(idx, jnp.array([[1.0, 1], [1, 1], [1, 0]]), jnp.zeros((3, 4)), jnp.zeros((3, 4)))
    np.testing.assert_array_equal(expert_load(routing, 4), [1, 1, 0, 3])  # the zero-gate (dropped) one not counted


def test_balance_loss_matches_eq_17_to_20_by_hand():
    # One sequence of T=3 tokens, E=4 experts, K=2.
    scores = np.array([[0.9, 0.1, 0.5, 0.2],
                       [0.3, 0.8, 0.6, 0.1],
                       [0.7, 0.2, 0.4, 0.9]])
    chosen = np.array([[0, 2], [1, 2], [3, 0]])
    T, E, K = 3, 4, 2
    counts = np.array([2, 1, 2, 1])  # expert 0: t0,t2; 1: t1; 2: t0,t1; 3: t2
    f = E / (K * T) * counts  # eq. 18
    s_norm = scores / scores.sum(1, keepdims=True)  # eq. 19
    P = s_norm.mean(0)  # eq. 20
    expected = (f * P).sum()  # eq. 17 without alpha
    got = sequence_balance_loss(jnp.asarray(scores)[None], _mask(jnp.asarray(chosen)[None], E), K)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Two sequences average; perfectly uniform routing gives exactly 1.
    uniform = jnp.full((1, 4, 4), 0.5)
    balanced_idx = jnp.array([[[0, 1], [2, 3], [0, 1], [2, 3]]])
    np.testing.assert_allclose(sequence_balance_loss(uniform, _mask(balanced_idx, 4), 2), 1.0, rtol=1e-6)
    both = sequence_balance_loss(jnp.concatenate([jnp.asarray(scores)[None, :3], uniform[:, :3]]),
                                 _mask(jnp.concatenate([jnp.asarray(chosen)[None], balanced_idx[:, :3]]), 4), 2)
    single_b = sequence_balance_loss(uniform[:, :3], _mask(balanced_idx[:, :3], 4), 2)
    np.testing.assert_allclose(both, (expected + single_b) / 2, rtol=1e-6)


def test_balance_loss_gradient_flows_through_P_only():
    scores = jax.nn.sigmoid(jax.random.normal(jax.random.key(3), (2, 5, 8)))
    idx = jax.lax.top_k(scores, 2)[1]
    g = jax.grad(lambda s: sequence_balance_loss(s, _mask(idx, 8), 2))(scores)
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0
