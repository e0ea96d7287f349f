"""Redundant experts (report §3.4): copies of the hottest experts, placed so rank loads even out.

Legend: E logical experts, R redundant copies, S = E + R physical slots, P expert-parallel ranks
(S / P slots each, rank-major: rank r holds slots [r S/P, (r+1) S/P)), N tokens, K top-k.

DeepSeek-V3 serves prefill with 32 redundant experts re-chosen from the observed loads (the
problem its public EPLB solves). Here, from per-expert loads (a run's `router.jsonl`, or live
statistics), `plan_placement` gives the hottest experts extra copies (each copy then takes an
equal share of its expert's tokens) and packs the copies onto ranks, heaviest first, each to the
least-loaded rank with a free slot that does not hold that expert yet. `to_slots` sends each
(token, expert) assignment to one copy, round-robin over tokens, and the MoE runs on the slots'
weights `w[slot_expert]`: the output is exactly the one without copies (every copy holds the same
weights), and in training the copies' gradients add up into the one expert through that gather.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class Placement(NamedTuple):
    slot_expert: np.ndarray  # [S] the logical expert in each physical slot, rank-major
    replicas: np.ndarray  # [E] copies of each expert (>= 1)

    @property
    def copies(self) -> np.ndarray:
        """[E, max copies] slot of each copy of each expert (rows padded with the first copy)."""
        slots = [np.flatnonzero(self.slot_expert == e) for e in range(len(self.replicas))]
        width = max(map(len, slots))
        return np.stack([np.resize(s, width) for s in slots])


def identity_placement(n_experts: int) -> Placement:
    return Placement(np.arange(n_experts), np.ones(n_experts, np.int64))


def plan_placement(load_E, n_ranks: int, n_redundant: int) -> Placement:
    """Give `n_redundant` extra copies to the experts with the highest load per copy, then pack the
    copies onto `n_ranks` ranks of (E + R) / P slots each, heaviest first (greedy balanced packing)."""
    load_E = np.asarray(load_E, np.float64)
    E = load_E.shape[0]
    S = E + n_redundant
    if S % n_ranks:
        raise ValueError(f"{E} experts + {n_redundant} redundant = {S} slots cannot split over {n_ranks} ranks")
    if n_redundant > E * (n_ranks - 1):
        raise ValueError(f"{n_redundant} redundant copies exceed one copy of each expert per rank")
    replicas = np.ones(E, np.int64)
    for _ in range(n_redundant):
        share = np.where(replicas < n_ranks, load_E / replicas, -np.inf)  # a copy per rank at most
        replicas[int(np.argmax(share))] += 1
    per_rank = S // n_ranks
    held = [[] for _ in range(n_ranks)]
    rank_load = np.zeros(n_ranks)
    copies = sorted(((load_E[e] / replicas[e], e) for e in range(E) for _ in range(replicas[e])), key=lambda c: -c[0])
    for share, e in copies:
        free = [r for r in range(n_ranks) if len(held[r]) < per_rank]
        fresh = [r for r in free if e not in held[r]] or free
        r = min(fresh, key=lambda r: (rank_load[r], r))
        held[r].append(e)
        rank_load[r] += share
    return Placement(np.concatenate([np.asarray(h, np.int64) for h in held]), replicas)


def rank_loads(placement: Placement, load_E, n_ranks: int) -> np.ndarray:
    """[P] load of each rank when every copy takes an equal share of its expert's tokens."""
    load_E = np.asarray(load_E, np.float64)
    share_S = load_E[placement.slot_expert] / placement.replicas[placement.slot_expert]
    return share_S.reshape(n_ranks, -1).sum(1)


def imbalance(placement: Placement, load_E, n_ranks: int) -> float:
    """max / mean rank load (1 = perfectly even)."""
    loads = rank_loads(placement, load_E, n_ranks)
    return float(loads.max() / max(loads.mean(), 1e-12))


def to_slots(expert_NK, placement: Placement):
    """Each assignment's physical slot: token n's assignment to expert e uses copy n mod copies(e)."""
    N = expert_NK.shape[0]
    replicas_E, copies_EC = jnp.asarray(placement.replicas), jnp.asarray(placement.copies)
    choice_NK = jnp.arange(N)[:, None] % replicas_E[expert_NK]
    return copies_EC[expert_NK, choice_NK]
