"""Run a pipeline schedule (schedules.py) as one SPMD program under `jax.shard_map` over `pipeline`.

The schedule becomes a static tick table (`TickTable`): at tick t, rank r runs a forward chunk, a
backward chunk (full, for inputs, or the deferred one for weights), or DualPipe's F&B pair (a
forward of one micro-batch and a full backward of another, fused into one program so XLA can
overlap one's all-to-all with the other's compute), chosen with `lax.switch`. Results travel
with `ppermute` to the neighbours at the end of the tick (DualPipeV's turn at the bottom of the V
stays on the rank). Backward for inputs and for weights are separate `jax.vjp` pieces that
recompute the stage forward from its stored input, so W can run ticks after I (zero bubble); a
full backward B recomputes it once for both.

Composition. The `shard_map` is manual over `pipeline` only: inside a stage the data, fsdp,
tensor and expert axes stay automatic (GSPMD), and the MoE's own expert-parallel `shard_map`
nests inside it. Pipeline ranks run different branches of the switch at the same tick, so a
branch may only hold collectives within its pipeline rank's devices (all-to-all over expert,
all-reduce over data / tensor); a resharding that XLA lowers to a collective-permute over the
whole mesh would wait for ranks that run another branch (tests check the compiled HLO).

The F&B pair in Figure 4's order. Given the stage as layers in phases (`StageLayers`: the MoE
block's attention, dispatch, experts, combine), the pair runs in rounds (`lockstep_pair`): the
forward's phase k beside the backward's mirror phase, rounds closed by optimization barriers, so
each all-to-all shares its round only with the other micro-batch's attention or MLP. Without
phases (or with `keep_residuals`, whose residuals are the whole stage's) the order inside the pair
is the compiler's.

Stage-owned parameters. Stage parameters arrive stage-major ([S, ...]) and sharded over
`pipeline`: rank q stores stages q*S/P .. (q+1)*S/P - 1 and returns their gradients in the same
layout, so optimizer state and updates are 1/P per rank. The stages a rank stores and runs are read
in place and their gradients accumulate in the stored layout (`stored_slots`). A schedule that runs
other stages on a rank (DualPipe's mirrored copy, DualPipeV's V) receives them by `ppermute` at the
start of the step into a step buffer and sends their gradients back, where they are summed into the
owner's (DualPipe's two copies of a stage stay equal because they are one stored stage).

Buffers. Stored stage inputs, received activations and received cotangents live in per-rank pools
sized to the schedule's peak (intervals from the tick table, coloured greedily), not one entry per
micro-batch: memory grows with the schedule's in-flight count (Table 2), not with the number of
micro-batches. By default a stage keeps only its input and recomputes its forward in the backward:
the forward runs twice per micro-batch with a full backward B (about 4/3 of the unpipelined FLOPs,
counting a backward as two forwards) and three times when the backward is split into I and W (about
5/3). With `keep_residuals` the forward's `jax.vjp` residuals are pooled instead (the stage's
parameters among them are not copied) and the backward pieces only run the transposed computation:
the FLOPs of the unpipelined step for the memory of every layer's intermediates at the schedule's
peak. With `first_fn` (the embedding and dense layers) the first stage builds its input from the
micro-batch's tokens and sends the input's gradient on into `first_fn`'s parameters, so no
activation of the whole batch exists anywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.parallel.pipeline.schedules import Op, Schedule, dependencies, finished
from dsv3_jax.parallel.sharding import current_rules

KINDS = {"F": 1, "B": 2, "I": 3, "W": 4}  # 0: idle
PAIR = 5  # an F&B pair: forward on side 0, full backward on side 1
# Name scopes of the pair's two chunks: they label the compiled program's ops (HLO op_name), which
# is how `dsv3 compile --overlap` tells one chunk's collectives from the other's compute.
FORWARD_CHUNK, BACKWARD_CHUNK = "pair_forward_chunk", "pair_backward_chunk"
NONE, RIGHT, LEFT, SELF = 0, 1, 2, 3
# One op's columns in the table: slot, micro-batch, first stage?, last stage?, where its result
# goes (none / right / left / self), and buffer entries: its stored input, its received input
# (F), its cotangent (F on the last stage writes it, B/I/W read it), the entry at the destination.
SLOT, MB, FIRST, LAST, SEND, STASH, INBOX, COT, DEST = range(9)
BUFFER_LAYOUT = (None, "batch", "seq", "act_embed")  # [entries, b, T, D]


def pair_forward_reads(forward_in, backward_out):
    """What an F&B pair's forward chunk reads: its own input, never anything of the backward's
    (`backward_out`: in `lockstep_pair`, the backward's result of the same round; else the whole
    backward's input gradient). The identity, as a function of its own so a test can plant a
    dependency of the forward on the backward and watch the compiled overlap go."""
    return forward_in


def stage_slots(schedule: Schedule) -> list[list[tuple[int, int]]]:
    """Per rank, its (direction, stage) slots, sorted: slot j of different ranks holds different
    stages, so each (slot, owner's local index) is reached by one `ppermute`."""
    slots = [sorted({(op.direction, op.stage) for op in ops}) for ops in schedule.ranks]
    if len({len(s) for s in slots}) != 1:
        raise ValueError(f"{schedule.name}: ranks hold different numbers of stages")
    return slots


@dataclasses.dataclass(frozen=True)
class TickTable:
    branch: np.ndarray  # [ticks, ranks]: 0 idle, KINDS, or PAIR
    ops: np.ndarray  # [ticks, ranks, 2, 9]: side 0 the forward, side 1 the backward (columns above)
    by_rank: tuple  # per rank, the (stash, inbox, cot) pool entries it needs

    # Every rank's pools are sized to the largest rank's need (one SPMD program).
    @property
    def n_stash(self) -> int:  # stored stage inputs
        return max(stash for stash, _, _ in self.by_rank)

    @property
    def n_inbox(self) -> int:  # received forward activations
        return max(inbox for _, inbox, _ in self.by_rank)

    @property
    def n_cot(self) -> int:  # cotangents (received, or the head's on the last stage)
        return max(cot for _, _, cot in self.by_rank)


def _units(ops: tuple[Op, ...]) -> list[tuple[Op, ...]]:
    """A rank's ops grouped into what runs in one tick: an F marked `overlap` with the backward after it."""
    units, i = [], 0
    while i < len(ops):
        pair = ops[i].overlap and i + 1 < len(ops) and ops[i + 1].kind == "B"
        units.append(tuple(ops[i:i + 2]) if pair else (ops[i],))
        i += 2 if pair else 1
    return units


def _pack(intervals: list[tuple[float, float, Any]]) -> tuple[dict, int]:
    """Greedy interval colouring (optimal for intervals): key -> entry, and the entries needed."""
    free_at, where = [], {}
    for start, end, key in sorted(intervals, key=lambda iv: iv[:2]):
        entry = next((e for e, t in enumerate(free_at) if t < start), None)
        if entry is None:
            entry = len(free_at)
            free_at.append(end)
        free_at[entry] = end
        where[key] = entry
    return where, len(free_at)


def tick_table(schedule: Schedule) -> TickTable:
    """Each unit (op, or F&B pair) runs at the first tick after its inputs were produced, in each
    rank's order; results arrive for the next tick. Then every buffer entry's lifetime is read off
    the ticks and packed into per-rank pools."""
    slots = stage_slots(schedule)
    S, P = schedule.n_stages, schedule.n_ranks
    done: dict[tuple, int] = {}  # (kind, mb, stage, direction) -> tick
    where: dict[tuple, int] = {}  # same key -> rank
    units = [_units(ops) for ops in schedule.ranks]
    pointer, placed = [0] * P, []  # placed: (tick, rank, unit)

    t = 0
    while any(p < len(u) for p, u in zip(pointer, units)):
        ran = []
        for r in range(P):
            if pointer[r] == len(units[r]):
                continue
            unit = units[r][pointer[r]]
            if all((d := finished(done, k)) is not None and d < t for op in unit for k in dependencies(op, S)):
                ran.append((r, unit))
                pointer[r] += 1
        if not ran:
            raise ValueError(f"{schedule.name}: deadlock at tick {t}")
        for r, unit in ran:
            for op in unit:
                done[(op.kind, op.mb, op.stage, op.direction)] = t
                where[(op.kind, op.mb, op.stage, op.direction)] = r
            placed.append((t, r, unit))
        t += 1
    n_ticks = t

    # Buffer lifetimes, per rank. Written during a tick: [t, ...]; delivered at its end: [t + 0.5, ...].
    stash, inbox, cot = ([[] for _ in range(P)] for _ in range(3))
    for (kind, mb, stage, d), tick in done.items():
        r = where[(kind, mb, stage, d)]
        if kind != "F":
            continue
        backward = done.get(("W", mb, stage, d), done.get(("B", mb, stage, d)))
        stash[r].append((tick, backward, (stage, d, mb)))
        if stage > 0:
            inbox[r].append((done[("F", mb, stage - 1, d)] + 0.5, tick, (stage, d, mb)))
        first_read = finished(done, ("B", mb, stage, d))
        written = tick if stage == S - 1 else finished(done, ("B", mb, stage + 1, d)) + 0.5
        cot[r].append((written, max(backward, first_read), (stage, d, mb)))
    pools = [[_pack(per_rank) for per_rank in pool] for pool in (stash, inbox, cot)]
    entry = lambda pool, r, key: pools[pool][r][0].get(key, 0)

    branch = np.zeros((n_ticks, P), np.int32)
    table = np.zeros((n_ticks, P, 2, 9), np.int32)
    for tick, r, unit in placed:
        branch[tick, r] = PAIR if len(unit) == 2 else KINDS[unit[0].kind]
        for op in unit:
            key = (op.stage, op.direction, op.mb)
            target = None
            if op.kind == "F" and op.stage < S - 1:
                target = (op.direction, op.stage + 1)
            elif op.kind in ("B", "I") and op.stage > 0:
                target = (op.direction, op.stage - 1)
            send, dest = NONE, 0
            if target is not None:
                dest_rank = schedule.rank_of(Op("F", 0, target[1], target[0]))
                send = {r + 1: RIGHT, r - 1: LEFT, r: SELF}[dest_rank]
                dest = entry(1 if op.kind == "F" else 2, dest_rank, (target[1], target[0], op.mb))
            row = (slots[r].index((op.direction, op.stage)), op.mb, op.stage == 0, op.stage == S - 1, send,
                   entry(0, r, key), entry(1, r, key), entry(2, r, key), dest)
            table[tick, r, 0 if op.kind == "F" else 1] = row
    return TickTable(branch, table, tuple(tuple(pool[r][1] for pool in pools) for r in range(P)))


def slot_routes(schedule: Schedule) -> list[list[tuple[int, list[tuple[int, int]]]]]:
    """For slot j: [(owner's local index i, ppermute pairs owner -> rank)] that bring each rank the
    stage it runs in slot j from the rank that stores it (rank q stores stages q*S/P ..)."""
    per_rank = schedule.n_stages // schedule.n_ranks
    slots = stage_slots(schedule)
    routes = []
    for j in range(len(slots[0])):
        by_local: dict[int, list] = {}
        for r, rank_slots in enumerate(slots):
            stage = rank_slots[j][1]
            by_local.setdefault(stage % per_rank, []).append((stage // per_rank, r))
        routes.append(sorted(by_local.items()))
    return routes


def stored_slots(schedule: Schedule) -> list[int | None]:
    """Per slot, the local index of its stage when every rank stores the stage it runs there (the
    slot is read in place, no copy), else None (the stages arrive by `ppermute` into a step buffer):
    every slot of 1F1B, GPipe and ZB1P, DualPipe's own direction but not its mirrored stage P-1-r, and
    DualPipeV's stages (2P of them, stored two per rank in stage order) only on the ranks that own both."""
    n_ranks = schedule.n_ranks
    in_place = lambda by_local: (len(by_local) == 1 and len(by_local[0][1]) == n_ranks
                                 and all(src == dst for src, dst in by_local[0][1]))
    return [by_local[0][0] if in_place(by_local) else None for by_local in slot_routes(schedule)]


class ResidualLayout(NamedTuple):
    """Where a stage's `jax.vjp` residuals come from: the leaves of the vjp function, each either one
    of the stage's parameter leaves (`param_at` its index: never copied) or stored (shapes in order)."""
    treedef: Any
    param_at: tuple  # per vjp leaf: index into the stage's parameter leaves, or None when stored
    stored: tuple  # ShapeDtypeStructs of the stored leaves


def _split_residuals(vjp_fn, params) -> tuple[list, tuple]:
    """(the vjp function's leaves that are not the stage's parameters, param_at as in ResidualLayout)."""
    leaves, param_leaves = jax.tree.leaves(vjp_fn), jax.tree.leaves(params)
    param_at = tuple(next((i for i, q in enumerate(param_leaves) if leaf is q), None) for leaf in leaves)
    return [leaf for leaf, at in zip(leaves, param_at) if at is None], param_at


def residual_layout(fn, params, x) -> ResidualLayout:
    """The residuals of `jax.vjp(fn, params, x, has_aux=True)`, traced abstractly."""
    found = {}

    def probe(params, x):
        _, vjp_fn, _ = jax.vjp(fn, params, x, has_aux=True)
        stored, found["param_at"] = _split_residuals(vjp_fn, params)
        found["treedef"] = jax.tree.structure(vjp_fn)
        return stored

    stored = jax.eval_shape(probe, params, x)
    return ResidualLayout(found["treedef"], found["param_at"], tuple(stored))


class StageLayers(NamedTuple):
    """A stage as its layers, each in phases, for the F&B pair's lockstep (`lockstep_pair`): the
    stage's parameter leaves stack its layers on axis 0, and stage_fn(p, x) is, layer after layer,
    the phases in order (the first takes the layer's input, the last returns (y, layer_stats)),
    then `finish_fn` of the layers' stats stacked on axis 0."""
    phases: tuple  # (layer_params, carry) -> carry; the first takes x, the last returns (y, layer_stats)
    finish_fn: Any  # (layer_stats stacked) -> (stage_loss, stats): what stage_fn returns besides y


def _tie(a, b):
    """optimization_barrier over two trees (float0 cotangents of integer values pass outside it)."""
    leaves, treedef = jax.tree.flatten((a, b))
    real = [i for i, leaf in enumerate(leaves) if jnp.result_type(leaf) != jax.dtypes.float0]
    tied = iter(jax.lax.optimization_barrier([leaves[i] for i in real]))
    return treedef.unflatten([next(tied) if i in real else leaf for i, leaf in enumerate(leaves)])


def lockstep_pair(layers: StageLayers, p_F, x_F, p_B, x_B, dy_B):
    """The F&B pair's two chunks phase by phase in Figure 4's order (report §3.2.1). With U phases
    in all, round k runs the forward chunk's phase k beside the backward chunk's phase U-1-k, and
    an optimization barrier on the values that cross into the next round closes it: a round holds
    one phase of each micro-batch and nothing else. With phases that alternate compute and
    communication (model/block.py Block.PHASES: attention, dispatch, experts, combine) a round
    pairs one chunk's all-to-all with the other chunk's attention or MLP, so the all-to-all can
    only be hidden by the other micro-batch's work. Left to itself, XLA:TPU ran the backward's
    layers, then the forward's (experiments/results/dualpipe_overlap.md). The backward chunk
    recomputes its stage's forward first (keeping each phase's vjp), as `stage_grads` does; its
    weight gradients are outside the barriers, free to fill later rounds.

    Returns ((y_F, stage_loss_F), stats_F, (d p_B, d x_B)): what `stage_io` and `stage_grads` give."""
    n_layers, n_phases = jax.tree.leaves(p_F)[0].shape[0], len(layers.phases)
    n_units = n_layers * n_phases
    layer = lambda p, i: jax.tree.map(lambda a: a[i], p)  # noqa: E731
    stacked = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)  # noqa: E731
    last_phase = lambda u: u % n_phases == n_phases - 1  # noqa: E731
    with jax.named_scope(BACKWARD_CHUNK):
        carry, vjps, stats = x_B, [], []
        for u in range(n_units):
            carry, vjp = jax.vjp(layers.phases[u % n_phases], layer(p_B, u // n_phases), carry)
            vjps.append(vjp)
            if last_phase(u):
                carry, s = carry
                stats.append(s)
        _, finish_vjp = jax.vjp(lambda s: layers.finish_fn(s)[0].astype(jnp.float32), stacked(stats))
        (d_stats,) = finish_vjp(jnp.ones((), jnp.float32))
    carry_F, stats_F, d_carry_B, dp_B = x_F, [], dy_B, [None] * n_layers
    for k in range(n_units):
        with jax.named_scope(BACKWARD_CHUNK):
            u = n_units - 1 - k
            cot = (d_carry_B, layer(d_stats, u // n_phases)) if last_phase(u) else d_carry_B
            dp, d_carry_B = vjps[u](cot)
            i = u // n_phases
            dp_B[i] = dp if dp_B[i] is None else jax.tree.map(jnp.add, dp_B[i], dp)
        with jax.named_scope(FORWARD_CHUNK):
            carry_F = layers.phases[k % n_phases](layer(p_F, k // n_phases), pair_forward_reads(carry_F, d_carry_B))
            if last_phase(k):
                carry_F, s = carry_F
                stats_F.append(s)
        if k < n_units - 1:
            carry_F, d_carry_B = _tie(carry_F, d_carry_B)
    with jax.named_scope(FORWARD_CHUNK):
        loss_F, stats_out_F = layers.finish_fn(stacked(stats_F))
    return (carry_F, loss_F.astype(jnp.float32)), stats_out_F, (stacked(dp_B), d_carry_B)


class PipelineResult(NamedTuple):
    loss: jax.Array  # sum over micro-batches of every stage's loss and the head's loss
    stage_grads: Any  # like params_S: stage-major, sharded over pipeline (DualPipe's two copies summed)
    head_grads: Any  # like head_params (through loss_fn, and first_fn when given)
    dx_MA: jax.Array | None  # d loss / d first-stage inputs (None with first_fn)
    stage_stats: Any  # stage_fn's stats summed over micro-batches, stacked over stages
    head_stats: Any  # loss_fn's stats summed over micro-batches


def pipeline_value_and_grad(stage_fn, loss_fn, schedule: Schedule, mesh, params_S, head_params, x_MA, target_M,
                            first_fn=None, keep_residuals: bool = False, stage_layout=None,
                            stage_layers: StageLayers | None = None) -> PipelineResult:
    """The summed loss over micro-batches and its gradients, run pipelined over `mesh`'s `pipeline` axis.

    stage_fn(stage_params, x) -> (y, stage_loss, stats): y shaped like x; stage_loss a scalar added
    to the objective (e.g. balance losses); stats summed, no gradient. loss_fn(head_params, y, target)
    -> (loss, stats) closes the last stage. params_S: leaves stack the S stages on axis 0 (stored
    sharded over pipeline); head_params: whole on every rank (gathered on the way in); x_MA: the micro-batches'
    first-stage inputs; target_M: their targets. Other mesh axes shard what they shard outside.
    first_fn(head_params, x) -> the first stage's input (e.g. embedding tokens), run per
    micro-batch on the first stage, its parameter gradients added to head_grads. keep_residuals:
    store the stage forward's residuals instead of recomputing it in the backward (module docstring).
    stage_layout(tree) -> tree: the sharding constraints over the automatic axes of a tree shaped like
    params_S with the stages a rank runs on axis 0, applied to those stages and to their gradient
    accumulators. Without it GSPMD is free to pick a layout for the accumulators, and compiled for
    8 H100s it made them whole over `expert` and all-gathered the expert weights to match (small,
    data=2,pipeline=2,expert=2: four [4, 16, 512, 512] fp32 buffers where [4, 8, ...] are the rank's).
    stage_layers: stage_fn as its layers (`StageLayers`); an F&B pair then runs its two chunks in
    `lockstep_pair`'s rounds (without `keep_residuals`, whose residuals are the whole stage's).
    """
    stage_layout = stage_layout or (lambda tree: tree)
    lockstep = stage_layers is not None and not keep_residuals
    n_ranks = mesh.shape["pipeline"]
    if n_ranks != schedule.n_ranks:
        raise ValueError(f"schedule for {schedule.n_ranks} ranks on mesh.pipeline={n_ranks}")
    ticks = tick_table(schedule)
    used = sorted(set(np.unique(ticks.branch)) | {0})  # compile only the branches the schedule runs
    branch_index, op_table = jnp.asarray(np.searchsorted(used, ticks.branch)), jnp.asarray(ticks.ops)
    routes = slot_routes(schedule)
    n_slots = len(routes)
    # A slot runs in place from the stored stages, or from a step buffer of the stages received.
    stored_at = stored_slots(schedule)
    received = [j for j, i in enumerate(stored_at) if i is None]
    in_place = [j for j, i in enumerate(stored_at) if i is not None]
    stored_index = jnp.asarray([i or 0 for i in stored_at])
    received_index = jnp.asarray([received.index(j) if j in received else 0 for j in range(n_slots)])
    is_stored = jnp.asarray([i is not None for i in stored_at])
    one_stage = jax.tree.map(lambda p: p[0], params_S)
    h = x_MA[0] if first_fn is None else jax.eval_shape(first_fn, head_params, x_MA[0])  # a stage's input
    _, _, stats_shape = jax.eval_shape(stage_fn, one_stage, h)
    _, head_stats_shape = jax.eval_shape(loss_fn, head_params, h, target_M[0])
    zeros = lambda tree, lead=(): jax.tree.map(lambda a: jnp.zeros(lead + a.shape, a.dtype), tree)

    def stage_io(p, x):  # ((y, stage_loss), stats): vjp takes cotangent (dy, 1) for the pair
        y, stage_loss, stats = stage_fn(p, x)
        return (y, stage_loss.astype(jnp.float32)), stats

    # What `keep_residuals` differentiates: with the stage's layers, their parameters sliced outside
    # the vjp, so the residuals that are parameters are those very arrays (`_split_residuals` knows
    # them and they are not pooled). Slicing inside it, an unrolled stage pooled a copy of every
    # layer's weights in each stash entry (tests/test_pipelined_composed.py).
    if stage_layers is not None and keep_residuals:
        n_layers = jax.tree.leaves(params_S)[0].shape[1]
        kept_params = lambda p: [jax.tree.map(lambda a: a[i], p) for i in range(n_layers)]  # noqa: E731
        from_kept = lambda grads: jax.tree.map(lambda *g: jnp.stack(g), *grads)  # noqa: E731

        def kept_stage_io(layer_params, x):
            carry, stats = x, []
            for i, p in enumerate(layer_params):
                for phase in stage_layers.phases:
                    carry = phase(p, carry)
                carry, s = carry
                stats.append(s)
            stage_loss, stats = stage_layers.finish_fn(from_kept(stats))
            return (carry, stage_loss.astype(jnp.float32)), stats
    else:
        kept_params = from_kept = lambda tree: tree  # noqa: E731
        kept_stage_io = stage_io

    # Only the slots `stored_slots` marks None travel: a slot every rank stores is read in place.
    def receive(local):  # this rank's stored stages [S/P, ...] -> the stages it runs from others [received, ...]
        return jnp.stack([sum(jax.lax.ppermute(local[i], "pipeline", pairs) for i, pairs in routes[j])
                          for j in received])

    def send_back(received_grads, stored_grads):  # their gradients, summed into the owners' stored stages
        for k, j in enumerate(received):
            for i, pairs in routes[j]:
                back = jax.lax.ppermute(received_grads[k], "pipeline", [(dst, src) for src, dst in pairs])
                stored_grads = stored_grads.at[i].add(back)
        return stored_grads

    def rank_program(local_params, head_params, x_MA, target_M):
        # The stages a rank stores are read where they are and their gradients accumulate in the stored
        # layout; only the stages it runs for others' storage (DualPipe's mirrored one) are received.
        own = stage_layout(local_params)
        others = stage_layout(jax.tree.map(receive, local_params)) if received else None
        rank = jax.lax.axis_index("pipeline")
        pool = lambda n: current_rules().constrain(jnp.zeros((n,) + h.shape, h.dtype), BUFFER_LAYOUT)
        activation = lambda a: current_rules().constrain(a, BUFFER_LAYOUT[1:])  # one entry of a pool
        state0 = dict(stash=pool(ticks.n_stash), inbox=pool(ticks.n_inbox), cot=pool(ticks.n_cot),
                      own_grads=stage_layout(jax.tree.map(jnp.zeros_like, own)) if in_place else None,
                      received_grads=stage_layout(jax.tree.map(jnp.zeros_like, others)) if received else None,
                      head_grads=jax.tree.map(jnp.zeros_like, head_params),
                      loss=jnp.zeros((), jnp.float32), stats=zeros(stats_shape, (n_slots,)),
                      head_stats=zeros(head_stats_shape))
        if first_fn is None:
            state0["dx"] = jnp.zeros_like(x_MA)
        def at(slot):  # the parameters of the stage in `slot`: stored, or received
            if not received:
                return jax.tree.map(lambda p: p[stored_index[slot]], own)
            if not in_place:
                return jax.tree.map(lambda p: p[received_index[slot]], others)
            return jax.tree.map(lambda p, q: jnp.where(is_stored[slot], p[stored_index[slot]], q[received_index[slot]]),
                                own, others)

        no_msg = jnp.zeros(h.shape, h.dtype)
        if keep_residuals:  # traced here, in the context the stages run in (nested shard_maps differ outside)
            layout = residual_layout(kept_stage_io, kept_params(at(0)), no_msg)
            state0["residuals"] = [jnp.zeros((ticks.n_stash,) + r.shape, r.dtype) for r in layout.stored]
        add = lambda tree, more: jax.tree.map(jnp.add, tree, more)

        def forward_input(state, op):  # the micro-batch's tokens through first_fn, or the received activation
            mb, first = op[MB], op[FIRST] == 1
            if first_fn is None:
                return jnp.where(first, x_MA[mb], state["inbox"][op[INBOX]])
            # Both branches in the buffers' layout: XLA:TPU refuses a conditional whose branches
            # return differently sharded results (hlo_verifier: "Inconsistent conditional sharding").
            return jax.lax.cond(first, lambda: activation(first_fn(head_params, x_MA[mb])),
                                lambda: activation(state["inbox"][op[INBOX]]))

        def forward(state, op, x=None, ran=None):  # x: the stage's input if read already; ran: stage_io's result
            slot, mb, last = op[SLOT], op[MB], op[LAST] == 1
            x = forward_input(state, op) if x is None else x
            if ran is not None:
                (y, stage_loss), stats = ran
            elif keep_residuals:
                stage_params = kept_params(at(slot))
                (y, stage_loss), vjp_fn, stats = jax.vjp(kept_stage_io, stage_params, x, has_aux=True)
                stored, param_at = _split_residuals(vjp_fn, stage_params)
                assert param_at == layout.param_at, "the stage's residuals differ from their traced layout"
                state = dict(state, residuals=[buf.at[op[STASH]].set(r) for buf, r in zip(state["residuals"], stored)])
            else:
                (y, stage_loss), stats = stage_io(at(slot), x)

            def close(y):  # the last stage: the head's loss, its gradients and the y cotangent
                head = jax.value_and_grad(lambda hp, y: loss_fn(hp, y, target_M[mb]), argnums=(0, 1), has_aux=True)
                (loss, head_stats), (d_head, dy) = head(head_params, y)
                return loss.astype(jnp.float32), head_stats, d_head, dy

            nothing = lambda y: (jnp.zeros((), jnp.float32), zeros(head_stats_shape),
                                 jax.tree.map(jnp.zeros_like, head_params), jnp.zeros_like(y))
            loss, head_stats, d_head, dy = jax.lax.cond(last, close, nothing, y)
            cot = state["cot"]
            state = dict(state, stash=state["stash"].at[op[STASH]].set(x),
                         cot=cot.at[op[COT]].set(jnp.where(last, dy, cot[op[COT]])),
                         loss=state["loss"] + stage_loss + loss, head_grads=add(state["head_grads"], d_head),
                         head_stats=add(state["head_stats"], head_stats),
                         stats=jax.tree.map(lambda acc, v: acc.at[slot].add(v), state["stats"], stats))
            return state, y

        def cotangent(state, op):
            return state["cot"][op[COT]], jnp.ones((), jnp.float32)

        def stored_vjp(state, op):  # the forward's vjp function, from its pooled residuals
            params, stored = jax.tree.leaves(kept_params(at(op[SLOT]))), iter(buf[op[STASH]] for buf in state["residuals"])
            leaves = [next(stored) if i is None else params[i] for i in layout.param_at]
            return jax.tree.unflatten(layout.treedef, leaves)

        def stage_grads(state, op):  # (d params, d input) of the stage from one vjp; XLA drops an unused half
            if keep_residuals:
                dp, dx = stored_vjp(state, op)(cotangent(state, op))
                return from_kept(dp), dx
            _, vjp, _ = jax.vjp(stage_io, at(op[SLOT]), state["stash"][op[STASH]], has_aux=True)
            return vjp(cotangent(state, op))

        def take_dx(state, op, dx):  # the input gradient: sent on, or (first stage) into first_fn / dx_MA
            mb, first = op[MB], op[FIRST] == 1
            if first_fn is None:
                return dict(state, dx=state["dx"].at[mb].set(jnp.where(first, dx, state["dx"][mb]))), dx

            def into_first_fn(dx):  # the first stage's input gradient continues into first_fn's parameters
                _, vjp_first = jax.vjp(lambda hp: first_fn(hp, x_MA[mb]), head_params)
                return vjp_first(dx)[0]

            d_head = jax.lax.cond(first, into_first_fn, lambda dx: jax.tree.map(jnp.zeros_like, head_params), dx)
            return dict(state, head_grads=add(state["head_grads"], d_head)), dx

        def take_dp(state, op, dp):  # into the stored stage's accumulator, or the received one's
            slot = op[SLOT]

            def into(acc, index, here):
                # A masked add over the accumulator's stages, not a scatter-add at a dynamic index:
                # elementwise, it runs in whatever layout XLA gives the loop-carried accumulator (XLA:GPU
                # laid a scatter's operand out apart from the carry and copied the accumulator into the
                # branch: small DualPipe on 8 H100s, 24 MiB more temporaries).
                def add(g, d):
                    mask = (jnp.arange(g.shape[0]) == index[slot]) & here
                    return g + jnp.where(mask.reshape((-1,) + (1,) * d.ndim), d[None], jnp.zeros((), d.dtype))
                return stage_layout(jax.tree.map(add, acc, dp))

            if in_place:
                state = dict(state, own_grads=into(state["own_grads"], stored_index, is_stored[slot]))
            if received:
                state = dict(state, received_grads=into(state["received_grads"], received_index, ~is_stored[slot]))
            return state

        def input_grad(state, op):  # I: the forward recomputed (or its residuals read) for d input only
            return take_dx(state, op, stage_grads(state, op)[1])

        def weight_grad(state, op):  # W: again, for d params only
            return take_dp(state, op, stage_grads(state, op)[0]), no_msg

        def full_backward(state, op, grads=None):  # B: one recomputation (or one read) for both
            dp, dx = stage_grads(state, op) if grads is None else grads
            return take_dx(take_dp(state, op, dp), op, dx)

        # Each branch: (state, ops [2, 9]) -> (state, (forward side's message, backward side's message)).
        def single(fn, side):
            def run(state, ops):
                state, msg = fn(state, ops[side])
                return state, (msg, no_msg) if side == 0 else (no_msg, msg)
            return run

        def pair(state, ops):
            """An F&B pair (report §3.2.1, Figure 4): one program holding two independent chunks, so
            the scheduler can run one chunk's dispatch / combine all-to-all under the other's
            attention and MLP. Independent for real: the backward reads the state the tick started
            with (the buffer entries it reads are never the ones the forward writes this tick:
            `_pack` reuses an entry only after its last tick), and the two write disjoint fields
            but the accumulators, which are summed at the end. Sequencing them through one state
            made the backward's cotangent read wait for the forward's head (a false dependency).
            Given the stage's phases, the two chunks run in `lockstep_pair`'s rounds (Figure 4's
            order); else the order inside the pair is the compiler's."""
            f, b = ops
            with jax.named_scope(FORWARD_CHUNK):
                x = forward_input(state, f)
            if lockstep:
                y_and_loss, stats, grads = lockstep_pair(stage_layers, at(f[SLOT]), x, at(b[SLOT]),
                                                         state["stash"][b[STASH]], state["cot"][b[COT]])
                ran = (y_and_loss, stats)
            else:
                with jax.named_scope(BACKWARD_CHUNK):
                    grads = stage_grads(state, b)
                x, ran = pair_forward_reads(x, grads[1]), None
            zero_head = jax.tree.map(jnp.zeros_like, state["head_grads"])  # the backward's head gradients: added below
            with jax.named_scope(BACKWARD_CHUNK):
                after_backward, dx = full_backward(dict(state, head_grads=zero_head), b, grads)
            with jax.named_scope(FORWARD_CHUNK):
                after_forward, y = forward(state, f, x, ran)
            merged = dict(after_forward, own_grads=after_backward["own_grads"],
                          received_grads=after_backward["received_grads"],
                          head_grads=add(after_forward["head_grads"], after_backward["head_grads"]))
            if first_fn is None:
                merged["dx"] = after_backward["dx"]
            return merged, (y, dx)

        branches = [lambda state, ops: (state, (no_msg, no_msg)), single(forward, 0), single(full_backward, 1),
                    single(input_grad, 1), single(weight_grad, 1), pair]

        def deliver(state, box, payload, meta):
            valid, entry = meta[0] == 1, meta[1]
            return dict(state, **{box: state[box].at[entry].set(jnp.where(valid, payload, state[box][entry]))})

        def tick(t, state):
            ops = op_table[t, rank]
            state, payloads = jax.lax.switch(branch_index[t, rank], [branches[k] for k in used], state, ops)
            for side, box in ((0, "inbox"), (1, "cot")):  # an absent side's row is zeros: sends nothing
                send = ops[side, SEND]
                meta = lambda where: jnp.stack([(send == where).astype(jnp.int32), ops[side, DEST]])
                right = [(i, i + 1) for i in range(n_ranks - 1)]
                left = [(i + 1, i) for i in range(n_ranks - 1)]
                for msg in (jax.lax.ppermute((payloads[side], meta(RIGHT)), "pipeline", right),
                            jax.lax.ppermute((payloads[side], meta(LEFT)), "pipeline", left),
                            (payloads[side], meta(SELF))):
                    state = deliver(state, box, *msg)
            return state

        state = jax.lax.fori_loop(0, ticks.branch.shape[0], tick, state0)
        per_rank = lambda tree: jax.tree.map(lambda a: a[None], tree)
        total = lambda tree: jax.tree.map(lambda a: jax.lax.psum(a, "pipeline"), tree)
        stored_grads = state["own_grads"] if in_place else stage_layout(jax.tree.map(jnp.zeros_like, own))
        if received:
            stored_grads = jax.tree.map(send_back, state["received_grads"], stored_grads)
        dx = total(state["dx"]) if first_fn is None else jnp.zeros(())
        return (total(state["loss"]), stored_grads, total(state["head_grads"]), dx, per_rank(state["stats"]),
                total(state["head_stats"]))

    by_rank, replicated = current_rules().spec(("stage",), mesh=mesh), jax.sharding.PartitionSpec()
    # Under jit also when called eagerly: an eager shard_map that is manual over some axes only is refused.
    run = jax.jit(jax.shard_map(rank_program, mesh=mesh, in_specs=(by_rank, replicated, replicated, replicated),
                                out_specs=(replicated, by_rank, replicated, replicated, by_rank, replicated),
                                check_vma=False, axis_names=frozenset({"pipeline"})))
    loss, stage_grads, head_grads, dx_MA, stats_PJ, head_stats = run(params_S, head_params, x_MA, target_M)
    stage_of_slot = np.array([[stage for _, stage in slots] for slots in stage_slots(schedule)])  # [P, slots]
    S = jax.tree.leaves(params_S)[0].shape[0]
    by_stage = lambda tree: jax.tree.map(
        lambda g: jnp.zeros((S,) + g.shape[2:], g.dtype).at[stage_of_slot].add(g), tree)
    return PipelineResult(loss, stage_grads, head_grads, dx_MA if first_fn is None else None, by_stage(stats_PJ),
                          head_stats)
