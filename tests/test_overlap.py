"""DualPipe's F&B pair overlaps one chunk's all-to-all with the other chunk's GEMMs (report
§3.2.1, Figure 4), read from the program XLA:TPU schedules (compiled from this host for a v5p
slice, the `tpu` extra). The stage is given in phases that alternate compute and all-to-all, as
the model's MoE blocks are (model/block.py Block.PHASES), so the pair runs in
`executor.lockstep_pair`'s rounds: the forward's dispatch beside the backward's expert GEMMs, the
backward's transposed combine beside the forward's dense GEMMs, and so on. Planted: the forward
reading what the backward computed in the same round -> no window of either chunk holds the
other's compute."""

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
M, B, T, D, L = 4, 2, 128, 256, 2  # micro-batches (DualPipeV on 2 ranks needs 4), rows, tokens per row, width, layers


def _exchange(x_BTD):
    """Tokens over `expert` and back by all-to-all: the dispatch or the combine of a toy MoE layer."""
    from jax.sharding import PartitionSpec

    swap = lambda x_bTD: jax.lax.all_to_all(x_bTD, "expert", 1, 1, tiled=True)  # noqa: E731
    return jax.shard_map(swap, mesh=jax.sharding.get_abstract_mesh(), in_specs=PartitionSpec("expert"),
                         out_specs=PartitionSpec("expert"), axis_names=frozenset({"expert"}), check_vma=False)(x_BTD)


# An expert-parallel layer in miniature, in four phases: a dense GEMM, the dispatch, the "expert"
# GEMM on the rows that arrived, the combine (the last returns the layer's output and its stats).
_PHASES = (lambda p, x_BTD: (x_BTD, x_BTD + jnp.tanh(x_BTD @ p["w_in"]) @ p["w_out"]),
           lambda p, carry: (carry[0], _exchange(carry[1])),
           lambda p, carry: (carry[0], jnp.tanh(carry[1] @ p["w_expert"])),
           lambda p, carry: (carry[0] + _exchange(carry[1]), {}))
LAYERS = executor.StageLayers(_PHASES, lambda stats: (jnp.zeros(()), stats))


def _stage(p, x_BTD):  # the phases composed, layer after layer
    for i in range(jax.tree.leaves(p)[0].shape[0]):
        carry = x_BTD
        for phase in _PHASES:
            carry = phase(jax.tree.map(lambda a: a[i], p), carry)
        x_BTD, _ = carry
    return x_BTD, jnp.zeros(()), {}


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
    params = {"w_expert": spec(S, L, D, D), "w_in": spec(S, L, D, D), "w_out": spec(S, L, D, D)}
    args = (params, {"w": spec(D, D)}, spec(M, B, T, D), spec(M, B, T, D))
    with jax.set_mesh(mesh), _no_persistent_cache():
        step = jax.jit(lambda *a: executor.pipeline_value_and_grad(_stage, _loss, schedule, mesh, *a,
                                                                         stage_layers=LAYERS),
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
    # Figure 4: the forward's dispatch / combine hide the backward's GEMMs, and the backward's
    # transposed ones the forward's.
    assert _flops(windows, (FORWARD,), (GRADIENT,)) > 0
    assert _flops(windows, (GRADIENT,), (FORWARD,)) > 0

    # Planted (the issue's): each of the forward's phases waits on the backward's phase of the same
    # round -> neither chunk's round windows hold the other's compute. (The backward's recomputed
    # forward, before the rounds, may still run beside the forward's first phase: the last phase's
    # gradient needs none of its residuals.)
    def forward_after_backward(forward_in, backward_out):
        wait = (0 * sum(jnp.sum(g) for g in jax.tree.leaves(backward_out)))
        return jax.tree.map(lambda a: a + wait.astype(a.dtype), forward_in)

    monkeypatch.setattr(executor, "pair_forward_reads", forward_after_backward)
    planted = _pair_windows()
    assert planted and _flops(planted, (FORWARD,), backward) == 0 and _flops(planted, (GRADIENT,), (FORWARD,)) == 0
