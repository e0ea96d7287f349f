"""Expert-parallel dispatch and combine under `jax.shard_map` (report §3.2.2).

Tokens are sharded over the token axes (data, fsdp, expert: expert-parallel ranks are
data-parallel ranks, each with its own tokens); routed experts over `expert`, their FFN dim over
`tensor`. The routing (router, biases, balance statistics) is computed outside, on all tokens,
so expert loads are global-batch loads; it must be token-choice: assignment n * K + k belongs to
token n. Two dispatch schemes, both dropless and exact (tested against the single-device MoE):

- "a2a": sort each rank's assignments by destination rank, `all_to_all` the rows to the ranks
  owning their experts, run the local experts, `all_to_all` the results back, gate and add.
  Shapes are static, so each (source, destination) slot is sized for all m = n_tokens x K local
  assignments: no token is ever dropped however skewed the routing, at the price of ep x m rows
  of buffer per rank (the grouped GEMM skips the empty rows, so no FLOPs are wasted).
  `jax.lax.ragged_all_to_all` would send only the real rows, but XLA:CPU does not implement it
  (UNIMPLEMENTED in jax 0.10), so it is left for a GPU/TPU session.
- "ring": `all_gather` the tokens of the expert group, run every assignment that goes to a local
  expert, `psum_scatter` the partial outputs back to their ranks. Simple; moves ep x n x D
  tokens and n x D partial sums per rank.

This module moves rows; what runs on them is the caller's `experts_fn` (the model's grouped
SwiGLU), so parallel/ never imports the model. Every spec comes from `parallel/sharding.py`.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from dsv3_jax.parallel.sharding import RULES

# (rows sorted by expert [R, D], group sizes [E_local], w_gate, w_up, w_down) -> [R, D]
ExpertsFn = Callable[..., jax.Array]


def expert_parallel_mesh():
    """The mesh in context (`jax.set_mesh`) when it has an expert axis of size > 1, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "expert" not in mesh.axis_names or mesh.shape["expert"] == 1:
        return None
    return mesh


def _local_experts(x_RD, local_expert_R, w_gate, w_up, w_down, experts_fn: ExpertsFn, ffn_axes):
    """Rows through this rank's experts by local expert id; id local_E (no local expert) gives zeros."""
    local_E = w_gate.shape[0]
    order_R = jnp.argsort(local_expert_R, stable=True)  # rows of no local expert sort last
    group_sizes = jnp.bincount(local_expert_R, length=local_E + 1)[:local_E].astype(jnp.int32)
    y_sorted = experts_fn(x_RD[order_R], group_sizes, w_gate, w_up, w_down)
    y_RD = jnp.zeros_like(y_sorted).at[order_R].set(y_sorted, unique_indices=True)
    return jax.lax.psum(y_RD, ffn_axes) if ffn_axes else y_RD  # down projection's partial sums over F


def _a2a(x_nD, expert_nK, gate_nK, *weights, ep, experts):
    n, K = expert_nK.shape
    m, local_E = n * K, weights[0].shape[0]
    expert_m = expert_nK.reshape(m)
    order_m = jnp.argsort(expert_m, stable=True)  # by expert, hence by destination rank
    token_m, dest_m = order_m // K, expert_m[order_m] // local_E
    count_P = jnp.bincount(dest_m, length=ep)
    slot_m = jnp.arange(m) - (jnp.cumsum(count_P) - count_P)[dest_m]
    # Dispatch into [destination rank, slot] buffers; empty slots carry local expert id local_E.
    send_PmD = jnp.zeros((ep, m, x_nD.shape[1]), x_nD.dtype).at[dest_m, slot_m].set(x_nD[token_m])
    send_expert_Pm = jnp.full((ep, m), local_E, jnp.int32).at[dest_m, slot_m].set(expert_m[order_m] % local_E)
    a2a = functools.partial(jax.lax.all_to_all, axis_name="expert", split_axis=0, concat_axis=0, tiled=True)
    y_RD = experts(a2a(send_PmD).reshape(ep * m, -1), a2a(send_expert_Pm).reshape(ep * m), *weights)
    # Combine: back to the source ranks, gate, add into the tokens.
    y_mD = a2a(y_RD.reshape(ep, m, -1))[dest_m, slot_m].astype(jnp.float32)
    y_mD = y_mD * gate_nK.reshape(m)[order_m, None]
    return jnp.zeros(x_nD.shape, jnp.float32).at[token_m].add(y_mD).astype(x_nD.dtype)


def _ring(x_nD, expert_nK, gate_nK, *weights, ep, experts):
    K, local_E = expert_nK.shape[1], weights[0].shape[0]
    gather = functools.partial(jax.lax.all_gather, axis_name="expert", tiled=True)
    x_ND, expert_NK, gate_NK = gather(x_nD), gather(expert_nK), gather(gate_nK)
    mine_NK = expert_NK // local_E == jax.lax.axis_index("expert")
    local_expert_M = jnp.where(mine_NK, expert_NK % local_E, local_E).reshape(-1)
    token_M = jnp.arange(local_expert_M.shape[0]) // K
    y_MD = experts(x_ND[token_M], local_expert_M, *weights).astype(jnp.float32) * gate_NK.reshape(-1, 1)
    y_ND = jnp.zeros(x_ND.shape, jnp.float32).at[token_M].add(y_MD)
    return jax.lax.psum_scatter(y_ND, "expert", scatter_dimension=0, tiled=True).astype(x_nD.dtype)


_DISPATCH = {"a2a": _a2a, "ring": _ring}


def expert_parallel_routed_experts(x_ND, expert_NK, gate_NK, w_gate_EDF, w_up_EDF, w_down_EFD, mesh,
                                   dispatch: str, experts_fn: ExpertsFn):
    """sum_k gate[n, k] * experts_fn_{expert[n, k]}(x[n]) with the experts spread over `mesh`'s expert axis."""
    if dispatch not in _DISPATCH:
        raise ValueError(f"expert dispatch {dispatch!r} must be one of: {', '.join(_DISPATCH)}")
    E = w_gate_EDF.shape[0]
    ep = mesh.shape["expert"]
    if E % ep:
        raise ValueError(f"{E} routed experts cannot be split over mesh.expert={ep}")
    spec = lambda axes, a: RULES.spec(axes, a.shape, mesh, compute=True)
    tokens = RULES.spec(("batch",), mesh=mesh)
    gate_up, down = spec(("expert", "embed", "moe_ffn"), w_gate_EDF), spec(("expert", "moe_ffn", "embed"), w_down_EFD)
    experts = functools.partial(_local_experts, experts_fn=experts_fn, ffn_axes=down[1])
    local = functools.partial(_DISPATCH[dispatch], ep=ep, experts=experts)
    # check_vma=False: the FP8 path may run Pallas kernels, which do not carry varying-axis types.
    shard = jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens, gate_up, gate_up, down),
                          out_specs=tokens, check_vma=False)
    return shard(x_ND, expert_NK, gate_NK, w_gate_EDF, w_up_EDF, w_down_EFD)
