"""Model statistics from abstract shapes (`nnx.eval_shape`): nothing is allocated.

Conventions (stated because papers differ):
- `total_params` excludes the MTP modules (the report's 671B is "without MTP").
- `activated_params` counts every weight a token touches, input embedding and output head
  included (the report's 37B); `activated_params_no_embedding` drops the input embedding
  (a table lookup, not a matmul).
- `mtp_params` are the MTP modules' own weights (block, eh_proj, norms: 11.61B for V3; DeepSeek's
  "11.5B" is the block alone); their embedding and head are the main model's.
- `kv_cache_bytes_per_token`: bf16 latent cache, (C + R) values per token per layer, measured
  from the decoder's cache arrays (abstract, `infer/cache.py`).
- `flops_per_token`: forward FLOPs of the main model for one token averaged over a causal
  sequence of `seq_len` tokens: 2 x activated matmul weights (no input embedding) plus
  attention scores and values, 2 x L x H x (d_qk + d_v) x seq_len / 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.infer.cache import bytes_per_token, init_caches
from dsv3_jax.model.model import DeepSeekV3

_ROUTED = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")


def param_sizes(cfg: ModelConfig) -> dict[tuple, int]:
    """{path: number of elements} of every Param, from an abstract model."""
    abstract = nnx.eval_shape(lambda: DeepSeekV3(cfg, nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    return {tuple(str(p) for p in path): int(v.get_value().size) for path, v in flat}


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype=jnp.bfloat16) -> int:
    """The decoder's own latent cache, allocated abstractly for one slot."""
    return bytes_per_token(jax.eval_shape(lambda: init_caches(cfg, 1, 1, "absorbed", dtype)), 1, 1)


def model_info(cfg: ModelConfig, seq_len: int = 4096) -> dict[str, int]:
    sizes = param_sizes(cfg)
    mtp = sum(n for p, n in sizes.items() if p[0] == "mtp")
    main = {p: n for p, n in sizes.items() if p[0] != "mtp"}
    total = sum(main.values())
    routed = sum(n for p, n in main.items() if p[-1] in _ROUTED)
    embedding = sum(n for p, n in main.items() if p[0] == "embed")
    activated = total - routed + (routed * cfg.top_k // cfg.n_routed_experts if routed else 0)
    attention_flops = 2 * cfg.n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len // 2
    return {
        "total_params": total,
        "activated_params": activated,
        "activated_params_no_embedding": activated - embedding,
        "mtp_params": mtp,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg),
        "flops_per_token": 2 * (activated - embedding) + attention_flops,
        "flops_seq_len": seq_len,
    }
