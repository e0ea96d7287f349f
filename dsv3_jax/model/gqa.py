"""Standard attention with per-head keys and values, for comparison with MLA: MHA, GQA and MQA.

Legend: B batch, T query tokens, S key tokens, D model dim, H query heads, G K/V heads (H for MHA,
n_kv_heads for GQA, 1 for MQA), Q = H / G query heads per K/V head, K qk head dim (N + R), Vh v
head dim.

q = x W_Q [B,T,H,K], k = x W_K [B,T,G,K], v = x W_V [B,T,G,Vh]; RoPE rotates the last R dims of
every q and k head (partial rotary, so RoPE/YaRN and the softmax scale are MLA's); query head h
reads K/V head h // Q. The cache holds k and v of every K/V head: G x (K + Vh) values per token
per layer, against MLA's C + R (report §2.1.1; DeepSeek-V2 Table 1).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.layers import Linear, attention_mask, cache_mask, dot_product_attention
from dsv3_jax.model.rope import apply_rope, softmax_scale


class GroupedQueryAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, H, G = cfg.d_model, cfg.n_heads, cfg.kv_heads
        self.cfg = cfg
        # K/V heads stay replicated under tensor parallelism ("kv_heads" maps to no mesh axis): MQA
        # has one, and GQA's G rarely divides the tensor axis the way H does.
        self.w_q = Linear((D,), (H, cfg.qk_head_dim), ("embed", "heads", "qk_head"), cfg, rngs)
        self.w_k = Linear((D,), (G, cfg.qk_head_dim), ("embed", "kv_heads", "qk_head"), cfg, rngs)
        self.w_v = Linear((D,), (G, cfg.v_head_dim), ("embed", "kv_heads", "v_head"), cfg, rngs)
        self.w_o = Linear((H, cfg.v_head_dim), (D,), ("heads", "v_head", "embed"), cfg, rngs, cache_fp8=False)
        self.scale = softmax_scale(cfg)

    def _rope_last(self, x: Array, cos: Array, sin: Array) -> Array:
        nope, rope = jnp.split(x, [self.cfg.qk_nope_dim], axis=-1)
        return jnp.concatenate([nope, apply_rope(rope, cos, sin)], axis=-1)

    def project(self, x_BTD: Array, cos: Array, sin: Array) -> tuple[Array, Array, Array]:
        """(roped q [B,T,H,K], roped k [B,T,G,K], v [B,T,G,Vh])."""
        return (self._rope_last(self.w_q(x_BTD), cos, sin), self._rope_last(self.w_k(x_BTD), cos, sin),
                self.w_v(x_BTD))

    def attend(self, q_BTHK: Array, k_BSGK: Array, v_BSGV: Array, mask_BTS: Array, causal: bool = False
               ) -> Float[Array, "B T D"]:
        dtype = q_BTHK.dtype
        out_BTHV = dot_product_attention(q_BTHK, k_BSGK.astype(dtype), v_BSGV.astype(dtype), mask_BTS, self.scale,
                                         causal)
        return self.w_o(out_BTHV)

    def cached(self, x_BTD: Float[Array, "B T D"], cos: Array, sin: Array, cache: tuple[Array, Array],
               positions_BT: Array, mode: str = "absorbed") -> tuple[Float[Array, "B T D"], tuple[Array, Array]]:
        """T new tokens at `positions_BT` against a cache of keys [B,S,G,K] and values [B,S,G,Vh].
        These attentions have one cache layout; `mode` (MLA's choice of layout) is ignored."""
        del mode
        q_BTHK, k_BTGK, v_BTGV = self.project(x_BTD, cos, sin)
        k_cache, v_cache = cache
        rows_B1 = jnp.arange(x_BTD.shape[0])[:, None]
        k_cache = k_cache.at[rows_B1, positions_BT].set(k_BTGK.astype(k_cache.dtype))
        v_cache = v_cache.at[rows_B1, positions_BT].set(v_BTGV.astype(v_cache.dtype))
        mask_BTS = cache_mask(k_cache.shape[1], positions_BT)
        return self.attend(q_BTHK, k_cache, v_cache, mask_BTS), (k_cache, v_cache)

    def __call__(self, x_BTD: Float[Array, "B T D"], cos: Array, sin: Array,
                 segment_ids_BT: Array | None = None) -> Float[Array, "B T D"]:
        """Causal self-attention over the whole sequence (segments as in MLA.__call__)."""
        q_BTHK, k_BTGK, v_BTGV = self.project(x_BTD, cos, sin)
        return self.attend(q_BTHK, k_BTGK, v_BTGV, attention_mask(x_BTD.shape[1], segment_ids_BT), causal=True)

