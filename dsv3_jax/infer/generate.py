"""Cached generation: prefill + one-token decode steps, and MTP speculative decoding.

Prompts of different lengths are right-padded into one prefill; each row then decodes at its
own position, overwriting its padding slots before any query can see them (a query at
position p attends slots <= p). The decode step is jitted once per (batch, cache slots).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.errors import UsageError
from dsv3_jax.infer.cache import init_caches, init_mtp_cache
from dsv3_jax.infer.sampling import sample_token


def _round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


PREFILL_BUCKET = 16  # prompts are right-padded to a multiple of this: few prefill compilations


@functools.partial(jax.jit, static_argnames=("graphdef", "mode"))
def _decode(graphdef, state, caches, tokens_BT, positions_BT, mode):
    return nnx.merge(graphdef, state).decode(tokens_BT, positions_BT, caches, mode)


# The same step with the caches donated: generation loops update them in place.
_decode_inplace = jax.jit(_decode.__wrapped__, static_argnames=("graphdef", "mode"), donate_argnames=("caches",))


@functools.partial(jax.jit, static_argnames=("graphdef", "mode"))
def _draft(graphdef, state, mtp_cache, h_BTD, next_tokens_BT, positions_BT, mode):
    return nnx.merge(graphdef, state).draft(h_BTD, next_tokens_BT, positions_BT, mtp_cache, mode)


@functools.partial(jax.jit, static_argnames=("graphdef", "mode"), donate_argnames=("caches", "mtp_cache"))
def _verify_and_draft(graphdef, state, caches, mtp_cache, last_token, draft, n, mode):
    """One speculative iteration on device: verify [t_n, draft] at [n, n+1], then draft again.

    Returns the new tokens (2 if the draft was accepted: the draft and the bonus token after it;
    else 1: the model's own token, padded with 0), the acceptance flag, and the next draft.
    """
    model = nnx.merge(graphdef, state)
    positions_BT = jnp.stack([n, n + 1])[None].astype(jnp.int32)
    logits_BTV, h_BTD, caches = model.decode(jnp.stack([last_token, draft])[None], positions_BT, caches, mode)
    verified, bonus = jnp.argmax(logits_BTV[0], axis=-1)
    accepted = verified == draft
    new_tokens = jnp.where(accepted, jnp.stack([draft, bonus]), jnp.stack([verified, jnp.zeros_like(bonus)]))
    mtp_logits_BTV, mtp_cache = model.draft(h_BTD, new_tokens[None], positions_BT, mtp_cache, mode)
    next_draft = jnp.argmax(mtp_logits_BTV[0, accepted.astype(jnp.int32)])
    return caches, mtp_cache, new_tokens, accepted, next_draft


@functools.partial(jax.jit, static_argnames=("temperature", "top_p"))
def _sample_rows(logits_BV, key, temperature, top_p):
    """One token per row, and its log-probability under softmax(logits / T) (T = 1 when greedy): the
    sampling policy's own log-prob, what GRPO records as the old policy's (post/grpo.py)."""
    keys = jax.random.split(key, logits_BV.shape[0])
    tokens_B = jax.vmap(lambda l, k: sample_token(l, k, temperature, top_p))(logits_BV, keys)
    logprobs_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32) / (temperature if temperature > 0 else 1.0))
    return tokens_B, jnp.take_along_axis(logprobs_BV, tokens_B[:, None], axis=-1)[:, 0]


def _check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("every prompt needs at least one token")
    bad = [t for p in prompts for t in p if not 0 <= t < vocab_size]
    if bad:
        raise UsageError(f"prompt token id {bad[0]} is out of range: ids must be in [0, {vocab_size})")


def generate(model: nnx.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, mode: str = "absorbed",
             cache_dtype=None) -> list[list[int]]:
    """New tokens per prompt (stopping at EOS, which is included). The latent cache is held in the
    model's compute dtype unless `cache_dtype` says otherwise (bf16 halves it, and on long YaRN
    contexts its rounding can flip expert choices: greedy output then leaves the fp32 forward's)."""
    return generate_with_logprobs(model, prompts, max_new_tokens, temperature, top_p, seed, eos_id, mode,
                                  cache_dtype)[0]


def generate_with_logprobs(model: nnx.Module, prompts: list[list[int]], max_new_tokens: int,
                           temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
                           mode: str = "absorbed", cache_dtype=None) -> tuple[list[list[int]], list[list[float]]]:
    """`generate`, with each new token's log-probability under softmax(logits / T) (top-p truncation
    aside; T = 1 when greedy) recorded as it is sampled."""
    cfg = model.cfg
    cache_dtype = cache_dtype or cfg.dtype
    _check_prompts(prompts, cfg.vocab_size)
    B, lengths = len(prompts), np.array([len(p) for p in prompts])
    prefill_len = _round_up(int(lengths.max()), PREFILL_BUCKET)
    slots = _round_up(max(prefill_len, int(lengths.max()) + max_new_tokens))
    if int(lengths.max()) + max_new_tokens > cfg.max_seq_len:
        raise UsageError(f"prompt + max_new_tokens = {int(lengths.max()) + max_new_tokens} exceeds "
                         f"model.max_seq_len={cfg.max_seq_len}")
    graphdef, state = nnx.split(model)
    caches = init_caches(cfg, B, slots, mode, cache_dtype)
    tokens = np.zeros((B, prefill_len), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = p
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    logits, _, caches = _decode(graphdef, state, caches, tokens, positions, mode)
    last_logits = logits[jnp.arange(B), lengths - 1]
    key = jax.random.key(seed)
    out: list[list[int]] = [[] for _ in range(B)]
    logprobs: list[list[float]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        next_B, logprob_B = jax.device_get(_sample_rows(last_logits, sub, temperature, top_p))
        for b in np.flatnonzero(~done):
            out[b].append(int(next_B[b]))
            logprobs[b].append(float(logprob_B[b]))
            done[b] |= next_B[b] == eos_id
        if done.all() or i == max_new_tokens - 1:
            break
        logits, _, caches = _decode_inplace(graphdef, state, caches, next_B[:, None].astype(np.int32),
                                            (lengths + i)[:, None].astype(np.int32), mode)
        last_logits = logits[:, 0]
    return out, logprobs


@dataclass
class SpeculativeStats:
    drafted: int = 0
    accepted: int = 0
    main_forward_passes: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)


def generate_speculative(model: nnx.Module, prompt: list[int], max_new_tokens: int, eos_id: int | None = None,
                         mode: str = "absorbed", cache_dtype=None) -> tuple[list[int], SpeculativeStats]:
    """Greedy decoding with the first MTP module drafting one token ahead (report §2.2, "MTP in
    Inference"); the main model verifies [t_n, draft] in one pass. Output equals plain greedy.

    Invariant at the top of the loop: main and MTP caches hold positions < n, t_n is decided
    (not yet cached), and `draft` is the MTP guess for t_{n+1}. A rejected draft leaves a stale
    slot at n+1 that the next pass overwrites before anything attends to it.
    """
    cfg = model.cfg
    if cfg.mtp_depth < 1:
        raise UsageError("speculative decoding with MTP needs a model with model.mtp_depth >= 1")
    _check_prompts([prompt], cfg.vocab_size)
    cache_dtype = cache_dtype or cfg.dtype  # as `generate`
    P = len(prompt)
    prefill_len = _round_up(P, PREFILL_BUCKET)
    slots = _round_up(max(prefill_len, P + max_new_tokens + 2))
    graphdef, state = nnx.split(model)
    caches = init_caches(cfg, 1, slots, mode, cache_dtype)
    mtp_cache = init_mtp_cache(cfg, 1, slots, mode, cache_dtype)
    stats = SpeculativeStats()

    # Prefill (right-padded; slots >= P hold padding until overwritten).
    tokens = np.zeros((1, prefill_len), np.int32)
    tokens[0, :P] = prompt
    positions = np.arange(prefill_len, dtype=np.int32)[None]
    logits, h, caches = _decode(graphdef, state, caches, tokens, positions, mode)
    stats.main_forward_passes += 1
    out = [int(jnp.argmax(logits[0, P - 1]))]
    ahead = np.zeros_like(tokens)
    ahead[0, :P] = list(prompt[1:]) + out
    mtp_logits, mtp_cache = _draft(graphdef, state, mtp_cache, h, ahead, positions, mode)
    draft = int(jnp.argmax(mtp_logits[0, P - 1]))
    n = P
    draft = jnp.int32(draft)
    while len(out) < max_new_tokens and out[-1] != eos_id:
        caches, mtp_cache, new_tokens, accepted, draft = _verify_and_draft(
            graphdef, state, caches, mtp_cache, jnp.int32(out[-1]), draft, jnp.int32(n), mode)
        new_tokens, accepted = jax.device_get((new_tokens, accepted))
        stats.main_forward_passes += 1
        stats.drafted += 1
        stats.accepted += int(accepted)
        new = [int(t) for t in new_tokens[:1 + int(accepted)]]
        out.extend(new)
        n += len(new)
    out = out[:max_new_tokens]
    if eos_id is not None and eos_id in out:
        out = out[:out.index(eos_id) + 1]
    return out, stats
