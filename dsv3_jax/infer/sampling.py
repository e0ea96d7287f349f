"""Sampling: greedy / temperature / top-p, and a simple full-recompute generator.

The full-recompute generator runs the whole (fixed-size, padded) buffer through the model for
every new token: causal attention makes the padding invisible, and the one buffer shape means
one compilation. The latent-cache decoder is in its own module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_token(logits_V: jax.Array, key: jax.Array, temperature: float, top_p: float = 1.0) -> jax.Array:
    """Greedy when temperature == 0; otherwise softmax(logits / T) restricted to the top-p nucleus."""
    if temperature <= 0:
        return jnp.argmax(logits_V, axis=-1)
    logits_V = logits_V.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits_V, axis=-1)[..., ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
        # Smallest set whose mass reaches top_p: keep logits >= the last one inside it.
        cutoff_idx = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_desc, cutoff_idx, axis=-1)
        logits_V = jnp.where(logits_V < cutoff, -jnp.inf, logits_V)
    return jax.random.categorical(key, logits_V, axis=-1)


def generate_full_recompute(model: nnx.Module, prompt_ids: list[int], max_new_tokens: int, temperature: float,
                            top_p: float, seed: int, eos_id: int | None) -> list[int]:
    graphdef, state = nnx.split(model)
    length = len(prompt_ids) + max_new_tokens
    padded = -(-length // 64) * 64

    @jax.jit
    def next_token(state, buf_1L, position, key):
        logits = nnx.merge(graphdef, state)(buf_1L, with_mtp=False).logits_BTV[0]
        return sample_token(jnp.take(logits, position - 1, axis=0), key, temperature, top_p)

    buf = np.zeros((1, padded), np.int32)
    buf[0, :len(prompt_ids)] = prompt_ids
    key = jax.random.key(seed)
    out = []
    for position in range(len(prompt_ids), length):
        key, sub = jax.random.split(key)
        token = int(next_token(state, buf, position, sub))
        out.append(token)
        buf[0, position] = token
        if token == eos_id:
            break
    return out
