"""Preallocated KV caches for decoding, one pair of arrays per layer stack.

Legend: L layers of a stack, B batch, S cache slots, C kv latent, R rope dim, H heads,
N qk nope dim, Vh v head dim.

latent (modes "absorbed", "expanded"): RMSNorm(c_KV) [L,B,S,C] and roped k_R [L,B,S,R]:
    (C + R) values per token per layer, 576 for DeepSeek-V3 (70,272 bytes/token in bf16).
naive (mode "naive"): per-head keys [L,B,S,H,N+R] and values [L,B,S,H,Vh], as standard MHA.
model.attention mha / gqa / mqa (model/gqa.py): keys [L,B,S,G,N+R] and values [L,B,S,G,Vh] for its
G K/V heads, whatever the mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig

MODES = ("absorbed", "expanded", "naive")


def _pair(cfg: ModelConfig, n_layers: int, batch: int, slots: int, mode: str, dtype) -> tuple[jax.Array, jax.Array]:
    if cfg.attention != "mla" or mode == "naive":
        H = cfg.kv_heads or cfg.n_heads
        return (jnp.zeros((n_layers, batch, slots, H, cfg.qk_head_dim), dtype),
                jnp.zeros((n_layers, batch, slots, H, cfg.v_head_dim), dtype))
    return (jnp.zeros((n_layers, batch, slots, cfg.kv_lora_rank), dtype),
            jnp.zeros((n_layers, batch, slots, cfg.qk_rope_dim), dtype))


def init_caches(cfg: ModelConfig, batch: int, slots: int, mode: str = "absorbed", dtype=jnp.bfloat16) -> dict:
    """Main-model caches: {"dense": pair, "moe": pair} for the stacks the model has."""
    if mode not in MODES:
        raise ValueError(f"cache mode {mode!r} must be one of {MODES}")
    caches = {}
    if cfg.first_k_dense:
        caches["dense"] = _pair(cfg, cfg.first_k_dense, batch, slots, mode, dtype)
    if cfg.n_moe_layers:
        caches["moe"] = _pair(cfg, cfg.n_moe_layers, batch, slots, mode, dtype)
    return caches


def init_mtp_cache(cfg: ModelConfig, batch: int, slots: int, mode: str = "absorbed", dtype=jnp.bfloat16):
    """Cache of the MTP module(s) used as drafters (speculative decoding only)."""
    return _pair(cfg, cfg.mtp_depth, batch, slots, mode, dtype)


def bytes_per_token(caches: dict, batch: int, slots: int) -> int:
    """Bytes the caches hold per cached token, measured from the arrays (or their abstract shapes)."""
    total = sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(caches))
    return int(total // (batch * slots))
