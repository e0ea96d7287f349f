"""Rematerialisation policies: which of a layer's activations its backward pass keeps (`model.remat`).

The blocks tag the activations a policy chooses between with `checkpoint_name` (`name`, below);
everything else a layer computes is an unnamed intermediate. The names (config.REMAT_NAMES):

  norm        every RMSNorm output (the block's two, MLA's q and kv latent norms)
  mla_down    the down-projections' outputs: c_Q (eq. 6) and [c_KV | k_R] (eq. 1, 3)
  mla_up      the up-projections' outputs, per head: q_C and q_R (eq. 7-8), k_C (eq. 2), v_C (eq. 5),
              and the keys and queries assembled from them for attention
  attention   the attention core's output, the input of W_O (eq. 11), and its softmax statistics
  residual    the residual stream between attention and FFN (the FFN's input)
  swiglu_in   the gate and up projections' outputs (dense FFN, shared and routed experts)
  swiglu_out  silu(gate) * up (times the routed experts' gates), the input of the down projection
  expert_in   the routed experts' input rows, sorted by expert (after the dispatch)

The routed experts' outputs need no name: their gates are applied before the down projection
(model/moe.py), so the combine's backward needs none of them.

Policies:
  none    keep everything (no rematerialisation)
  full    keep each layer's input only and recompute the whole layer
  report  the report's choice: recompute every RMSNorm and the MLA up-projections (§3.2.3) and the
          SwiGLU output from its cached input (§3.3.4); keep the rest (REPORT_KEPT)
  a,b,..  keep only the named activations (and each layer's input); recompute the rest

Every policy is "keep only these names": JAX's "keep all but these names" saves the unnamed value a
named one is an identity of, and every residual of a custom VJP (this package's Linear, attention
core and blocked experts have one), so it would recompute nothing. What no name covers (the router's
small [tokens, experts] scores, RoPE, casts) is recomputed under every policy but `none`.
The hand-written VJPs name their residuals inside their forward rules (the attention core's output
and softmax statistics, blocked_swiglu's gate and up products), so a policy can keep them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax.config import REMAT_NAMES

# What `report` keeps: all the names but the RMSNorm, MLA up-projection and SwiGLU outputs.
REPORT_RECOMPUTED = ("norm", "mla_up", "swiglu_out")
REPORT_KEPT = tuple(n for n in REMAT_NAMES if n not in REPORT_RECOMPUTED)


def name(x: jax.Array, activation: str) -> jax.Array:
    """Tag `x` as one of the activations a policy can keep (an identity outside jax.checkpoint)."""
    assert activation in REMAT_NAMES, activation
    return checkpoint_name(x, activation)


def policy(remat: str) -> Callable | None:
    """The jax.checkpoint policy of `model.remat` (validated in config.py); None for no checkpoint."""
    if remat == "none":
        return None
    if remat == "full":
        return jax.checkpoint_policies.nothing_saveable
    return jax.checkpoint_policies.save_only_these_names(*(REPORT_KEPT if remat == "report" else remat.split(",")))


def rematerialised(body: Callable, remat: str) -> Callable:
    """`body` (one layer of a scan) under `remat`'s policy."""
    chosen = policy(remat)
    return body if chosen is None else jax.checkpoint(body, policy=chosen)
