"""Sampling one token from logits: greedy, temperature, top-p (used by infer/generate.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
