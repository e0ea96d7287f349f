"""Run a pipeline schedule (schedules.py) as one SPMD program under `jax.shard_map` over `pipeline`.

The schedule becomes a static tick table: at tick t, rank r runs at most one chunk (forward,
full backward, backward for inputs, or backward for weights) of one micro-batch on one of its
local stages, chosen from the table with `lax.switch`. Results travel with one `ppermute` to
each neighbour at the end of the tick (DualPipeV's turn at the bottom of the V stays on the
rank). Backward for inputs and for weights are separate `jax.vjp` pieces that recompute the
stage forward from its stored input, so W can run ticks after I (zero-bubble style).

Stages are homogeneous: `stage_fn(stage_params, x) -> y` with y shaped like x (a slice of decoder
blocks); `loss_fn(y, target) -> scalar` closes the last stage. `pipeline_value_and_grad` returns
the summed loss over micro-batches, its gradient for every stage's parameters (DualPipe's two
copies of a stage summed, as its copies must stay equal) and for the first stage's inputs (to
continue into the embedding). Activations are stored for every micro-batch here (a buffer of
n_microbatches per local stage), not only the schedule's peak: the executor shows the schedules
compute exactly the unpipelined gradients; the memory of Table 2 is read from the schedules.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dsv3_jax.parallel.pipeline.schedules import Op, Schedule

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


def pipeline_value_and_grad(stage_fn, loss_fn, schedule: Schedule, mesh, params_S, x_MA, target_M):
    """(sum_m loss_fn(stages(x_m), target_m), d/d params_S, d/d x_MA), run pipelined over `mesh`'s
    `pipeline` axis. params_S: a pytree whose leaves stack the S stages on axis 0; x_MA: the
    micro-batches' first-stage inputs [n_microbatches, ...]; target_M: their targets."""
    n_ranks = mesh.shape["pipeline"]
    if n_ranks != schedule.n_ranks:
        raise ValueError(f"schedule for {schedule.n_ranks} ranks on mesh.pipeline={n_ranks}")
    table = jnp.asarray(tick_table(schedule))
    stage_of_slot = np.array([[stage for _, stage in slots] for slots in local_stages(schedule)])  # [P, L]
    params_PL = jax.tree.map(lambda p: p[stage_of_slot], params_S)
    L, n_mb = stage_of_slot.shape[1], x_MA.shape[0]

    def rank_program(params_1L, x_MA, target_M):
        params = jax.tree.map(lambda p: p[0], params_1L)
        rank = jax.lax.axis_index("pipeline")
        act = jnp.zeros((L, n_mb) + x_MA.shape[1:], x_MA.dtype)
        state0 = dict(stash=act, fwd_box=act, bwd_box=act, grads=jax.tree.map(jnp.zeros_like, params),
                      dx=jnp.zeros_like(x_MA), loss=jnp.zeros((), jnp.float32))
        at = lambda slot: jax.tree.map(lambda p: p[slot], params)
        no_msg = jnp.zeros(x_MA.shape[1:], x_MA.dtype)

        def idle(state, row):
            return state, no_msg

        def forward(state, row):
            _, slot, mb, first, last = row[:5]
            x = jnp.where(first == 1, x_MA[mb], state["fwd_box"][slot, mb])
            y = stage_fn(at(slot), x)
            is_last = last == 1
            loss, dy = jax.lax.cond(is_last, lambda y: jax.value_and_grad(loss_fn)(y, target_M[mb]),
                                    lambda y: (jnp.zeros((), jnp.float32), jnp.zeros_like(y)), y)
            state = dict(state, stash=state["stash"].at[slot, mb].set(x),
                         bwd_box=state["bwd_box"].at[slot, mb].set(jnp.where(is_last, dy, state["bwd_box"][slot, mb])),
                         loss=state["loss"] + jnp.where(is_last, loss, 0.0))
            return state, y

        def input_grad(state, row):
            slot, mb, first = row[1], row[2], row[3]
            _, vjp = jax.vjp(lambda x: stage_fn(at(slot), x), state["stash"][slot, mb])
            (dx,) = vjp(state["bwd_box"][slot, mb])
            dx_out = state["dx"].at[mb].set(jnp.where(first == 1, dx, state["dx"][mb]))
            return dict(state, dx=dx_out), dx

        def weight_grad(state, row):
            slot, mb = row[1], row[2]
            _, vjp = jax.vjp(lambda p: stage_fn(p, state["stash"][slot, mb]), at(slot))
            (dp,) = vjp(state["bwd_box"][slot, mb])
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
        add_rank_axis = lambda a: a[None]
        return (add_rank_axis(state["loss"]), jax.tree.map(add_rank_axis, state["grads"]), add_rank_axis(state["dx"]))

    run = jax.shard_map(rank_program, mesh=mesh, in_specs=(P("pipeline"), P(), P()),
                        out_specs=(P("pipeline"), P("pipeline"), P("pipeline")), check_vma=False)
    loss_P, grads_PL, dx_PMA = run(params_PL, x_MA, target_M)
    S = jax.tree.leaves(params_S)[0].shape[0]
    grads_S = jax.tree.map(lambda g: jnp.zeros((S,) + g.shape[2:], g.dtype).at[stage_of_slot].add(g), grads_PL)
    return loss_P.sum(), grads_S, dx_PMA.sum(0)
