
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.model.moe import MoE
from tests.conftest import tiny_model_config


def _naive_moe(moe: MoE, cfg, x_ND):
    """Per-token loop over the chosen experts, straight from eq. 12-16 (numpy)."""
    x = np.asarray(x_ND, np.float64)
    e = np.asarray(moe.router.centroids_DE[...], np.float64)
    b = np.asarray(moe.router.bias_E[...], np.float64)
    wg, wu, wd = (np.asarray(w[...], np.float64) for w in (moe.w_gate_EDF, moe.w_up_EDF, moe.w_down_EFD))
    silu = lambda z: z / (1 + np.exp(-z))
    G, E = cfg.n_group, cfg.n_routed_experts
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        s = 1 / (1 + np.exp(-(x[t] @ e)))  # eq. 15
        biased = s + b
        group_scores = [np.sort(biased[g * E // G:(g + 1) * E // G])[-2:].sum() for g in range(G)]
        kept = np.argsort(group_scores)[::-1][:cfg.topk_group]
        allowed = [i for i in range(E) if i // (E // G) in kept]
        chosen = sorted(allowed, key=lambda i: -biased[i])[:cfg.top_k]  # eq. 16
        gates = s[chosen] / s[chosen].sum() * cfg.routed_scaling_factor  # eq. 13
        for g_i, i in zip(gates, chosen):
            out[t] += g_i * (silu(x[t] @ wg[i]) * (x[t] @ wu[i])) @ wd[i]
    shared = moe.shared
    sg, su, sd = (np.asarray(l.kernel[...], np.float64) for l in (shared.gate, shared.up, shared.down))
    out += (silu(x @ sg) * (x @ su)) @ sd
    return out


# 14 tokens x 3 experts: sorted, grouped (blocked on CPU); 2 tokens (6 <= 8 experts, decoding):
# each assignment through its gathered expert weights.
@pytest.mark.parametrize("B, T", [(2, 7), (1, 2)])
def test_moe_equals_naive_per_token_loop(B, T):
    cfg = tiny_model_config(n_routed_experts=8, top_k=3, n_group=4, topk_group=2, n_shared_experts=2)
    moe = MoE(cfg, nnx.Rngs(0))
    moe.router.bias_E[...] = jax.random.normal(jax.random.key(9), (8,)) * 0.05
    moe.router.centroids_DE[...] = moe.router.centroids_DE[...] * 20  # spread the scores
    x_BTD = jax.random.normal(jax.random.key(1), (B, T, cfg.d_model))
    y_BTD, stats = nnx.jit(lambda moe, x: moe(x))(moe, x_BTD)  # jitted: one compile, not one per eager op
    expected = _naive_moe(moe, cfg, x_BTD.reshape(-1, cfg.d_model))
    np.testing.assert_allclose(np.asarray(y_BTD).reshape(-1, cfg.d_model), expected, rtol=2e-4, atol=2e-5)
    assert float(stats.expert_load.sum()) == B * T * 3


def test_moe_is_dropless_under_total_imbalance():
    cfg = tiny_model_config(n_group=1, topk_group=1)
    moe = MoE(cfg, nnx.Rngs(0))
    moe.router.bias_E[...] = jnp.array([5.0, 5.0, 0, 0, 0, 0, 0, 0])  # every token -> experts 0 and 1
    x_BTD = jax.random.normal(jax.random.key(2), (2, 5, cfg.d_model))
    y, stats = nnx.jit(lambda moe, x: moe(x))(moe, x_BTD)
    np.testing.assert_array_equal(stats.expert_load, [10, 10, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(np.asarray(y).reshape(10, -1), _naive_moe(moe, cfg, x_BTD.reshape(10, -1)),
                               rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("T", [6, 3])  # 12 assignments: grouped; 6 <= 8 experts: per assignment
def test_moe_gradients_match_naive_dense_computation(T):
    """Grads through the grouped SwiGLU equal grads of a dense masked formulation (small E only)."""
    cfg = tiny_model_config(n_group=1, topk_group=1)
    moe = MoE(cfg, nnx.Rngs(3))
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
    x_BTD = jax.random.normal(jax.random.key(4), (1, T, cfg.d_model))

    def loss_sorted(p):
        return jnp.sum(nnx.merge(graphdef, p, rest)(x_BTD)[0] ** 2)

    def loss_dense(p):
        m = nnx.merge(graphdef, p, rest)
        routing, _ = m.router(x_BTD)
        x = x_BTD.reshape(T, -1)
        h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, m.w_gate_EDF[...])) * jnp.einsum("nd,edf->nef", x, m.w_up_EDF[...])
        y_NED = jnp.einsum("nef,efd->ned", h, m.w_down_EFD[...])
        w_NE = jnp.zeros((T, cfg.n_routed_experts)).at[routing.token_M, routing.expert_M].add(routing.gate_M)
        return jnp.sum((jnp.einsum("ned,ne->nd", y_NED, w_NE) + m.shared(x)) ** 2)

    g1, g2 = jax.jit(jax.grad(loss_sorted))(params), jax.jit(jax.grad(loss_dense))(params)  # jitted: one compile each
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)
