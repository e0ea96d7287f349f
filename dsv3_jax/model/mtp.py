"""Multi-Token Prediction modules (report §2.2, eq. 21-25).

Legend: B batch, T tokens, D model dim, V vocab, P MTP depth.

Module k (k = 1..P) at position i combines the previous depth's representation h^{k-1}_i with
the embedding of token t_{i+k}:
    h'^k_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]        (eq. 21)
    h^k    = TRM_k(h'^k)                                           (eq. 22)
    P^k_{i+k+1} = OutHead(RMSNorm_k(h^k_i))                          (eq. 23)
The report writes [h; emb]; the published V3 weights (enorm, hnorm, eh_proj) concatenate the
normalised embedding first, so we follow the weights. Emb and OutHead are the main model's.
Positions i > T-1-k have no t_{i+k} in the input; their outputs are computed on padding and
must be masked by the loss (causality keeps them from touching earlier positions).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Int

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.block import Block
from dsv3_jax.model.layers import Linear, RMSNorm
from dsv3_jax.model.routing import RouterStats


class MTPModule(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.enorm = RMSNorm(cfg.d_model, cfg.norm_eps, "norm", cfg.param_dtype)
        self.hnorm = RMSNorm(cfg.d_model, cfg.norm_eps, "norm", cfg.param_dtype)
        self.eh_proj = Linear((2 * cfg.d_model,), (cfg.d_model,), ("mtp_concat", "embed"), cfg, rngs)
        self.block = Block(cfg, moe=cfg.n_routed_experts > 0, rngs=rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, "norm", cfg.param_dtype)

    def __call__(self, h_prev_BTD: Array, emb_ahead_BTD: Array, cos: Array, sin: Array,
                 token_ids_BT: Array | None = None, segment_ids_BT: Array | None = None
                 ) -> tuple[Array, Array, RouterStats | None]:
        """Returns (h^k for the next depth, normalised h^k for the shared head, block stats)."""
        h_BTD, stats = self.block(self.combine(h_prev_BTD, emb_ahead_BTD), cos, sin, token_ids_BT, segment_ids_BT)
        return h_BTD, self.final_norm(h_BTD), stats

    def combine(self, h_prev_BTD: Array, emb_ahead_BTD: Array) -> Array:
        """eq. 21, in the published weights' order."""
        return self.eh_proj(jnp.concatenate([self.enorm(emb_ahead_BTD), self.hnorm(h_prev_BTD)], axis=-1))

    def cached(self, h_prev_BTD: Array, emb_ahead_BTD: Array, cos: Array, sin: Array, cache, positions_BT: Array,
               mode: str, token_ids_BT: Array | None = None):
        """Drafting step against the module's own KV cache: (normalised h^k, updated cache)."""
        h_BTD, cache = self.block.cached(self.combine(h_prev_BTD, emb_ahead_BTD), cos, sin, cache, positions_BT, mode,
                                         token_ids_BT)
        return self.final_norm(h_BTD), cache


def tokens_ahead(tokens_BT: Int[Array, "B T"], depth: int, pad_id: int = 0) -> Int[Array, "P B T"]:
    """[k-1] -> t_{i+k} for k = 1..depth: the inputs shifted left by k, right-padded with pad_id."""
    B, T = tokens_BT.shape
    padded = jnp.concatenate([tokens_BT, jnp.full((B, depth), pad_id, tokens_BT.dtype)], axis=1)
    return jnp.stack([padded[:, k:k + T] for k in range(1, depth + 1)])
