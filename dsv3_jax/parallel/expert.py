"""Expert-parallel dispatch and combine under `jax.shard_map` (report §3.2.2).

Legend: n tokens on this rank, K top-k, D model dim, P expert-parallel ranks (ep), C rows per
(source, destination) pair, J expert slots per row (min(K, experts per rank)).

Tokens are sharded over the batch axes (data, fsdp, expert: expert-parallel ranks are
data-parallel ranks, each with its own tokens); routed experts over `expert`, their FFN dim over
`tensor`. The routing (router, biases, balance statistics) is computed outside, on all tokens,
so expert loads are global-batch loads; it must be token-choice: assignment n * K + k belongs to
token n. Each rank runs only its own experts on only the rows routed to them; expert weights are
never gathered.

Dispatch, as DeepSeek describes it: per-destination row counts are exchanged first; a token is
sent ONCE to each rank that holds at least one of its experts (with the ids and gates of those
experts), not once per (token, expert); the destination runs its experts on the rows, weights
each expert's output by its gate and sums them, so a row comes back once: the combine mirrors the
dispatch. With groups aligned to ranks, group-limited routing (`topk_group`) bounds the ranks a
token reaches (the report's node-limited routing). Gates travel with the rows and are applied at
the destination: applying them at the source would send back one row per (token, expert), K times
the combine traffic, for the same sum.

Transports (`model.expert_dispatch`):
- "a2a" (portable, default): `all_to_all` of fixed [P, C, D] buffers, C = min(n, ceil(capacity_factor
  x n x min(K, P) / P)) rows per pair: the buffer is ~capacity_factor x n x min(K, P) rows at any P,
  so memory per rank does not grow with the expert-parallel degree. Rows past C are dropped,
  counted (`RouterStats.capacity_dropped`) and never silent; with P <= K, C = n and nothing drops.
- "ragged": the same rows and buffers with `jax.lax.ragged_all_to_all`, which moves only the real
  rows. XLA:CPU does not implement it: GPU/TPU only.
- "ring": `all_gather` the expert group's tokens, run every assignment to a local expert,
  `psum_scatter` the partial sums back. Dropless and simple; moves P x n x D per rank.

This module moves rows; what runs on them is the caller's `experts_fn` (the model's grouped
SwiGLU), so parallel/ never imports the model. Every spec comes from `parallel/sharding.py`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsv3_jax.parallel.sharding import current_rules
from dsv3_jax.platform import Platform, current_platform

# (rows sorted by expert [R, D], group sizes [E_local], gates [R], w_gate, w_up, w_down) -> gated [R, D]
ExpertsFn = Callable[..., jax.Array]


def expert_parallel_mesh():
    """The mesh in context (`jax.set_mesh`) when it has an expert axis of size > 1, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "expert" not in mesh.axis_names or mesh.shape["expert"] == 1:
        return None
    return mesh


def batch_parallel_mesh():
    """The mesh in context when it splits the batch (data / fsdp) and has no expert axis > 1: each
    device then runs its own tokens through every expert (`batch_parallel_routed_experts`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or expert_parallel_mesh() is not None or current_rules().shards("batch", dict(mesh.shape)) == 1:
        return None
    return mesh


def check_dispatch(dispatch: str, platform: Platform | None = None) -> None:
    """ValueError when `dispatch` cannot run on `platform` (default: the one the program is built for;
    ragged_all_to_all is GPU/TPU only)."""
    platform = platform or current_platform()
    if dispatch == "ragged" and platform == "cpu":
        raise ValueError("model.expert_dispatch=ragged needs a GPU or TPU (XLA:CPU has no ragged_all_to_all); "
                         "use model.expert_dispatch=a2a, the portable all-to-all")


def ranks_per_token(top_k: int, ep: int, n_group: int = 1, topk_group: int = 1) -> int:
    """The most ranks one token's experts can sit on: K, P, and with groups aligned to ranks the
    ranks its `topk_group` groups span (group-limited routing bounds the fan-out, report §3.2.2)."""
    bound = min(top_k, ep)
    if n_group > 1 and (n_group % ep == 0 or ep % n_group == 0):
        bound = min(bound, topk_group * max(1, ep // n_group))
    return bound


def pair_capacity(n_tokens: int, fan_out: int, ep: int, capacity_factor: float) -> int:
    """Rows one rank may send to another: capacity_factor x the rows a balanced router sends,
    n x fan_out / P (fan_out = `ranks_per_token`), and never more than the n a pair can need."""
    return max(1, min(n_tokens, math.ceil(capacity_factor * n_tokens * fan_out / ep)))


def _capacity(n_tokens: int, top_k: int, mesh, capacity_factor: float, groups: tuple[int, int]) -> int:
    """`pair_capacity` for `n_tokens` tokens over the mesh's batch shards, routed top_k of (n_group, topk_group)."""
    ep = mesh.shape["expert"]
    n_local = n_tokens // current_rules().shards("batch", mesh.shape)
    return pair_capacity(n_local, ranks_per_token(top_k, ep, *groups), ep, capacity_factor)


