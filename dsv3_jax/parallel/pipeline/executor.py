"""Run a pipeline schedule (schedules.py) as one SPMD program under `jax.shard_map` over `pipeline`.

The schedule becomes a static tick table: at tick t, rank r runs at most one chunk (forward,
full backward, backward for inputs, or backward for weights) of one micro-batch on one of its
local stages, chosen from the table with `lax.switch`. Results travel with one `ppermute` to
each neighbour at the end of the tick (DualPipeV's turn at the bottom of the V stays on the
rank). Backward for inputs and for weights are separate `jax.vjp` pieces that recompute the
stage forward from its stored input, so W can run ticks after I (zero-bubble style).

Stages are homogeneous: `stage_fn(stage_params, x) -> (y, stage_loss, stats)` with y shaped like x
(a slice of decoder blocks; stage_loss e.g. its balance losses); `loss_fn(head_params, y, target)
-> (loss, stats)` closes the last stage. `pipeline_value_and_grad` returns the summed loss over
micro-batches, its gradient for every stage's parameters (DualPipe's two copies of a stage
summed, as its copies must stay equal), for the head's parameters and for the first stage's
inputs (to continue into the embedding), and the summed stats. Activations are stored for every
micro-batch here (a buffer of n_microbatches per local stage), not only the schedule's peak: the
executor shows the schedules compute exactly the unpipelined gradients; the memory of Table 2 is
read from the schedules.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from dsv3_jax.parallel.pipeline.schedules import Op, Schedule
from dsv3_jax.parallel.sharding import RULES

KINDS = {"F": 1, "B": 2, "I": 3, "W": 4}  # 0: idle
NONE, RIGHT, LEFT, SELF = 0, 1, 2, 3


def local_stages(schedule: Schedule) -> list[list[tuple[int, int]]]:
    """Per rank, its (direction, stage) slots, in a fixed order."""
    slots = [[] for _ in schedule.ranks]
    for r, ops in enumerate(schedule.ranks):
        for op in ops:
            if (op.direction, op.stage) not in slots[r]:
                slots[r].append((op.direction, op.stage))
    width = max(map(len, slots))
    return [s + [s[-1]] * (width - len(s)) for s in slots]  # pad: unused slots repeat the last


def tick_table(schedule: Schedule) -> np.ndarray:
    """[ticks, ranks, 7] int table: kind, slot, micro-batch, first stage?, last stage?, where the
    result goes (none / right / left / self), its slot there. Each op runs at the first tick after
    its inputs were produced (one tick per chunk; results arrive for the next tick)."""
    slots = local_stages(schedule)
    S = schedule.n_stages
    done: dict[tuple, int] = {}
    pointer, rows = [0] * len(schedule.ranks), []

    def deps(op: Op):
        if op.kind == "F":
            return [("F", op.mb, op.stage - 1, op.direction)] if op.stage else []
        if op.kind == "W":
            return [("I", op.mb, op.stage, op.direction)]
        return [("F", op.mb, op.stage, op.direction)] + ([("B", op.mb, op.stage + 1, op.direction)]
                                                         if op.stage < S - 1 else [])

    def ready(key, t):
        alt = done.get(("I",) + key[1:]) if key[0] == "B" else None
        got = done.get(key, alt)
        return got is not None and got < t

    t = 0
    while any(p < len(ops) for p, ops in zip(pointer, schedule.ranks)):
        row, ran = np.zeros((len(schedule.ranks), 7), np.int32), []
        for r, ops in enumerate(schedule.ranks):
            if pointer[r] == len(ops) or not all(ready(d, t) for d in deps(ops[pointer[r]])):
                continue
            op = ops[pointer[r]]
            pointer[r] += 1
            ran.append(op)
            target = None
            if op.kind == "F" and op.stage < S - 1:
                target = (op.direction, op.stage + 1)
            elif op.kind in ("B", "I") and op.stage > 0:
                target = (op.direction, op.stage - 1)
            send, dest_slot = NONE, 0
            if target is not None:
                dest = schedule.rank_of(Op("F", 0, target[1], target[0]))
                send = {r + 1: RIGHT, r - 1: LEFT, r: SELF}[dest]
                dest_slot = slots[dest].index(target)
            row[r] = (KINDS[op.kind], slots[r].index((op.direction, op.stage)), op.mb, op.stage == 0,
                      op.stage == S - 1, send, dest_slot)
        if not ran:
            raise ValueError(f"{schedule.name}: deadlock at tick {t}")
        for op in ran:
            done[(op.kind, op.mb, op.stage, op.direction)] = t
        rows.append(row)
        t += 1
    return np.stack(rows)


class PipelineResult(NamedTuple):
    loss: jax.Array  # sum over micro-batches of every stage's loss and the head's loss
    stage_grads: Any  # like params_S (DualPipe's two copies of a stage summed)
    head_grads: Any  # like head_params
    dx_MA: jax.Array  # d loss / d first-stage inputs
    stage_stats: Any  # stage_fn's stats summed over micro-batches, stacked over stages
    head_stats: Any  # loss_fn's stats summed over micro-batches


def pipeline_value_and_grad(stage_fn, loss_fn, schedule: Schedule, mesh, params_S, head_params, x_MA, target_M
                            ) -> PipelineResult:
    """The summed loss over micro-batches and its gradients, run pipelined over `mesh`'s `pipeline` axis.

    stage_fn(stage_params, x) -> (y, stage_loss, stats): y shaped like x; stage_loss a scalar added
    to the objective (e.g. balance losses); stats summed, no gradient. loss_fn(head_params, y, target)
    -> (loss, stats) closes the last stage. params_S: leaves stack the S stages on axis 0;
    head_params: replicated; x_MA: the micro-batches' first-stage inputs; target_M: their targets.
    """
    n_ranks = mesh.shape["pipeline"]
    if n_ranks != schedule.n_ranks:
        raise ValueError(f"schedule for {schedule.n_ranks} ranks on mesh.pipeline={n_ranks}")
    table = jnp.asarray(tick_table(schedule))
    stage_of_slot = np.array([[stage for _, stage in slots] for slots in local_stages(schedule)])  # [P, L]
    params_PL = jax.tree.map(lambda p: p[stage_of_slot], params_S)
    L, n_mb = stage_of_slot.shape[1], x_MA.shape[0]
    one_stage = jax.tree.map(lambda p: p[0], params_S)
    _, _, stats_shape = jax.eval_shape(stage_fn, one_stage, x_MA[0])
    _, head_stats_shape = jax.eval_shape(loss_fn, head_params, x_MA[0], target_M[0])
    zeros = lambda tree, lead=(): jax.tree.map(lambda a: jnp.zeros(lead + a.shape, a.dtype), tree)

    def stage_io(p, x):  # ((y, stage_loss), stats): vjp takes cotangent (dy, 1) for the pair
        y, stage_loss, stats = stage_fn(p, x)
        return (y, stage_loss.astype(jnp.float32)), stats

    def rank_program(params_1L, head_params, x_MA, target_M):
        params = jax.tree.map(lambda p: p[0], params_1L)
        rank = jax.lax.axis_index("pipeline")
        act = jnp.zeros((L, n_mb) + x_MA.shape[1:], x_MA.dtype)
        state0 = dict(stash=act, fwd_box=act, bwd_box=act, grads=jax.tree.map(jnp.zeros_like, params),
                      head_grads=jax.tree.map(jnp.zeros_like, head_params), dx=jnp.zeros_like(x_MA),
                      loss=jnp.zeros((), jnp.float32), stats=zeros(stats_shape, (L,)),
                      head_stats=zeros(head_stats_shape))
        at = lambda slot: jax.tree.map(lambda p: p[slot], params)
        no_msg = jnp.zeros(x_MA.shape[1:], x_MA.dtype)
        add = lambda tree, more: jax.tree.map(jnp.add, tree, more)

        def idle(state, row):
            return state, no_msg

        def forward(state, row):
            _, slot, mb, first, last = row[:5]
            x = jnp.where(first == 1, x_MA[mb], state["fwd_box"][slot, mb])
            (y, stage_loss), stats = stage_io(at(slot), x)

            def close(y):  # the last stage: the head's loss, its gradients and the y cotangent
                head = jax.value_and_grad(lambda hp, y: loss_fn(hp, y, target_M[mb]), argnums=(0, 1), has_aux=True)
                (loss, head_stats), (d_head, dy) = head(head_params, y)
                return loss.astype(jnp.float32), head_stats, d_head, dy

            nothing = lambda y: (jnp.zeros((), jnp.float32), zeros(head_stats_shape),
                                 jax.tree.map(jnp.zeros_like, head_params), jnp.zeros_like(y))
            is_last = last == 1
            loss, head_stats, d_head, dy = jax.lax.cond(is_last, close, nothing, y)
            state = dict(state, stash=state["stash"].at[slot, mb].set(x),
                         bwd_box=state["bwd_box"].at[slot, mb].set(jnp.where(is_last, dy, state["bwd_box"][slot, mb])),
                         loss=state["loss"] + stage_loss + loss, head_grads=add(state["head_grads"], d_head),
                         head_stats=add(state["head_stats"], head_stats),
                         stats=jax.tree.map(lambda acc, v: acc.at[slot].add(v), state["stats"], stats))
            return state, y

        def cotangent(state, slot, mb):
            return state["bwd_box"][slot, mb], jnp.ones((), jnp.float32)

        def input_grad(state, row):
            slot, mb, first = row[1], row[2], row[3]
            _, vjp, _ = jax.vjp(lambda x: stage_io(at(slot), x), state["stash"][slot, mb], has_aux=True)
            (dx,) = vjp(cotangent(state, slot, mb))
            dx_out = state["dx"].at[mb].set(jnp.where(first == 1, dx, state["dx"][mb]))
            return dict(state, dx=dx_out), dx

        def weight_grad(state, row):
            slot, mb = row[1], row[2]
            _, vjp, _ = jax.vjp(lambda p: stage_io(p, state["stash"][slot, mb]), at(slot), has_aux=True)
            (dp,) = vjp(cotangent(state, slot, mb))
            grads = jax.tree.map(lambda g, d: g.at[slot].add(d), state["grads"], dp)
            return dict(state, grads=grads), no_msg

        def full_backward(state, row):
            state, dx = input_grad(state, row)
            state, _ = weight_grad(state, row)
            return state, dx

        def deliver(state, payload, meta):
            valid, is_grad, slot, mb = meta[0] == 1, meta[1] == 1, meta[2], meta[3]
            put = lambda box, on: box.at[slot, mb].set(jnp.where(valid & on, payload, box[slot, mb]))
            return dict(state, fwd_box=put(state["fwd_box"], ~is_grad), bwd_box=put(state["bwd_box"], is_grad))

        def tick(t, state):
            row = table[t, rank]
            state, payload = jax.lax.switch(row[0], [idle, forward, full_backward, input_grad, weight_grad], state, row)
            meta = jnp.stack([jnp.int32(1), (row[0] != KINDS["F"]).astype(jnp.int32), row[6], row[2]])
            for_ = lambda where: meta * (row[5] == where)
            from_left = jax.lax.ppermute((payload, for_(RIGHT)), "pipeline", [(i, i + 1) for i in range(n_ranks - 1)])
            from_right = jax.lax.ppermute((payload, for_(LEFT)), "pipeline", [(i + 1, i) for i in range(n_ranks - 1)])
            for msg in (from_left, from_right, (payload, for_(SELF))):
                state = deliver(state, *msg)
            return state

        state = jax.lax.fori_loop(0, table.shape[0], tick, state0)
        per_rank = lambda tree: jax.tree.map(lambda a: a[None], tree)
        total = lambda tree: jax.tree.map(lambda a: jax.lax.psum(a, "pipeline"), tree)
        return (total(state["loss"]), per_rank(state["grads"]), total(state["head_grads"]), total(state["dx"]),
                per_rank(state["stats"]), total(state["head_stats"]))

    by_rank, replicated = RULES.spec(("stage",), mesh=mesh), RULES.spec((), mesh=mesh)
    run = jax.shard_map(rank_program, mesh=mesh, in_specs=(by_rank, replicated, replicated, replicated),
                        out_specs=(replicated, by_rank, replicated, replicated, by_rank, replicated), check_vma=False)
    loss, grads_PL, head_grads, dx_MA, stats_PL, head_stats = run(params_PL, head_params, x_MA, target_M)
    S = jax.tree.leaves(params_S)[0].shape[0]
    by_stage = lambda tree: jax.tree.map(
        lambda g: jnp.zeros((S,) + g.shape[2:], g.dtype).at[stage_of_slot].add(g), tree)
    return PipelineResult(loss, by_stage(grads_PL), head_grads, dx_MA, by_stage(stats_PL), head_stats)
