"""Every schedule, executed under shard_map over 4 host devices (parallel/pipeline/executor.py),
gives the unpipelined loss and gradients (stage parameters and first-stage inputs)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.parallel.pipeline.executor import MB, PAIR, pipeline_value_and_grad, stored_slots, tick_table
from dsv3_jax.parallel.pipeline.schedules import SCHEDULES, make_schedule, peak_activations
from tests.conftest import need_devices
from dsv3_jax.parallel.mesh import make_mesh

pytestmark = pytest.mark.multidevice
P_RANKS, N_MB = 4, 8


def block(p, x_BD):  # a residual MLP block: output shaped like its input
    return x_BD + jnp.tanh(x_BD @ p["w_in"]) @ p["w_out"]


def stage_fn(p, x_BD):  # with a stage loss (like MoE balance losses) and a statistic
    y_BD = block(p, x_BD)
    return y_BD, 0.01 * jnp.mean(y_BD ** 2), {"count": jnp.ones(()), "mean_abs": jnp.mean(jnp.abs(y_BD))}


def loss_fn(head, y_BD, target_BD):
    loss = jnp.mean((y_BD @ head["w"] - target_BD) ** 2)
    return loss, {"loss": loss}


def reference(params_S, head, x_MBD, target_MBD):
    def total(params, head, x_MBD):
        def one(x_BD, target_BD):
            stage_losses = 0.0
            for s in range(params["w_in"].shape[0]):
                x_BD, stage_loss, _ = stage_fn(jax.tree.map(lambda a: a[s], params), x_BD)
                stage_losses += stage_loss
            return loss_fn(head, x_BD, target_BD)[0] + stage_losses
        return jnp.sum(jax.vmap(one)(x_MBD, target_MBD))
    return jax.value_and_grad(total, argnums=(0, 1, 2))(params_S, head, x_MBD)


@pytest.mark.parametrize("keep_residuals", [False, True], ids=["recompute", "keep-residuals"])
@pytest.mark.parametrize("name", SCHEDULES)
def test_pipelined_gradients_equal_unpipelined(name, keep_residuals):
    need_devices(P_RANKS)
    schedule = make_schedule(name, P_RANKS, N_MB)
    S, D = schedule.n_stages, 8
    keys = jax.random.split(jax.random.key(0), 4)
    params = {"w_in": jax.random.normal(keys[0], (S, D, 16)) * 0.3, "w_out": jax.random.normal(keys[1], (S, 16, D)) * 0.3}
    x = jax.random.normal(keys[2], (N_MB, 2, D))
    target = jax.random.normal(keys[3], (N_MB, 2, 4))
    head = {"w": jax.random.normal(jax.random.key(9), (D, 4))}
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, "pipeline": P_RANKS})
    run = jax.jit(lambda p, h, x, t: pipeline_value_and_grad(stage_fn, loss_fn, schedule, mesh, p, h, x, t,
                                                             keep_residuals=keep_residuals))
    got = run(params, head, x, target)
    want_loss, (want_grads, want_head, want_dx) = reference(params, head, x, target)
    np.testing.assert_allclose(got.loss, want_loss, rtol=1e-5)
    # atol relative to the array's largest entry (~8 fp32 ulps there): sums of entries ~40 cannot
    # agree to 1e-6 absolute across summation orders (the pipeline adds micro-batches per rank).
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(b).max())))
    jax.tree.map(close, got.stage_grads, want_grads)
    jax.tree.map(close, got.head_grads, want_head)
    close(got.dx_MA, want_dx)
    # Stats: every stage saw every micro-batch once; the head's summed losses are the reference's.
    np.testing.assert_array_equal(got.stage_stats["count"], np.full(S, N_MB))
    head_losses = 0.0
    for m in range(N_MB):
        h = x[m]
        for s in range(S):
            h = block(jax.tree.map(lambda a: a[s], params), h)
        head_losses += loss_fn(head, h, target[m])[0]
    np.testing.assert_allclose(got.head_stats["loss"], head_losses, rtol=1e-5)


def test_tick_table_follows_the_schedule_order_and_dependencies():
    schedule = make_schedule("1f1b", 4, 8)
    table = tick_table(schedule)
    # One chunk per rank per tick: the rank's ops appear in the schedule's order.
    for r, ops in enumerate(schedule.ranks):
        ran = [(int(k), int(table.ops[t, r, 0 if k == 1 else 1, MB])) for t, k in enumerate(table.branch[:, r]) if k]
        assert ran == [({"F": 1, "B": 2}[op.kind], op.mb) for op in ops]
    # 1F1B with unit chunks: rank r starts at tick r, the last backward of rank 0 ends the run.
    assert [int(np.argmax(table.branch[:, r] > 0)) for r in range(4)] == [0, 1, 2, 3]
    assert table.branch.shape[0] == 2 * 8 + 2 * 3


@pytest.mark.parametrize("name", SCHEDULES)
def test_buffers_hold_the_schedules_peak_not_every_microbatch(name):
    """Stored stage inputs: as many entries as the schedule's peak in-flight chunks (Table 2's
    activation column), the same for 2P, 4P and 8P micro-batches (GPipe's peak is all of them)."""
    sizes = []
    for n_mb in (2 * P_RANKS, 4 * P_RANKS, 8 * P_RANKS):
        schedule = make_schedule(name, P_RANKS, n_mb)
        table = tick_table(schedule)
        assert table.n_stash == max(peak_activations(schedule))
        assert table.n_inbox <= table.n_stash + 1 and table.n_cot <= table.n_stash + 1
        sizes.append(table.n_stash)
    if name == "gpipe":
        assert sizes == [2 * P_RANKS, 4 * P_RANKS, 8 * P_RANKS]
    else:
        assert sizes[0] == sizes[1] == sizes[2] <= 2 * P_RANKS + 1


def test_dualpipe_pairs_run_fused_in_one_tick():
    schedule = make_schedule("dualpipe", P_RANKS, 4 * P_RANKS)
    table = tick_table(schedule)
    for r, ops in enumerate(schedule.ranks):
        pairs = [t for t in range(table.branch.shape[0]) if table.branch[t, r] == PAIR]
        assert len(pairs) == sum(op.overlap for op in ops) > 0
        for t in pairs:  # a forward of one micro-batch and a full backward of another, other directions
            f, b = table.ops[t, r]
            assert f[MB] != b[MB]


def test_a_rank_reads_its_stored_stages_in_place_and_receives_only_the_others():
    """Slot by slot: the local index of a stored stage read in place (no copy, gradients accumulated in
    the stored layout), or None for a stage received for the step. The equality test above runs both."""
    for name in ("gpipe", "1f1b", "zb1p"):
        assert stored_slots(make_schedule(name, P_RANKS, N_MB)) == [0]
    assert stored_slots(make_schedule("dualpipe", P_RANKS, N_MB)) == [0, None]  # stage r stored; P-1-r received
    assert stored_slots(make_schedule("dualpipev", P_RANKS, N_MB)) == [None, None]  # stages r, 2P-1-r: stored 2q, 2q+1


def test_only_stages_stored_elsewhere_travel_and_a_rank_holds_no_copy_of_its_own():
    """In the compiled program (4 host devices): 1F1B moves no stage weights at all; DualPipe moves each
    weight of its mirrored stage twice (the stage in, its gradient back) and DualPipeV its two received
    stages; and a DualPipe rank holds no copy of the stage it stores. Weights of 32 KiB a stage so they
    dominate the temporaries: DualPipe's exceed 1F1B's by 3.9 stages' bytes (the received stage, its
    accumulator, the stage a branch picks, one backward's gradients), and by 5.4 when the tick loop ran
    every slot from a stacked copy (XLA:CPU, 2026-12-07)."""
    need_devices(P_RANKS)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, "pipeline": P_RANKS}, jax.devices()[:P_RANKS])
    D, H = 8, 512
    stage_bytes = 2 * D * H * 4
    compiled = {}
    for name in ("1f1b", "dualpipe", "dualpipev"):
        schedule = make_schedule(name, P_RANKS, N_MB)
        S = schedule.n_stages
        args = ({"w_in": jnp.zeros((S, D, H)), "w_out": jnp.zeros((S, H, D))}, {"w": jnp.zeros((D, 4))},
                jnp.zeros((N_MB, 2, D)), jnp.zeros((N_MB, 2, 4)))
        step = jax.jit(lambda p, h, x, t, schedule=schedule: pipeline_value_and_grad(stage_fn, loss_fn, schedule,
                                                                                     mesh, p, h, x, t))
        compiled[name] = step.lower(*args).compile()
    moved = {name: sum(bool(re.search(rf"= \S*f32\[{D},{H}\]\S* collective-permute(-start)?\(", line))
                       for line in c.as_text().splitlines()) for name, c in compiled.items()}
    assert moved == {"1f1b": 0, "dualpipe": 2, "dualpipev": 8}, moved
    temporaries = {name: c.memory_analysis().temp_size_in_bytes for name, c in compiled.items()}
    extra = (temporaries["dualpipe"] - temporaries["1f1b"]) / stage_bytes
    assert 1 < extra < 4.5, temporaries