def _exchange(axis):
    """The tiled all-to-all over `axis` of [P, ...] buffers: block p goes to rank p."""
    return functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=0, concat_axis=0, tiled=True)


def _ep_layout(mesh, w_gate_EDF, w_down_EFD):
    """(token spec, gate/up weight spec, down weight spec) in the compute layout: the shard_maps' specs."""
    spec = lambda axes, a: current_rules().spec(axes, a.shape, mesh, compute=True)  # noqa: E731
    tokens = current_rules().spec(("batch",), mesh=mesh)
    return tokens, spec(("expert", "embed", "moe_ffn"), w_gate_EDF), spec(("expert", "moe_ffn", "embed"), w_down_EFD)


def _local_experts(x_RD, local_expert_R, gate_R, w_gate, w_up, w_down, experts_fn: ExpertsFn, ffn_axes):
    """Rows through this rank's experts by local expert id, gated; id local_E (no local expert) gives zeros."""
    local_E = w_gate.shape[0]
    order_R = jnp.argsort(local_expert_R, stable=True)  # rows of no local expert sort last
    group_sizes = jnp.bincount(local_expert_R, length=local_E + 1)[:local_E].astype(jnp.int32)
    y_sorted = experts_fn(x_RD[order_R], group_sizes, gate_R[order_R], w_gate, w_up, w_down)
    y_RD = jnp.zeros_like(y_sorted).at[order_R].set(y_sorted, unique_indices=True)
    return jax.lax.psum(y_RD, ffn_axes) if ffn_axes else y_RD  # down projection's partial sums over F


class Dispatch(NamedTuple):
    """Where this rank's tokens go: buffers of [P destinations, C rows] (J expert slots per row)."""
    token_PC: jax.Array  # the local token in each row; n (one past the end) for an empty row
    expert_PCJ: jax.Array  # the destination's local expert id for each slot; local_E when empty
    gate_PCJ: jax.Array  # the gate of each slot (0 when empty)
    count_P: jax.Array  # real rows per destination
    dropped: jax.Array  # assignments that did not fit the capacity


def plan_dispatch(expert_nK, gate_nK, ep: int, local_E: int, capacity: int) -> Dispatch:
    """One row per (token, destination rank) holding any of its experts, in token order; rows past
    `capacity` for a destination are dropped with all their assignments."""
    n, K = expert_nK.shape
    J = min(K, local_E)
    dest_nK = expert_nK // local_E
    hit_nP = jnp.any(dest_nK[:, :, None] == jnp.arange(ep)[None, None, :], axis=1)
    row_nP = jnp.cumsum(hit_nP, axis=0) - 1  # the token's row in its buffer to each rank
    kept_nP = hit_nP & (row_nP < capacity)
    row_nK = jnp.take_along_axis(row_nP, dest_nK, axis=1)
    kept_nK = jnp.take_along_axis(kept_nP, dest_nK, axis=1)
    # Slot of assignment k within its row: how many earlier k' of the token go to the same rank.
    same_nKK = dest_nK[:, :, None] == dest_nK[:, None, :]
    slot_nK = jnp.sum(jnp.tril(same_nKK, -1), axis=2)
    drop_row = lambda row, kept: jnp.where(kept, row, capacity)  # out of range: scatter drops it
    token_PC = jnp.full((ep, capacity), n, jnp.int32).at[
        jnp.broadcast_to(jnp.arange(ep), (n, ep)), drop_row(row_nP, kept_nP)].set(
        jnp.broadcast_to(jnp.arange(n)[:, None], (n, ep)), mode="drop")
    where = (dest_nK, drop_row(row_nK, kept_nK), slot_nK)
    expert_PCJ = jnp.full((ep, capacity, J), local_E, jnp.int32).at[where].set(expert_nK % local_E, mode="drop")
    gate_PCJ = jnp.zeros((ep, capacity, J), gate_nK.dtype).at[where].set(gate_nK, mode="drop")
    count_P = jnp.minimum(hit_nP.sum(0), capacity).astype(jnp.int32)
    return Dispatch(token_PC, expert_PCJ, gate_PCJ, count_P, jnp.sum(~kept_nK).astype(jnp.float32))


