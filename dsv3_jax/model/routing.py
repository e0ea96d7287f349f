"""Routing: token-to-expert affinities, group-limited top-k selection, gates, load statistics.

Legend: B batch, T tokens, N = B*T tokens, D model dim, E routed experts, K top-k, G groups.

DeepSeek-V3 (report §2.1.2, eq. 12-16):
  s_{i,t} = sigmoid(u_t . e_i)                                       (eq. 15)
  selection by top-K of s + b; b is the aux-loss-free routing bias   (eq. 16)
  gates g = selected *unbiased* s, normalised over the K, times routed_scaling_factor (eq. 13)
Group-limited routing: split E experts into G groups, score each group by the sum of its top-2
biased scores, keep the best `topk_group` groups and mask the rest with -inf before the top-K,
so no token reaches an expert outside its kept groups (node-limited routing, §2.1.2).
DeepSeek-V2 style (`score_func="softmax"`): s = softmax(u . e), groups scored by their max.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.layers import dtype_of, param


class RoutingBias(nnx.Variable):
    """The aux-loss-free selection bias b (eq. 16). Not a Param: no gradient, no optimizer,
    no weight decay; the train step moves it by -gamma * sign(load - mean load) after each update."""


class Routing(NamedTuple):
    expert_idx_NK: Int[Array, "N K"]  # chosen experts per token
    gates_NK: Float[Array, "N K"]  # weights applied to the chosen experts' outputs
    scores_NE: Float[Array, "N E"]  # unbiased affinities s (fp32)


def affinities(logits_NE: Float[Array, "N E"], score_func: str) -> Float[Array, "N E"]:
    logits_NE = logits_NE.astype(jnp.float32)
    return jax.nn.sigmoid(logits_NE) if score_func == "sigmoid" else jax.nn.softmax(logits_NE, axis=-1)


def group_mask(biased_NE: Array, n_group: int, topk_group: int, score_func: str) -> Array:
    """Boolean [N, E]: experts in each token's `topk_group` best groups."""
    N, E = biased_NE.shape
    grouped_NGe = biased_NE.reshape(N, n_group, E // n_group)
    if score_func == "sigmoid":
        group_score_NG = jax.lax.top_k(grouped_NGe, 2)[0].sum(-1)  # sum of each group's top-2
    else:
        group_score_NG = grouped_NGe.max(-1)  # V2 group_limited_greedy
    _, kept_groups = jax.lax.top_k(group_score_NG, topk_group)
    kept_NG = jnp.any(jax.nn.one_hot(kept_groups, n_group, dtype=bool), axis=1)
    return jnp.repeat(kept_NG, E // n_group, axis=1)


def route(logits_NE: Float[Array, "N E"], bias_E: Float[Array, "E"], cfg: ModelConfig) -> Routing:
    """Pure DeepSeek routing; `bias_E` selects but never weights (eq. 16)."""
    scores_NE = affinities(logits_NE, cfg.score_func)
    biased_NE = scores_NE + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
    if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        keep_NE = group_mask(biased_NE, cfg.n_group, cfg.topk_group, cfg.score_func)
        biased_NE = jnp.where(keep_NE, biased_NE, -jnp.inf)
    _, expert_idx_NK = jax.lax.top_k(biased_NE, cfg.top_k)
    gates_NK = jnp.take_along_axis(scores_NE, expert_idx_NK, axis=-1)
    if cfg.norm_topk_prob:
        gates_NK = gates_NK / (gates_NK.sum(-1, keepdims=True) + 1e-20)
    return Routing(expert_idx_NK, gates_NK * cfg.routed_scaling_factor, scores_NE)


def expert_load(expert_idx_NK: Int[Array, "N K"], n_experts: int) -> Float[Array, "E"]:
    """How many (token, slot) assignments each expert received."""
    return jnp.zeros((n_experts,), jnp.float32).at[expert_idx_NK.reshape(-1)].add(1.0)


def sequence_balance_loss(scores_BTE: Float[Array, "B T E"], expert_idx_BTK: Int[Array, "B T K"],
                          top_k: int) -> Float[Array, ""]:
    """Complementary sequence-wise balance loss, eq. 17-20, without alpha (the loss applies it).

    f_i = E/(K T) * #{t : expert i chosen for token t}   (eq. 18; `chosen` is the router's actual
          selection, i.e. eq. 18's Topk with the bias and group limit applied; f is a constant)
    s'  = s / sum_j s_j                                    (eq. 19)
    P_i = mean_t s'_{i,t}                                  (eq. 20)
    L   = sum_i f_i P_i, averaged over the B sequences     (eq. 17)
    """
    B, T, E = scores_BTE.shape
    chosen_BTE = jnp.any(jax.nn.one_hot(expert_idx_BTK, E, dtype=bool), axis=2)
    f_BE = jax.lax.stop_gradient(chosen_BTE.sum(1).astype(jnp.float32) * E / (top_k * T))
    normalised_BTE = scores_BTE / scores_BTE.sum(-1, keepdims=True)
    P_BE = normalised_BTE.mean(1)
    return jnp.mean(jnp.sum(f_BE * P_BE, axis=-1))


class Router(nnx.Module):
    """Centroids e_i and the routing bias b; returns routing decisions and per-layer statistics."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        # Gating stays in fp32 (report §3.3.1: "the gating module" is kept in higher precision).
        self.centroids_DE = param(rngs, (cfg.d_model, cfg.n_routed_experts), ("embed", "router"),
                                  cfg.init_std, dtype_of(cfg.param_dtype))
        self.bias_E = RoutingBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32), logical_axes=("router",))

    def __call__(self, x_BTD: Float[Array, "B T D"]) -> tuple[Routing, dict[str, Array]]:
        B, T, D = x_BTD.shape
        logits_NE = jnp.dot(x_BTD.reshape(B * T, D).astype(jnp.float32),
                            self.centroids_DE[...].astype(jnp.float32))
        routing = route(logits_NE, self.bias_E[...], self.cfg)
        E, K = self.cfg.n_routed_experts, self.cfg.top_k
        stats = {
            "expert_load": expert_load(routing.expert_idx_NK, E),
            "balance_loss": sequence_balance_loss(routing.scores_NE.reshape(B, T, E),
                                                  routing.expert_idx_NK.reshape(B, T, K), K),
        }
        return routing, stats
