"""Multi-head Latent Attention (report §2.1.1, eq. 1-11): training path and cached decoding.

Legend: B batch, T query tokens, S key tokens, D model dim, H heads, Q q latent (q_lora_rank),
C kv latent (kv_lora_rank), N qk nope dim, R qk rope dim, Vh v head dim.

q path:  c_Q = RMSNorm(x W_DQ) (eq. 6);  q_C = c_Q W_UQ (eq. 7);  q_R = RoPE(c_Q W_QR) (eq. 8)
         (q_lora_rank = 0: q = x W_Q directly, as DeepSeek-V2-Lite).
kv path: [c_KV | k_R] = x W_DKV (eq. 1, 3; one matmul, as the published weights store it),
         c_KV <- RMSNorm(c_KV), k_C = c_KV W_UK (eq. 2), v_C = c_KV W_UV (eq. 5),
         k_R = RoPE(k_R), shared by all heads (eq. 3-4).
Only RMSNorm(c_KV) and roped k_R need caching: (C + R) values per token per layer.

Decoding with absorbed weights (DeepSeek-V2 §2.1.2): since q_C . k_C = (q_C W_UK^T) . c_KV, the
query is folded into latent space once per step, scores are taken directly against the cached
c_KV, the attention-weighted latent sum is formed, and W_UV is applied after attention. No
per-head key or value is ever rebuilt for the cached positions.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.layers import (Linear, RMSNorm, attention_mask, cache_mask, dot_product_attention,
                                   masked_softmax)
from dsv3_jax.model.remat import name
from dsv3_jax.model.rope import apply_rope, softmax_scale


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, H, C, R = cfg.d_model, cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_dim
        self.cfg = cfg
        if cfg.q_lora_rank > 0:
            self.w_dq = Linear((D,), (cfg.q_lora_rank,), ("embed", "q_lora"), cfg, rngs)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps, "q_lora", cfg.param_dtype)
            self.w_uq = Linear((cfg.q_lora_rank,), (H, cfg.qk_head_dim), ("q_lora", "heads", "qk_head"), cfg, rngs)
        else:
            self.w_q = Linear((D,), (H, cfg.qk_head_dim), ("embed", "heads", "qk_head"), cfg, rngs)
        self.w_dkv = Linear((D,), (C + R,), ("embed", "kv_lora"), cfg, rngs)
        self.kv_norm = RMSNorm(C, cfg.norm_eps, "kv_lora", cfg.param_dtype)
        self.w_uk = Linear((C,), (H, cfg.qk_nope_dim), ("kv_lora", "heads", "qk_head"), cfg, rngs)
        self.w_uv = Linear((C,), (H, cfg.v_head_dim), ("kv_lora", "heads", "v_head"), cfg, rngs)
        self.w_o = Linear((H, cfg.v_head_dim), (D,), ("heads", "v_head", "embed"), cfg, rngs, cache_fp8=False)
        self.scale = softmax_scale(cfg)

    def queries(self, x_BTD: Array, cos: Array, sin: Array) -> tuple[Array, Array]:
        """(q_nope [B,T,H,N], roped q_rope [B,T,H,R])."""
        if self.cfg.q_lora_rank > 0:
            q_BTHK = self.w_uq(self.q_norm(name(self.w_dq(x_BTD), "mla_down")))
        else:
            q_BTHK = self.w_q(x_BTD)
        q_BTHK = name(q_BTHK, "mla_up")
        q_nope_BTHN, q_rope_BTHR = jnp.split(q_BTHK, [self.cfg.qk_nope_dim], axis=-1)
        return q_nope_BTHN, apply_rope(q_rope_BTHR, cos, sin)

    def latent_kv(self, x_BTD: Array, cos: Array, sin: Array) -> tuple[Array, Array]:
        """What the cache holds: (RMSNorm(c_KV) [B,T,C], roped shared k_R [B,T,R])."""
        ckv_BTC, k_rope_BTR = jnp.split(name(self.w_dkv(x_BTD), "mla_down"), [self.cfg.kv_lora_rank], axis=-1)
        return self.kv_norm(ckv_BTC), apply_rope(k_rope_BTR, cos, sin)

    def attend_expanded(self, q_nope_BTHN: Array, q_rope_BTHR: Array, ckv_BSC: Array, k_rope_BSR: Array,
                        mask_BTS: Array, causal: bool = False) -> Float[Array, "B T D"]:
        """Attention with per-head K/V rebuilt from the latent (the training path). `causal`: query t
        is key t (training on a whole sequence), so no query needs the keys after its chunk."""
        k_nope_BSHN = name(self.w_uk(ckv_BSC), "mla_up")
        v_BSHV = name(self.w_uv(ckv_BSC), "mla_up")
        # One contraction over N + R, the shared k_R broadcast to every head (eq. 7-10): the same sum
        # as q_nope.k_nope + q_rope.k_R, but XLA:CPU ran the separate head-less "bthr,bsr" contraction
        # and its backward slowly (the attention core alone: fwd+bwd about 2x faster this way, tiny, T=256).
        q_BTHK = jnp.concatenate([q_nope_BTHN, q_rope_BTHR], axis=-1).astype(k_nope_BSHN.dtype)
        k_rope_BSHR = jnp.broadcast_to(k_rope_BSR[:, :, None], k_nope_BSHN.shape[:3] + k_rope_BSR.shape[-1:])
        k_BSHK = jnp.concatenate([k_nope_BSHN, k_rope_BSHR.astype(k_nope_BSHN.dtype)], axis=-1)
        q_BTHK, k_BSHK = name(q_BTHK, "mla_up"), name(k_BSHK, "mla_up")  # what the attention core keeps
        return self.w_o(dot_product_attention(q_BTHK, k_BSHK, v_BSHV, mask_BTS, self.scale, causal))

    def attend_absorbed(self, q_nope_BTHN: Array, q_rope_BTHR: Array, ckv_BSC: Array, k_rope_BSR: Array,
                        mask_BTS: Array) -> Float[Array, "B T D"]:
        """Attention in latent space: W_UK folded into the query, W_UV applied after attention."""
        dtype = q_nope_BTHN.dtype
        w_uk_CHN = self.w_uk.kernel[...].astype(dtype)
        w_uv_CHV = self.w_uv.kernel[...].astype(dtype)
        q_latent_BTHC = jnp.einsum("bthn,chn->bthc", q_nope_BTHN, w_uk_CHN, preferred_element_type=jnp.float32)
        ckv_BSC = ckv_BSC.astype(jnp.float32)
        logits_BHTS = (jnp.einsum("bthc,bsc->bhts", q_latent_BTHC, ckv_BSC)
                       + jnp.einsum("bthr,bsr->bhts", q_rope_BTHR.astype(jnp.float32), k_rope_BSR.astype(jnp.float32)))
        probs_BHTS = masked_softmax(logits_BHTS * self.scale, mask_BTS[:, None])
        out_latent_BTHC = jnp.einsum("bhts,bsc->bthc", probs_BHTS, ckv_BSC)
        out_BTHV = jnp.einsum("bthc,chv->bthv", out_latent_BTHC.astype(dtype), w_uv_CHV,
                              preferred_element_type=jnp.float32).astype(dtype)
        return self.w_o(out_BTHV)

    def cached(self, x_BTD: Float[Array, "B T D"], cos: Array, sin: Array, cache: tuple[Array, Array],
               positions_BT: Array, mode: str = "absorbed") -> tuple[Float[Array, "B T D"], tuple[Array, Array]]:
        """Attention of T new tokens at `positions_BT` against a preallocated cache of S slots.

        mode "absorbed" / "expanded": the cache is the latent (RMSNorm(c_KV) [B,S,C], k_R [B,S,R]);
        "expanded" rebuilds per-head K/V from it every step (what MaxText does). mode "naive":
        the cache holds per-head keys [B,S,H,N+R] and values [B,S,H,Vh] (standard MHA caching).
        New entries are written first, then every query sees slots <= its own position.
        """
        B, T, _ = x_BTD.shape
        q_nope, q_rope = self.queries(x_BTD, cos, sin)
        ckv_BTC, k_rope_BTR = self.latent_kv(x_BTD, cos, sin)
        rows_B1 = jnp.arange(B)[:, None]
        first, second = cache
        S = first.shape[1]
        mask_BTS = cache_mask(S, positions_BT)
        if mode == "naive":
            k_nope_BTHN = self.w_uk(ckv_BTC)
            k_BTHK = jnp.concatenate([k_nope_BTHN, jnp.broadcast_to(k_rope_BTR[:, :, None], k_nope_BTHN.shape[:3] + (
                k_rope_BTR.shape[-1],))], axis=-1)
            k_cache = first.at[rows_B1, positions_BT].set(k_BTHK.astype(first.dtype))
            v_cache = second.at[rows_B1, positions_BT].set(self.w_uv(ckv_BTC).astype(second.dtype))
            q_BTHK = jnp.concatenate([q_nope, q_rope], axis=-1)
            out_BTHV = dot_product_attention(q_BTHK, k_cache.astype(q_BTHK.dtype), v_cache.astype(q_BTHK.dtype),
                                             mask_BTS, self.scale)
            return self.w_o(out_BTHV), (k_cache, v_cache)
        ckv_cache = first.at[rows_B1, positions_BT].set(ckv_BTC.astype(first.dtype))
        k_rope_cache = second.at[rows_B1, positions_BT].set(k_rope_BTR.astype(second.dtype))
        ckv_BSC, k_rope_BSR = ckv_cache.astype(x_BTD.dtype), k_rope_cache.astype(x_BTD.dtype)
        attend = self.attend_absorbed if mode == "absorbed" else self.attend_expanded
        return attend(q_nope, q_rope, ckv_BSC, k_rope_BSR, mask_BTS), (ckv_cache, k_rope_cache)

    def __call__(self, x_BTD: Float[Array, "B T D"], cos: Array, sin: Array,
                 segment_ids_BT: Array | None = None) -> Float[Array, "B T D"]:
        """Causal self-attention over the whole sequence (training / scoring). With `segment_ids_BT`
        (packed examples), a token attends only to earlier tokens of its own segment."""
        q_nope, q_rope = self.queries(x_BTD, cos, sin)
        ckv_BTC, k_rope_BTR = self.latent_kv(x_BTD, cos, sin)
        return self.attend_expanded(q_nope, q_rope, ckv_BTC, k_rope_BTR, attention_mask(x_BTD.shape[1], segment_ids_BT),
                                    causal=True)
