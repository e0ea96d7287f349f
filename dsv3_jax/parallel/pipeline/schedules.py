"""Pipeline schedules as data (report §3.2.1, Table 2): per rank, the ordered list of chunk ops.

An `Op` is one chunk of work on one rank: the forward ("F"), the full backward ("B"), the backward
for inputs only ("I") or the deferred backward for weights ("W") of micro-batch `mb` at pipeline
stage `stage` of direction `direction` (DualPipe feeds micro-batches from both ends; everything
else has one direction). `overlap` marks an F that runs overlapped with the next op (DualPipe's
F&B pairs). Schedules:

- GPipe: all forwards, then all backwards.
- 1F1B: P - 1 - r warm-up forwards on rank r, then one forward / one backward, then the rest.
- ZB1P (zero bubble, Qi et al. 2023, "ZB-H1"): 1F1B with each backward split into input and
  weight parts; rank r holds back its first r weight parts and runs them in the cool-down, where
  1F1B idles.
- DualPipe: P ranks (even), rank r holds stage r of the downward pipeline and stage P - 1 - r of
  the upward one (two parameter copies); half the micro-batches enter at each end. Eight phases
  per rank with h = min(r, P - 1 - r) (the published reference schedule, deepseek-ai/DualPipe):
  F x 2(P/2-h-1); F0F1 x (h+1); B1W1F1 x (P/2-h-1); F0B1F1B0 x (n/2-P+h+1); B1F1B0 x (P/2-h-1);
  B1B0 x (h+1) (the second half deferring W); WB0 x (P/2-h-1); W x (h+1). Phase 0 is the
  direction in which the rank is early (stage h), phase 1 the one in which it is late.
- DualPipeV: DualPipe cut in half: 2P stages on P ranks in a V (rank r holds stages r and
  2P - 1 - r), one direction, rank 0 holds both the input and the loss; the same eight phases
  with h = r and P in place of P/2.

`simulate` runs a schedule against chunk costs and checks it (every op exactly once, on the rank
holding its stage, dependencies met, no deadlock); `bubble` and `peak_activations` read it.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import NamedTuple

from dsv3_jax.config import PipelineSchedule

SCHEDULES: tuple[str, ...] = typing.get_args(PipelineSchedule)


class Op(NamedTuple):
    kind: str  # "F" forward, "B" full backward, "I" backward for inputs, "W" backward for weights
    mb: int
    stage: int
    direction: int = 0
    overlap: bool = False  # this F runs overlapped with the rank's next op (an F&B pair)


@dataclasses.dataclass(frozen=True)
class Schedule:
    name: str
    n_ranks: int
    n_microbatches: int
    n_stages: int  # stages per direction
    ranks: tuple[tuple[Op, ...], ...]  # ranks[r]: rank r's ops, in execution order

    def rank_of(self, op: Op) -> int:
        if self.name == "dualpipe":
            return op.stage if op.direction == 0 else self.n_ranks - 1 - op.stage
        if self.name == "dualpipev":
            return op.stage if op.stage < self.n_ranks else self.n_stages - 1 - op.stage
        return op.stage


def gpipe(n_ranks: int, n_mb: int) -> Schedule:
    ranks = tuple(tuple([Op("F", m, r) for m in range(n_mb)] + [Op("B", m, r) for m in range(n_mb)])
                  for r in range(n_ranks))
    return Schedule("gpipe", n_ranks, n_mb, n_ranks, ranks)


def one_f_one_b(n_ranks: int, n_mb: int) -> Schedule:
    ranks = []
    for r in range(n_ranks):
        warmup = min(n_ranks - 1 - r, n_mb)
        ops = [Op("F", m, r) for m in range(warmup)]
        for i in range(n_mb - warmup):
            ops += [Op("F", warmup + i, r), Op("B", i, r)]
        ops += [Op("B", m, r) for m in range(n_mb - warmup, n_mb)]
        ranks.append(tuple(ops))
    return Schedule("1f1b", n_ranks, n_mb, n_ranks, tuple(ranks))


def zero_bubble_1p(n_ranks: int, n_mb: int) -> Schedule:
    ranks = []
    for r in range(n_ranks):
        warmup = min(n_ranks - 1 - r, n_mb)
        ops, deferred = [Op("F", m, r) for m in range(warmup)], []
        for m in range(n_mb):  # one input-backward each; a forward first while any are left
            if warmup + m < n_mb:
                ops.append(Op("F", warmup + m, r))
            ops.append(Op("I", m, r))
            deferred.append(m)
            if len(deferred) > r or warmup + m >= n_mb:  # the steady state keeps r weight parts back
                ops.append(Op("W", deferred.pop(0), r))
        ops += [Op("W", m, r) for m in deferred]
        ranks.append(tuple(ops))
    return Schedule("zb1p", n_ranks, n_mb, n_ranks, tuple(ranks))


def _dual_phases(h: int, half: int, per_phase: int) -> list[tuple[str, int]]:
    """The eight DualPipe phases for a rank at distance h from its nearer end, as (kind, phase)
    chunks; "B*" is a backward whose weight part is deferred to a later "W" (zero bubble)."""
    ops: list[tuple[str, int]] = []
    ops += [("F", 0)] * ((half - h - 1) * 2)  # 1: forward warm-up of phase 0
    ops += [("F", 0), ("F", 1)] * (h + 1)  # 2: F0 F1
    ops += [("B*", 1), ("W", -1), ("F", 1)] * (half - h - 1)  # 3: B1 W1 F1
    ops += [("F&", 0), ("B", 1), ("F&", 1), ("B", 0)] * (per_phase - 2 * half + h + 1)  # 4: F0B1 F1B0 pairs
    ops += [("B", 1), ("F&", 1), ("B", 0)] * (half - h - 1)  # 5: B1 F1B0
    step6 = [("B", 1), ("B", 0)] * (h + 1)  # 6: B1 B0, the second half deferring W
    ops += [(kind + ("*" if i >= len(step6) - (h + 1) else ""), p) for i, (kind, p) in enumerate(step6)]
    ops += [("W", -1), ("B*", 0)] * (half - h - 1)  # 7: W B0
    ops += [("W", -1)] * (h + 1)  # 8: drain W
    return ops


def _dual(name: str, n_ranks: int, n_mb: int) -> Schedule:
    v = name == "dualpipev"
    if n_ranks % 2 and not v or n_mb % 2:
        raise ValueError(f"{name} needs an even number of ranks and of micro-batches (got {n_ranks}, {n_mb})")
    half, per_phase = (n_ranks, n_mb) if v else (n_ranks // 2, n_mb // 2)
    if per_phase < 2 * half:
        raise ValueError(f"{name} needs at least {2 * n_ranks if not v else 2 * n_ranks} micro-batches for "
                         f"{n_ranks} ranks (got {n_mb})")
    n_stages = 2 * n_ranks if v else n_ranks
    ranks = []
    for r in range(n_ranks):
        h = r if v else min(r, n_ranks - 1 - r)
        if v:  # phase 0: stage r, phase 1: stage 2P-1-r, one direction
            where = {0: (0, r), 1: (0, n_stages - 1 - r)}
        else:  # phase 0: the direction in which this rank holds stage h
            early = 0 if r < n_ranks // 2 else 1
            where = {0: (early, h), 1: (1 - early, n_ranks - 1 - h)}
        next_mb = {("F", 0): 0, ("F", 1): 0, ("B", 0): 0, ("B", 1): 0}
        deferred, ops = [], []
        for kind, phase in _dual_phases(h, half, per_phase):
            if kind == "W":
                ops.append(deferred.pop(0)._replace(kind="W"))
                continue
            base = kind[0]
            direction, stage = where[phase]
            m = next_mb[(base, phase)]
            next_mb[(base, phase)] += 1
            mb = m + (direction * per_phase if not v else 0)
            op = Op({"F": "F", "B": "I" if kind.endswith("*") else "B"}[base], mb, stage, direction,
                    overlap=kind == "F&")
            if op.kind == "I":
                deferred.append(op)
            ops.append(op)
        ranks.append(tuple(ops))
    return Schedule(name, n_ranks, n_mb, n_stages, tuple(ranks))


def make_schedule(name: str, n_ranks: int, n_microbatches: int) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"pipeline schedule {name!r} must be one of: {', '.join(SCHEDULES)}")
    builders = {"gpipe": gpipe, "1f1b": one_f_one_b, "zb1p": zero_bubble_1p}
    if name in builders:
        return builders[name](n_ranks, n_microbatches)
    return _dual(name, n_ranks, n_microbatches)


# Simulation --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Costs:
    """Chunk times: F forward, B full backward, W its weight part, FB an overlapped F&B pair
    (default: no overlap, F + the paired backward)."""

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float | None = None


@dataclasses.dataclass(frozen=True)
class Timeline:
    schedule: Schedule
    start: dict  # (rank, index in rank's ops) -> start time
    end: dict
    busy: tuple[float, ...]  # per rank

    @property
    def makespan(self) -> float:
        return max(self.end.values())

    def bubble(self, rank: int) -> float:
        """Idle time of `rank` between the first op anywhere and its own last op."""
        last = max(self.end[(rank, i)] for i in range(len(self.schedule.ranks[rank])))
        return last - self.busy[rank]


def _cost(op: Op, costs: Costs) -> float:
    return {"F": costs.F, "B": costs.B, "I": costs.B - costs.W, "W": costs.W}[op.kind]


def dependencies(op: Op, n_stages: int) -> list[tuple]:
    """The chunks `op` waits for, as (kind, mb, stage, direction): a forward the previous stage's
    forward; a backward its own forward and the next stage's backward; W its own input-backward."""
    if op.kind == "F":
        return [("F", op.mb, op.stage - 1, op.direction)] if op.stage > 0 else []
    if op.kind == "W":
        return [("I", op.mb, op.stage, op.direction)]
    later = [] if op.stage == n_stages - 1 else [("B", op.mb, op.stage + 1, op.direction)]
    return [("F", op.mb, op.stage, op.direction)] + later


