"""DualPipe's F&B pair overlaps one chunk's all-to-all with the other chunk's GEMMs (report
§3.2.1, Figure 4), read from the program XLA:TPU schedules (compiled from this host for a v5p
slice, the `tpu` extra): the pair's two chunks are independent, so the latency-hiding scheduler
places the backward's GEMMs inside the forward's dispatch window and the reverse. Planted: the
backward reading the state the forward leaves (the sequencing the executor had) -> no window of
either chunk holds the other's compute."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import pytest

from dsv3_jax import hlo_stats
from dsv3_jax.jobs.compile import _no_persistent_cache
from dsv3_jax.parallel.mesh import make_mesh
from dsv3_jax.parallel.pipeline import executor
from dsv3_jax.parallel.pipeline.executor import BACKWARD_CHUNK, FORWARD_CHUNK
from dsv3_jax.parallel.pipeline.schedules import make_schedule
from dsv3_jax.parallel.sharding import DEFAULT_RULES
from dsv3_jax.platform import compiler_options

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="needs the `tpu` extra (libtpu): uv run --extra tpu pytest")
M, B, T, D = 4, 2, 128, 256  # micro-batches (DualPipeV on 2 ranks needs 4), rows, tokens per row, width


def _stage(p, x_BTD):
    """An expert-parallel layer in miniature: tokens dispatched over `expert` by all-to-all, a GEMM
    on the rows that arrived, combined back by all-to-all, then a dense GEMM."""
    from jax.sharding import PartitionSpec

    def experts(x_bTD, w_DD):  # this rank's rows: their tokens sent over `expert` and back
        x_bTD = jax.lax.all_to_all(x_bTD, "expert", 1, 1, tiled=True)  # dispatch
        return jax.lax.all_to_all(jnp.tanh(x_bTD @ w_DD), "expert", 1, 1, tiled=True)  # combine

    mesh = jax.sharding.get_abstract_mesh()
    routed = jax.shard_map(experts, mesh=mesh, in_specs=(PartitionSpec("expert"), PartitionSpec()),
                           out_specs=PartitionSpec("expert"), axis_names=frozenset({"expert"}), check_vma=False)
    y_BTD = x_BTD + routed(x_BTD, p["w_expert"])
    y_BTD = y_BTD + jnp.tanh(y_BTD @ p["w_in"]) @ p["w_out"]
    return y_BTD, jnp.zeros(()), {}


def _loss(head, y_BTD, target_BTD):
    return jnp.mean((y_BTD @ head["w"] - target_BTD) ** 2), {}


# Scopes of the compiled ops, first match wins: the backward chunk's gradient computation proper
# (JAX names it transpose(...)) apart from its recomputed forward.
FORWARD, GRADIENT, RECOMPUTE = f"{FORWARD_CHUNK}/", f"{BACKWARD_CHUNK}/transpose(", f"{BACKWARD_CHUNK}/"


def _pair_windows(schedule_name: str = "dualpipev") -> list[dict]:
    """The all-to-all windows of the pipelined step compiled for a v5p slice (pipeline=2, expert=2)."""
    from dsv3_jax.targets import parse_target

    devices = parse_target("tpu-v5p:2x2x1").devices()
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "expert": 2, "pipeline": 2}, devices)
    schedule = make_schedule(schedule_name, 2, M)
    S = schedule.n_stages
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    params = {"w_expert": spec(S, D, D), "w_in": spec(S, D, D), "w_out": spec(S, D, D)}
    args = (params, {"w": spec(D, D)}, spec(M, B, T, D), spec(M, B, T, D))
    with jax.set_mesh(mesh), _no_persistent_cache():
        step = jax.jit(lambda *a: executor.pipeline_value_and_grad(_stage, _loss, schedule, mesh, *a),
                       in_shardings=(DEFAULT_RULES.sharding(("stage",), mesh),) + (DEFAULT_RULES.sharding((), mesh),) * 3)
        text = step.lower(*args).compile(compiler_options=compiler_options("tpu")).as_text()
    return [w for w in hlo_stats.async_windows(text, (FORWARD, GRADIENT, RECOMPUTE)) if w["kind"] == "all-to-all"]


def _flops(windows, issued_by: tuple[str, ...], inside: tuple[str, ...]) -> float:
    """FLOPs of `inside` scopes' ops scheduled within the windows of all-to-alls `issued_by` scopes."""
    return sum(f for w in windows if w["scope"] in issued_by for scope, f in w["flops_by_scope"].items()
               if scope in inside)


def test_each_chunk_of_a_dualpipev_pair_overlaps_the_other_chunks_gemms(monkeypatch):
    windows = _pair_windows()
    backward = (GRADIENT, RECOMPUTE)
    assert any(w["scope"] == FORWARD for w in windows) and any(w["scope"] in backward for w in windows)
    # The backward's gradient all-to-alls (transposed combine / dispatch) hide the forward's GEMMs:
    # with the backward reading the state the forward left (the cotangent buffer the last stage's
    # forward writes), as the executor did, they had to wait for the whole forward.
    assert _flops(windows, (GRADIENT,), (FORWARD,)) > 0

    # Planted (the issue's): the forward's input waits on the backward's gradients -> nothing of
    # one chunk is scheduled inside the other's all-to-alls.
    def forward_after_backward(tick_state, after_backward):
        grads = sum(jnp.sum(g) for g in jax.tree.leaves((after_backward["own_grads"], after_backward["received_grads"])))
        return dict(tick_state, inbox=tick_state["inbox"] + (0 * grads).astype(tick_state["inbox"].dtype))

    monkeypatch.setattr(executor, "pair_forward_reads", forward_after_backward)
    planted = _pair_windows()
    assert planted and _flops(planted, (FORWARD,), backward) == 0 and _flops(planted, backward, (FORWARD,)) == 0