def sum_rows(y_MD: jax.Array, row_M: jax.Array, n_rows: int) -> jax.Array:
    """Per row, the sum of its assignments' gated outputs y_m (eq. 12's routed term), fp32 [n_rows, D]."""
    return jnp.zeros((n_rows, y_MD.shape[1]), jnp.float32).at[row_M].add(y_MD.astype(jnp.float32))


def _rows_through_experts(x_RD, expert_RJ, gate_RJ, weights, experts):
    """Each row through its (up to J) local experts, gated and summed: one output row per input row."""
    R, J = expert_RJ.shape
    row_M = jnp.arange(R * J) // J
    return sum_rows(experts(x_RD[row_M], expert_RJ.reshape(-1), gate_RJ.reshape(-1), *weights), row_M, R)


def _send_rows(x_nD, plan: Dispatch) -> jax.Array:
    """The rows of each destination's buffer [P, C, D] (zeros for empty rows)."""
    return jnp.concatenate([x_nD, jnp.zeros((1, x_nD.shape[1]), x_nD.dtype)])[plan.token_PC]


def _received_rows_through_experts(recv_PCD, recv_count_P, expert_PCJ, gate_PCJ, weights, experts):
    """The rows that arrived ([P sources, C, D]) through this rank's experts: [P, C, D] in x's dtype."""
    ep, capacity, D = recv_PCD.shape
    local_E = weights[0].shape[0]
    real_PC = jnp.arange(capacity)[None, :] < recv_count_P[:, None]
    expert_PCJ = jnp.where(real_PC[..., None], expert_PCJ, local_E)
    y_RD = _rows_through_experts(recv_PCD.reshape(ep * capacity, D), expert_PCJ.reshape(ep * capacity, -1),
                                 gate_PCJ.reshape(ep * capacity, -1), weights, experts)
    return y_RD.reshape(ep, capacity, D).astype(recv_PCD.dtype)


def _add_back(back_PCD, token_PC, n: int, dtype) -> jax.Array:
    """The rows come home: each token's sum over the ranks it went to [n, D]."""
    D = back_PCD.shape[-1]
    return jnp.zeros((n + 1, D), jnp.float32).at[token_PC].add(back_PCD.astype(jnp.float32))[:n].astype(dtype)


def _a2a(x_nD, expert_nK, gate_nK, *weights, ep, experts, capacity, axis, ragged):
    n, D = x_nD.shape
    plan = plan_dispatch(expert_nK, gate_nK, ep, weights[0].shape[0], capacity)
    exchange = _exchange(axis)
    recv_count_P = exchange(plan.count_P)  # counts first: how many real rows each source sends here
    send_PCD = _send_rows(x_nD, plan)
    recv_PCD = _ragged_exchange(send_PCD, plan.count_P, recv_count_P, axis) if ragged else exchange(send_PCD)
    y_PCD = _received_rows_through_experts(recv_PCD, recv_count_P, exchange(plan.expert_PCJ),
                                           exchange(plan.gate_PCJ), weights, experts)
    back_PCD = _ragged_exchange(y_PCD, recv_count_P, plan.count_P, axis) if ragged else exchange(y_PCD)
    return _add_back(back_PCD, plan.token_PC, n, x_nD.dtype), plan.dropped


def _ragged_exchange(send_PCD, send_count_P, recv_count_P, axis):
    """[P, C, D] buffers exchanged with `ragged_all_to_all`: only the first count rows of each
    destination's block travel; source s's rows land in block s of the receiver."""
    ep, capacity, D = send_PCD.shape
    me = jax.lax.axis_index(axis)
    offsets_P = jnp.arange(ep, dtype=jnp.int32) * capacity
    return jax.lax.ragged_all_to_all(
        send_PCD.reshape(ep * capacity, D), jnp.zeros((ep * capacity, D), send_PCD.dtype),
        input_offsets=offsets_P, send_sizes=send_count_P.astype(jnp.int32),
        output_offsets=jnp.full((ep,), me * capacity, jnp.int32), recv_sizes=recv_count_P.astype(jnp.int32),
        axis_name=axis).reshape(ep, capacity, D)


