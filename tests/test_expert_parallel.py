"""Expert parallelism (parallel/expert.py, report §3.2.2) on 8 host devices: each rank runs only its
experts on only their rows, and the result equals the single-device MoE (outputs and gradients of
inputs, expert weights, router weights and gates), drops included; the compiled step has
all-to-alls and no all-gather of expert weights; whole train steps equal the unsharded one."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import Config, ConfigError, MeshConfig, TrainConfig
from dsv3_jax.model.moe import MoE, grouped_swiglu, routed_experts
from dsv3_jax.parallel.expert import expert_parallel_routed_experts, pair_capacity, plan_dispatch, ranks_per_token
from dsv3_jax.parallel.mesh import make_mesh
from dsv3_jax.parallel.sharding import DEFAULT_RULES
from dsv3_jax.train.state import create_train_state
from dsv3_jax.train.step import make_loss_and_grads, make_train_step
from dsv3_jax.validate import validate
from tests.conftest import need_devices, tiny_model_config

pytestmark = pytest.mark.multidevice
N = 64  # tokens in the global batch of the MoE-level tests


def _moe_case(bias, top_k=3):
    cfg = tiny_model_config(n_routed_experts=8, top_k=top_k, n_group=1, topk_group=1)
    moe = MoE(cfg, nnx.Rngs(0))
    moe.router.bias_E[...] = jnp.asarray(bias, jnp.float32)
    x_ND = jax.random.normal(jax.random.key(1), (N, cfg.d_model))
    return cfg, moe, x_ND


def _ep_loss_and_grads(moe, x_ND, mesh, dispatch, capacity_factor=2.0):
    """Loss sum(y * r) through the router and the EP experts; grads for x, expert weights, router."""
    r_ND = jax.random.normal(jax.random.key(2), x_ND.shape)
    experts = (moe.w_gate_EDF[...], moe.w_up_EDF[...], moe.w_down_EFD[...])

    router_def, router_params, router_rest = nnx.split(moe.router, nnx.Param, ...)

    def loss(x, router_params, *w):
        routing, _ = nnx.merge(router_def, router_params, router_rest)(x.reshape(8, N // 8, -1))
        if mesh is None:
            y, dropped = routed_experts(x, routing, *w), jnp.zeros(())
        else:
            K = routing.expert_M.size // N
            y, dropped = expert_parallel_routed_experts(x, routing.expert_M.reshape(N, K), routing.gate_M.reshape(N, K),
                                                        *w, mesh, dispatch, grouped_swiglu, capacity_factor)
        return jnp.sum(y * r_ND), (y, dropped)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))
    if mesh is None:
        return fn(x_ND, router_params, *experts)
    with jax.set_mesh(mesh):
        return fn(x_ND, router_params, *experts)


SKEWED = [3.0, 0, 0, 0, 0, 2.0, 0, -1.0]  # experts 0 and 5 take most assignments
ALL_ON_RANK_0 = [9.0, 9.0, 9.0, 0, 0, 0, 0, 0]  # every token picks experts 0, 1, 2: all on one rank


@pytest.mark.parametrize("dispatch,sizes,bias", [
    ("a2a", dict(data=2, expert=4), SKEWED), ("a2a", dict(expert=2, tensor=2, fsdp=2), SKEWED),
    ("a2a", dict(data=2, expert=4), ALL_ON_RANK_0), ("ring", dict(data=2, expert=4), SKEWED)])
def test_expert_parallel_equals_local_experts_with_gradients(dispatch, sizes, bias):
    need_devices(8)
    _, moe, x_ND = _moe_case(bias)
    (_, (want_y, _)), want_g = _ep_loss_and_grads(moe, x_ND, None, dispatch)
    (_, (got_y, dropped)), got_g = _ep_loss_and_grads(moe, x_ND, make_mesh(MeshConfig(**sizes)), dispatch)
    assert float(dropped) == 0.0
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
    for name, g, h in zip(("x", "router", "w_gate", "w_up", "w_down"), got_g, want_g):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name), g, h)
    assert float(jnp.abs(got_g[1]["centroids_DE"][...]).max()) > 0  # gates carry the router's gradient


def test_dispatch_plan_sends_a_token_once_per_rank_and_drops_past_capacity_by_hand():
    # 4 tokens, top-3 of 8 experts on 4 ranks (2 experts each), capacity 2 rows per destination.
    expert_nK = jnp.array([[0, 1, 4], [1, 2, 3], [0, 6, 7], [1, 0, 5]])
    gate_nK = jnp.arange(12, dtype=jnp.float32).reshape(4, 3) + 1
    plan = plan_dispatch(expert_nK, gate_nK, ep=4, local_E=2, capacity=2)
    # Rank 0 (experts 0, 1) is wanted by tokens 0, 1, 2, 3: token 0 goes once for its experts 0 AND 1;
    # token 2 goes to rank 3 once for experts 6 and 7. Row ids 4 = empty.
    np.testing.assert_array_equal(plan.token_PC, [[0, 1], [1, 4], [0, 3], [2, 4]])
    np.testing.assert_array_equal(plan.expert_PCJ[0], [[0, 1], [1, 2]])  # local ids; 2 = empty slot
    np.testing.assert_array_equal(plan.gate_PCJ[0], [[1, 2], [4, 0]])
    np.testing.assert_array_equal(plan.expert_PCJ[3, 0], [0, 1])
    np.testing.assert_array_equal(plan.gate_PCJ[3, 0], [8, 9])
    np.testing.assert_array_equal(plan.count_P, [2, 1, 2, 1])
    # Dropped: token 2's expert 0 and token 3's experts 1 and 0 (rows 3 and 4 for rank 0).
    assert float(plan.dropped) == 3


def test_capacity_overflow_is_counted_and_kept_assignments_are_exact():
    need_devices(8)
    cfg, moe, x_ND = _moe_case(ALL_ON_RANK_0)
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    capacity_factor = 0.5  # pair capacity ceil(0.5 * 8 * 3 / 4) = 3 of the 8 tokens per rank
    (_, (got_y, dropped)), _ = _ep_loss_and_grads(moe, x_ND, mesh, "a2a", capacity_factor)
    routing, _ = moe.router(x_ND.reshape(8, N // 8, -1))
    expert_NK, gate_NK = routing.expert_M.reshape(N, 3), routing.gate_M.reshape(N, 3)
    n_local, C = N // 8, pair_capacity(N // 8, ranks_per_token(3, 4), 4, capacity_factor)
    # By hand: on each of the 8 token shards, the first C tokens (in order) wanting a rank keep it.
    kept_NK = np.zeros((N, 3), bool)
    for shard in range(8):
        rows = np.arange(shard * n_local, (shard + 1) * n_local)
        dest = np.asarray(expert_NK)[rows] // 2
        for p in range(4):
            wanting = [i for i in range(n_local) if (dest[i] == p).any()]
            for i in wanting[:C]:
                kept_NK[rows[i]] |= dest[i] == p
    assert float(dropped) == (~kept_NK).sum() > 0
    kept_routing = routing._replace(gate_M=jnp.where(kept_NK.reshape(-1), routing.gate_M, 0.0))
    want = routed_experts(x_ND, kept_routing, moe.w_gate_EDF[...], moe.w_up_EDF[...], moe.w_down_EFD[...])
    np.testing.assert_allclose(got_y, want, rtol=1e-5, atol=1e-5)


def _step_inputs(mesh_sizes):
    # moe_ffn_dim 24: expert weights [8, 32, 24] have a shape no activation [8, 16, 32] shares.
    model = tiny_model_config(n_routed_experts=8, moe_ffn_dim=24)
    config = Config(model=model, train=TrainConfig(batch_size=8, seq_len=16, warmup_steps=1),
                    mesh=MeshConfig(**mesh_sizes))
    return validate(config), jax.random.randint(jax.random.key(0), (8, 17), 0, model.vocab_size)


@functools.cache
def _single_device_step():
    config, tokens = _step_inputs({})
    graphdef, optimizer, state = create_train_state(config, 0)
    (loss, _), grads = jax.jit(make_loss_and_grads(config, graphdef))(state.params, state.routing_bias, tokens)
    new_state, metrics = jax.jit(make_train_step(config, graphdef, optimizer))(state, tokens)
    return loss, grads, new_state, metrics


@pytest.mark.parametrize("sizes, whole_step", [(dict(data=2, expert=4), True), (dict(tensor=2, expert=4), False),
                                               (dict(fsdp=2, tensor=2, expert=2), False)])
def test_expert_parallel_train_step_equals_single_device(sizes, whole_step):
    """Loss and every gradient leaf on three meshes; the whole step (metrics, bias update) on the
    first only: each step compile costs ~40 s of the suite's 2-core budget and adds no new sharding."""
    need_devices(8)
    want_loss, want_grads, want_state, want = _single_device_step()
    config, tokens = _step_inputs(sizes)
    graphdef, optimizer, state = create_train_state(config, 0)
    mesh = make_mesh(config.mesh)
    shardings = DEFAULT_RULES.tree(state, mesh)
    state = jax.device_put(state, shardings)
    grads_fn = jax.jit(make_loss_and_grads(config, graphdef), in_shardings=(shardings.params, shardings.routing_bias,
                                                                  DEFAULT_RULES.batch(mesh)))
    with jax.set_mesh(mesh):
        compiled_grads = grads_fn.lower(state.params, state.routing_bias, tokens).compile()
        (loss, _), grads = compiled_grads(state.params, state.routing_bias, tokens)
    # Distribution: all-to-alls move the rows; no routed-expert weight [.., E, D, F] is ever gathered.
    hlo = compiled_grads.as_text()
    assert "all-to-all" in hlo
    E, D, F = 8, config.model.d_model, config.model.moe_ffn_dim
    gathered = [line for line in hlo.splitlines() if "all-gather(" in line and re.search(
        rf"\[(\d+,)?{E},({D},{F}|{F},{D})\]", line.split("all-gather(")[0])]
    assert not gathered, gathered[:2]
    # Routing is per token, on each batch shard: no device gathers the other shards' router scores
    # for top_k (GSPMD did, so every device routed the whole batch).
    gathered = [line for line in hlo.splitlines() if "all-gather(" in line and "top_k" in line]
    assert not gathered, gathered[:2]
    rows = {int(re.search(r"f32\[(\d+),", line).group(1)) for line in hlo.splitlines()
            if "top_k" in line and ('custom_call_target="TopK"' in line or " sort(" in line)}
    assert rows == {tokens.shape[0] * (tokens.shape[1] - 1) // DEFAULT_RULES.shards("batch", dict(mesh.shape))}, rows
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(want_grads))  # numpy: no compile per leaf
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale), grads, want_grads)
    if not whole_step:
        return
    step = jax.jit(make_train_step(config, graphdef, optimizer), in_shardings=(shardings, DEFAULT_RULES.batch(mesh)),
                   out_shardings=(shardings, None))
    with jax.set_mesh(mesh):
        got_state, got = step(state, tokens)
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(got["expert_load"], want["expert_load"])
    assert float(got["capacity_dropped"]) == 0.0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got_state.routing_bias,
                 want_state.routing_bias)


