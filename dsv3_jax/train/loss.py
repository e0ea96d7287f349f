"""Losses: next-token CE, the MTP loss (eq. 24-25), and the routing balancers' auxiliary losses
(e.g. the sequence-wise balance loss, eq. 17, scaled by alpha).

Legend: B batch, T tokens, D model dim, V vocab, P MTP depth, C positions per chunk, K chunks.
A batch holds `tokens_BS` with S = T + 1: the model reads tokens[:, :T]; the main head at
position i predicts tokens[:, i+1]; MTP depth k at position i predicts tokens[:, i+k+1].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from dsv3_jax.model.model import ModelStats
from dsv3_jax.model.routing import Balancing


def cross_entropy(logits_BTV: Float[Array, "B T V"], labels_BT: Int[Array, "B T"],
                  mask_BT: Array | None = None) -> Float[Array, ""]:
    """Mean token CE over unmasked positions (fp32)."""
    nll_BT = token_nll(logits_BTV, labels_BT)
    if mask_BT is None:
        return nll_BT.mean()
    mask_BT = mask_BT.astype(jnp.float32)
    return (nll_BT * mask_BT).sum() / jnp.maximum(mask_BT.sum(), 1.0)


def token_nll(logits_xV: Float[Array, "*lead V"], labels_x: Int[Array, "*lead"]) -> Float[Array, "*lead"]:
    """-log softmax(logits)[label] per position, in fp32."""
    logits_xV = logits_xV.astype(jnp.float32)
    picked_x = jnp.take_along_axis(logits_xV, labels_x[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits_xV, axis=-1) - picked_x


def chunked_cross_entropy(head: Callable[[Array], Array], h_BTD: Float[Array, "B T D"], labels_BT: Int[Array, "B T"],
                          mask_BT: Array | None = None, chunk: int = 0) -> Float[Array, ""]:
    """`cross_entropy(head(h_BTD), labels_BT, mask_BT)` without the [B, T, V] logits: the sequence is
    cut into K chunks of C = `chunk` positions, and a scan computes each chunk's fp32 logits, reduces
    them to its summed NLL and drops them; under `jax.checkpoint` the backward recomputes each chunk's
    logits instead of keeping them, so at most one chunk's [B, C, V] logits (and their gradient) live
    at a time. Each chunk keeps the batch (and vocab) sharding of the whole. `chunk` must divide T."""
    B, T, D = h_BTD.shape
    C = chunk or T
    if T % C:
        raise ValueError(f"chunk={C} must divide the sequence length {T}")
    mask_BT = jnp.ones((B, T), jnp.float32) if mask_BT is None else mask_BT.astype(jnp.float32)
    by_chunk = lambda a: jnp.swapaxes(a.reshape((B, T // C, C) + a.shape[2:]), 0, 1)  # [K, B, C, ...]

    @jax.checkpoint
    def chunk_nll(total, xs):
        h_BCD, labels_BC, mask_BC = xs
        return total + (token_nll(head(h_BCD), labels_BC) * mask_BC).sum(), None

    total, _ = jax.lax.scan(chunk_nll, jnp.zeros((), jnp.float32), (by_chunk(h_BTD), by_chunk(labels_BT),
                                                                     by_chunk(mask_BT)))
    return total / jnp.maximum(mask_BT.sum(), 1.0)


def shifted_targets(tokens_BS: Int[Array, "B S"], k: int, loss_mask_BS: Array | None = None,
                    segment_ids_BS: Array | None = None) -> tuple[Array, Array]:
    """Targets k tokens further ahead than the next one: labels[:, i] = tokens[:, i+k+1] (k = 0 is
    the main head; MTP depth k, eq. 24, is k), and where they count: inside the window (eq. 24 sums
    i from 2+k to T+1), where `loss_mask_BS` marks the target (SFT: response tokens), and in the
    same segment as position i (packed examples never predict each other's tokens)."""
    B, S = tokens_BS.shape
    T = S - 1
    ahead = lambda a: jnp.concatenate([a, jnp.zeros((B, k), a.dtype)], axis=1)[:, k + 1:k + 1 + T]
    mask_BT = jnp.broadcast_to(jnp.arange(T) + k + 1 <= T, (B, T))
    if loss_mask_BS is not None:
        mask_BT = mask_BT & ahead(loss_mask_BS).astype(bool)
    if segment_ids_BS is not None:
        mask_BT = mask_BT & (ahead(segment_ids_BS) == segment_ids_BS[:, :T])
    return ahead(tokens_BS), mask_BT


def mtp_targets(tokens_BS: Int[Array, "B S"], depth: int, loss_mask_BS: Array | None = None,
                segment_ids_BS: Array | None = None) -> tuple[Array, Array]:
    """Targets and validity for depths k = 1..depth, stacked: (labels [P, B, T], mask [P, B, T])."""
    pairs = [shifted_targets(tokens_BS, k, loss_mask_BS, segment_ids_BS) for k in range(1, depth + 1)]
    return jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])


class LossParts(NamedTuple):
    total: Float[Array, ""]
    lm: Float[Array, ""]
    mtp: Float[Array, ""]  # mean over depths, before lambda
    balance: Float[Array, ""]  # sum over balancers of coefficient x (sum over MoE layers of its loss)


def total_loss(logits_BTV: Array, mtp_logits_PBTV: Array | None, stats: ModelStats, tokens_BS: Int[Array, "B S"],
               mtp_lambda: float, balancing: Balancing, loss_mask_BS: Array | None = None,
               segment_ids_BS: Array | None = None, head: Callable[[Array], Array] | None = None,
               chunk: int = 0) -> LossParts:
    """L = L_main + lambda/P sum_k L^k_MTP (eq. 25) + sum_b w_b L_b (e.g. alpha * sum_layers L_Bal, eq. 17),
    the balancers' losses summed over the MoE layers of the main model and of the MTP modules.
    Packed SFT batches restrict both CE terms to targets that `shifted_targets` counts.

    With `head` (the model's `logits`), the first two arguments are what it reads instead, the
    `ModelFeatures` hidden states [B, T, D] / [P, B, T, D], and each CE term is computed `chunk`
    positions at a time (`chunked_cross_entropy`): the same loss without the logits in memory."""
    ce = cross_entropy if head is None else (lambda h, labels, mask=None: chunked_cross_entropy(head, h, labels, mask,
                                                                                                chunk))
    if loss_mask_BS is None and segment_ids_BS is None:
        lm = ce(logits_BTV, tokens_BS[:, 1:])
    else:
        lm = ce(logits_BTV, *shifted_targets(tokens_BS, 0, loss_mask_BS, segment_ids_BS))
    mtp = jnp.zeros((), jnp.float32)
    if mtp_logits_PBTV is not None:
        labels_PBT, mask_PBT = mtp_targets(tokens_BS, mtp_logits_PBTV.shape[0], loss_mask_BS, segment_ids_BS)
        if head is None:
            per_depth = jax.vmap(cross_entropy)(mtp_logits_PBTV, labels_PBT, mask_PBT)
        else:  # one depth at a time, so one chunk of one depth's logits lives at a time
            per_depth = jnp.stack([ce(mtp_logits_PBTV[k], labels_PBT[k], mask_PBT[k])
                                   for k in range(mtp_logits_PBTV.shape[0])])
        mtp = per_depth.mean()
    balance = balancing.loss(stats.moe_layers) + balancing.loss(stats.mtp)
    return LossParts(lm + mtp_lambda * mtp + balance, lm, mtp, balance)
