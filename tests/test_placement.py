"""Redundant experts (parallel/placement.py, report §3.4): copies of hot experts even out rank loads,
and the MoE with copies gives the output and gradients of the MoE without them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import MeshConfig
from dsv3_jax.model.moe import MoE, grouped_swiglu, routed_experts
from dsv3_jax.parallel.expert import expert_parallel_routed_experts
from dsv3_jax.parallel.mesh import make_mesh
from dsv3_jax.parallel.placement import identity_placement, imbalance, plan_placement, rank_loads, to_slots
from tests.conftest import need_devices, tiny_model_config


def test_one_hot_expert_gets_a_copy_on_every_rank_and_loads_even_out_by_hand():
    load = [8, 1, 1, 1, 1, 1, 1, 2]  # mean rank load 4 on 4 ranks
    assert imbalance(identity_placement(8), load, 4) == pytest.approx(9 / 4)  # ranks hold [8+1, 2, 2, 3]
    placed = plan_placement(load, n_ranks=4, n_redundant=4)
    np.testing.assert_array_equal(placed.replicas, [4, 1, 1, 1, 1, 1, 1, 2])
    np.testing.assert_allclose(rank_loads(placed, load, 4), [4, 4, 4, 4])
    for rank in placed.slot_expert.reshape(4, 3):
        assert len(set(rank)) == 3  # no rank holds two copies of one expert


def test_zipf_loads_are_evened_out():
    E, P, R = 64, 8, 16
    load = 1.0 / np.arange(1, E + 1) ** 1.1
    load = np.random.default_rng(0).permutation(load)
    placed = plan_placement(load, P, R)
    assert sorted(placed.slot_expert.tolist()) == sorted(np.repeat(np.arange(E), placed.replicas).tolist())
    assert placed.replicas[np.argmax(load)] == placed.replicas.max() > 1
    before, after = imbalance(identity_placement(E), load, P), imbalance(placed, load, P)
    assert after < 1.1 < before


def test_placement_refuses_what_cannot_be_placed():
    with pytest.raises(ValueError, match="9 slots cannot split over 4 ranks"):
        plan_placement(np.ones(8), 4, 1)


@pytest.mark.multidevice
def test_moe_with_copies_equals_moe_without_them_with_gradients():
    need_devices(8)
    cfg = tiny_model_config(n_routed_experts=8, top_k=3, n_group=1, topk_group=1)
    moe = MoE(cfg, nnx.Rngs(0))
    moe.router.bias_E[...] = jnp.array([3.0, 2.0, 0, 0, 0, 0, 0, -1.0])  # experts 0 and 1 are hot
    x_ND = jax.random.normal(jax.random.key(1), (64, cfg.d_model))
    routing, stats = moe.router(x_ND.reshape(8, 8, -1))
    placed = plan_placement(np.asarray(stats.expert_load), n_ranks=4, n_redundant=8)  # 16 slots
    assert placed.replicas[0] > 1 and placed.replicas[1] > 1
    weights = (moe.w_gate_EDF[...], moe.w_up_EDF[...], moe.w_down_EFD[...])
    expert_NK, gate_NK = routing.expert_M.reshape(64, 3), routing.gate_M.reshape(64, 3)
    slot_NK = to_slots(expert_NK, placed)
    np.testing.assert_array_equal(placed.slot_expert[np.asarray(slot_NK)], expert_NK)
    r_ND = jax.random.normal(jax.random.key(2), x_ND.shape)
    mesh = make_mesh(MeshConfig(data=2, expert=4))

    def with_copies(x, *w):
        w_slots = [a[placed.slot_expert] for a in w]  # the copies' gradients add up through this gather
        y, _ = expert_parallel_routed_experts(x, slot_NK, gate_NK, *w_slots, mesh, "a2a", grouped_swiglu)
        return jnp.sum(y * r_ND), y

    def without(x, *w):
        y = routed_experts(x, routing, *w)
        return jnp.sum(y * r_ND), y

    (_, want_y), want_g = jax.value_and_grad(without, argnums=(0, 1, 2, 3), has_aux=True)(x_ND, *weights)
    with jax.set_mesh(mesh):
        (_, got_y), got_g = jax.jit(jax.value_and_grad(with_copies, argnums=(0, 1, 2, 3), has_aux=True))(
            x_ND, *weights)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
    for g, h in zip(got_g, want_g):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)