def test_explicit_dispatch_needs_a_token_choice_router_and_ragged_needs_an_accelerator():
    model = tiny_model_config(expert_dispatch="ring", router="expert_choice")
    with pytest.raises(ConfigError, match="expert_dispatch=ring needs a token-choice router"):
        validate(Config(model=model, train=TrainConfig(batch_size=8, seq_len=16), mesh=MeshConfig(expert=2)))
    if jax.default_backend() == "cpu":
        model = tiny_model_config(expert_dispatch="ragged")
        with pytest.raises(ConfigError, match="expert_dispatch=ragged needs a GPU or TPU.*expert_dispatch=a2a"):
            validate(Config(model=model, train=TrainConfig(batch_size=8, seq_len=16), mesh=MeshConfig(expert=2)))


def _sort_sizes(jaxpr) -> list[int]:
    """Lengths of every sort in a jaxpr, nested ones included (shard_map bodies, scans, conds)."""
    sizes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sort":
            sizes.append(eqn.invars[0].aval.shape[-1])
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    sizes += _sort_sizes(inner)
    return sizes


def test_each_rank_sorts_and_multiplies_only_its_share_of_the_rows():
    need_devices(8)
    cfg, moe, x_ND = _moe_case(SKEWED, top_k=2)
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    graphdef, state = nnx.split(moe)
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x)[0])(state, x_ND.reshape(8, N // 8, -1))
    # Two shard_maps: the routing's per-shard top_k (no sort) and the expert-parallel dispatch.
    shard_maps = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "shard_map"]
    sorting = [e for e in shard_maps if _sort_sizes(e.params["jaxpr"])]
    assert len(shard_maps) == 2 and len(sorting) == 1
    inside = _sort_sizes(sorting[0].params["jaxpr"])
    assert sorted(_sort_sizes(jaxpr.jaxpr)) == sorted(inside)  # nothing is sorted outside it
    n_local, K, ep = N // 8, 2, 4
    C = pair_capacity(n_local, ranks_per_token(K, ep), ep, cfg.expert_capacity_factor)
    assert max(inside) == ep * C * min(K, 8 // ep) < N * K  # the receive slots, not the global M = N x K


@pytest.mark.gpu
def test_ragged_transport_equals_the_portable_one_on_accelerators():
    """ragged_all_to_all moves only the real rows; the result is the portable a2a's. XLA:CPU has no
    ragged_all_to_all, so this runs only where 4 or more GPU/TPU devices are present."""
    if jax.default_backend() == "cpu" or len(jax.devices()) < 4:
        pytest.skip("needs 4 or more GPU/TPU devices")
    _, moe, x_ND = _moe_case(SKEWED)
    mesh = make_mesh(MeshConfig(expert=4))
    (_, (want_y, want_dropped)), want_g = _ep_loss_and_grads(moe, x_ND, mesh, "a2a", 0.5)
    (_, (got_y, got_dropped)), got_g = _ep_loss_and_grads(moe, x_ND, mesh, "ragged", 0.5)
    assert float(got_dropped) == float(want_dropped)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got_g, want_g)