def _ring(x_nD, expert_nK, gate_nK, *weights, ep, experts, axis, **_):
    local_E = weights[0].shape[0]
    gather = functools.partial(jax.lax.all_gather, axis_name=axis, tiled=True)
    x_ND, expert_NK, gate_NK = gather(x_nD), gather(expert_nK), gather(gate_nK)
    mine_NK = expert_NK // local_E == jax.lax.axis_index(axis)
    local_expert_NK = jnp.where(mine_NK, expert_NK % local_E, local_E)  # local_E: not on this rank
    y_ND = _rows_through_experts(x_ND, local_expert_NK, gate_NK, weights, experts)
    y_nD = jax.lax.psum_scatter(y_ND, axis, scatter_dimension=0, tiled=True).astype(x_nD.dtype)
    return y_nD, jnp.zeros((), jnp.float32)


_TRANSPORTS = {"a2a": functools.partial(_a2a, ragged=False), "ragged": functools.partial(_a2a, ragged=True),
               "ring": _ring}


def expert_parallel_routed_experts(x_ND, expert_NK, gate_NK, w_gate_EDF, w_up_EDF, w_down_EFD, mesh,
                                   dispatch: str, experts_fn: ExpertsFn, capacity_factor: float = 2.0,
                                   groups: tuple[int, int] = (1, 1)) -> tuple[jax.Array, jax.Array]:
    """(sum_k gate[n, k] * experts_fn_{expert[n, k]}(x[n]), assignments dropped for capacity), with
    the experts spread over `mesh`'s expert axis. `groups`: (n_group, topk_group) of the router."""
    if dispatch not in _TRANSPORTS:
        raise ValueError(f"expert dispatch {dispatch!r} must be one of: {', '.join(_TRANSPORTS)}")
    check_dispatch(dispatch)
    E = w_gate_EDF.shape[0]
    ep = mesh.shape["expert"]
    if E % ep:
        raise ValueError(f"{E} routed experts cannot be split over mesh.expert={ep}")
    tokens, gate_up, down = _ep_layout(mesh, w_gate_EDF, w_down_EFD)
    experts = functools.partial(_local_experts, experts_fn=experts_fn, ffn_axes=down[1])
    local = functools.partial(_TRANSPORTS[dispatch], ep=ep, experts=experts, axis=gate_up[0],
                              capacity=_capacity(x_ND.shape[0], expert_NK.shape[1], mesh, capacity_factor, groups))
    token_axes = tokens[0] if len(tokens) else ()

    def run(*args):
        y, dropped = local(*args)
        return y, jax.lax.psum(dropped, token_axes) if token_axes else dropped

    # check_vma=False: the FP8 path may run Pallas kernels, which do not carry varying-axis types.
    shard = jax.shard_map(run, mesh=mesh, in_specs=(tokens, tokens, tokens, gate_up, gate_up, down),
                          out_specs=(tokens, current_rules().spec((), mesh=mesh)), check_vma=False)
    return shard(x_ND, expert_NK, gate_NK, w_gate_EDF, w_up_EDF, w_down_EFD)


class Sent(NamedTuple):
    """The "a2a" transport between its phases (`ep_send` .. `ep_combine`): each rank's [P, C, ...]
    buffers, stacked over the token shards on axis 0 (the rows' layout outside the shard_map)."""
    rows_PCD: jax.Array  # rows to each destination; after `ep_dispatch` from each source; after `ep_experts` their outputs
    expert_PCJ: jax.Array  # the destination's local expert ids of each row's slots
    gate_PCJ: jax.Array  # their gates
    count_P: jax.Array  # real rows to each destination (after `ep_dispatch`: from each source)
    token_PC: jax.Array  # the local token each sent row came from: where `ep_combine` adds it back


def expert_axis(mesh, w_gate_EDF):
    """The mesh axis (or axes) the routed experts are split over: what the all-to-alls run over."""
    return current_rules().spec(("expert", "embed", "moe_ffn"), w_gate_EDF.shape, mesh, compute=True)[0]


def _sent_specs(tokens) -> Sent:
    return Sent(*(tokens,) * 5)