def finished(done: dict, key: tuple):
    """When chunk `key` finished in `done` (None if not yet): a full backward and an input-backward
    both release the previous stage."""
    if key[0] == "B":
        return done.get(key, done.get(("I",) + key[1:]))
    return done.get(key)


def simulate(schedule: Schedule, costs: Costs = Costs()) -> Timeline:
    """Run every rank's ops in order, each as soon as its rank is free and its inputs exist
    (forward needs the previous stage's forward, backward the next stage's backward and its own
    forward, W its own input-backward). Raises ValueError on a malformed or deadlocked schedule."""
    S = schedule.n_stages
    per_dir = schedule.n_microbatches // (2 if schedule.name == "dualpipe" else 1)
    want = {(k, d * per_dir + m if schedule.name == "dualpipe" else m, s, d)
            for d in range(2 if schedule.name == "dualpipe" else 1) for m in range(per_dir) for s in range(S)
            for k in ("F", "B")}
    seen, done = set(), {}  # done: (kind, mb, stage, direction) -> end time
    for r, ops in enumerate(schedule.ranks):
        for op in ops:
            if schedule.rank_of(op) != r:
                raise ValueError(f"{schedule.name}: rank {r} runs {op}, "
                                 f"whose stage lives on rank {schedule.rank_of(op)}")
            key = (op.kind, op.mb, op.stage, op.direction)
            if key in seen:
                raise ValueError(f"{schedule.name}: {op} appears twice")
            seen.add(key)
    full = {("B" if k in ("B", "I") else k, m, s, d) for k, m, s, d in seen if k != "W"}
    if full != want:
        raise ValueError(f"{schedule.name}: missing or extra chunks: {sorted(want ^ full)[:4]}")
    split = {(m, s, d) for k, m, s, d in seen if k == "I"}
    if split != {(m, s, d) for k, m, s, d in seen if k == "W"}:
        raise ValueError(f"{schedule.name}: every deferred backward needs exactly one W")

    pointer, clock = [0] * len(schedule.ranks), [0.0] * len(schedule.ranks)
    start, end, busy = {}, {}, [0.0] * len(schedule.ranks)
    remaining = sum(len(ops) for ops in schedule.ranks)
    while remaining:
        progressed = False
        for r, ops in enumerate(schedule.ranks):
            i = pointer[r]
            if i == len(ops):
                continue
            op = ops[i]
            group = [op, ops[i + 1]] if op.overlap and i + 1 < len(ops) else [op]
            times = [finished(done, d) for o in group for d in dependencies(o, S)]
            if any(t is None for t in times):
                continue
            t0 = max([clock[r], *times])
            cost = sum(_cost(o, costs) for o in group)
            if len(group) == 2 and costs.FB is not None:
                cost = costs.FB
            for j, o in enumerate(group):
                start[(r, i + j)], end[(r, i + j)] = t0, t0 + cost
                done[(o.kind, o.mb, o.stage, o.direction)] = t0 + cost
            clock[r] = t0 + cost
            busy[r] += cost
            pointer[r] += len(group)
            remaining -= len(group)
            progressed = True
        if not progressed:
            stuck = {r: schedule.ranks[r][pointer[r]] for r in range(len(schedule.ranks))
                     if pointer[r] < len(schedule.ranks[r])}
            raise ValueError(f"{schedule.name}: deadlock; ranks wait at {stuck}")
    return Timeline(schedule, start, end, tuple(busy))


def peak_activations(schedule: Schedule) -> list[int]:
    """Per rank, the most micro-batch chunks whose forward ran and whose backward (the weight
    part included) has not: what the rank must keep stored."""
    peaks = []
    for ops in schedule.ranks:
        live = peak = 0
        for op in ops:
            live += {"F": 1, "B": -1, "I": 0, "W": -1}[op.kind]
            peak = max(peak, live)
        peaks.append(peak)
    return peaks