# The "a2a" transport as four programs, for a caller that interleaves them with other work (the
# pipeline's F&B pair, parallel/pipeline/executor.py `lockstep_pair`, report §3.2.1 Figure 4): plan
# and gather the rows (compute), dispatch (all-to-all only), the experts (compute), combine
# (all-to-all, then each row added back to its token). `expert_parallel_routed_experts` with
# dispatch="a2a" is their composition in one shard_map.
def ep_send(x_ND, expert_NK, gate_NK, n_experts: int, mesh, capacity_factor: float = 2.0,
            groups: tuple[int, int] = (1, 1)) -> tuple[Sent, jax.Array]:
    """Plan the dispatch and gather the rows to send; (Sent, assignments dropped for capacity)."""
    tokens = current_rules().spec(("batch",), mesh=mesh)
    ep = mesh.shape["expert"]
    local_E = n_experts // ep
    capacity = _capacity(x_ND.shape[0], expert_NK.shape[1], mesh, capacity_factor, groups)
    token_axes = tokens[0] if len(tokens) else ()

    def run(x_nD, expert_nK, gate_nK):
        plan = plan_dispatch(expert_nK, gate_nK, ep, local_E, capacity)
        sent = Sent(_send_rows(x_nD, plan), plan.expert_PCJ, plan.gate_PCJ, plan.count_P, plan.token_PC)
        return sent, jax.lax.psum(plan.dropped, token_axes) if token_axes else plan.dropped

    return jax.shard_map(run, mesh=mesh, in_specs=(tokens,) * 3,
                         out_specs=(_sent_specs(tokens), current_rules().spec((), mesh=mesh)),
                         check_vma=False)(x_ND, expert_NK, gate_NK)


def ep_dispatch(sent: Sent, mesh, axis) -> Sent:
    """The dispatch all-to-alls: counts, rows, expert ids and gates to the ranks that hold the experts."""
    tokens = current_rules().spec(("batch",), mesh=mesh)
    exchange = _exchange(axis)

    def run(sent):
        return Sent(exchange(sent.rows_PCD), exchange(sent.expert_PCJ), exchange(sent.gate_PCJ),
                    exchange(sent.count_P), sent.token_PC)

    return jax.shard_map(run, mesh=mesh, in_specs=(_sent_specs(tokens),), out_specs=_sent_specs(tokens),
                         check_vma=False)(sent)


def ep_experts(received: Sent, w_gate_EDF, w_up_EDF, w_down_EFD, mesh, experts_fn: ExpertsFn) -> Sent:
    """The rows that arrived through this rank's experts, gated and summed per row (rows_PCD replaced)."""
    tokens, gate_up, down = _ep_layout(mesh, w_gate_EDF, w_down_EFD)
    experts = functools.partial(_local_experts, experts_fn=experts_fn, ffn_axes=down[1])

    def run(received, *weights):
        y_PCD = _received_rows_through_experts(received.rows_PCD, received.count_P, received.expert_PCJ,
                                               received.gate_PCJ, weights, experts)
        return received._replace(rows_PCD=y_PCD)

    return jax.shard_map(run, mesh=mesh, in_specs=(_sent_specs(tokens), gate_up, gate_up, down),
                         out_specs=_sent_specs(tokens), check_vma=False)(received, w_gate_EDF, w_up_EDF, w_down_EFD)


def ep_combine(done: Sent, n_tokens: int, dtype, mesh, axis) -> jax.Array:
    """The combine all-to-all, and each token's rows added back: the routed experts' sum [N, D]."""
    tokens = current_rules().spec(("batch",), mesh=mesh)
    n_local = n_tokens // current_rules().shards("batch", mesh.shape)
    exchange = _exchange(axis)

    def run(done):
        return _add_back(exchange(done.rows_PCD), done.token_PC, n_local, dtype)

    return jax.shard_map(run, mesh=mesh, in_specs=(_sent_specs(tokens),), out_specs=tokens, check_vma=False)(done)


def batch_parallel_routed_experts(x_ND, expert_NK, gate_NK, w_gate_EDF, w_up_EDF, w_down_EFD, mesh,
                                  experts_fn: ExpertsFn) -> jax.Array:
    """The routed experts under data parallelism without an expert axis: each device sorts and
    computes only its own tokens' assignments, with the weights in their compute layout (fsdp
    gathered; moe_ffn split over tensor, partial sums added). Left to GSPMD, the sort over all
    tokens' assignments is not partitioned and every data rank computes the whole batch's experts."""
    tokens, gate_up, down = _ep_layout(mesh, w_gate_EDF, w_down_EFD)
    experts = functools.partial(_local_experts, experts_fn=experts_fn, ffn_axes=down[1])

    def run(x_nD, expert_nK, gate_nK, *weights):
        return _rows_through_experts(x_nD, expert_nK, gate_nK, weights, experts).astype(x_nD.dtype)

    shard = jax.shard_map(run, mesh=mesh, in_specs=(tokens, tokens, tokens, gate_up, gate_up, down), out_specs=tokens,
                          check_vma=False)
    return shard(x_ND, expert_NK, gate_NK, w_gate_EDF, w_up_EDF, w_down_EFD)
