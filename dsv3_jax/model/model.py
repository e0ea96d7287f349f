"""DeepSeek-V3: embed -> scanned dense blocks -> scanned MoE blocks -> norm -> head (+ MTP).

Legend: B batch, T tokens, D model dim, V vocab, L layers, E routed experts, P MTP depth.

The forward pass is a pure function of (weights, routing bias, tokens). Router statistics come
out as values (`ModelStats`, one `RouterStats` per routed stack): per-layer expert loads (for the
aux-loss-free bias update and MaxVio) and per-layer balancer losses (e.g. eq. 17-20).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike
from jaxtyping import Array, Float, Int

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.block import Block, run_blocks, run_blocks_cached, scan_stack, stack_modules
from dsv3_jax.model.layers import Embed, Linear, RMSNorm
from dsv3_jax.model.mtp import MTPModule, tokens_ahead
from dsv3_jax.model.rope import rope_tables
from dsv3_jax.model.routing import RouterStats
from dsv3_jax.parallel.sharding import HIDDEN_BTD, LOGITS_BTV, constrain


class ModelStats(NamedTuple):
    """Router statistics of each routed stack, stacked over its layers (None where it has none)."""
    moe_layers: RouterStats | None  # the main model's MoE layers [L_moe, ...]
    mtp: RouterStats | None  # the MTP modules' MoE blocks [P, ...]


class ModelOutput(NamedTuple):
    logits_BTV: Float[Array, "B T V"]  # fp32
    mtp_logits_PBTV: Float[Array, "P B T V"] | None  # depth k predicts t_{i+k+1}; fp32
    stats: ModelStats


class ModelFeatures(NamedTuple):
    """What the output head reads (`DeepSeekV3.features`): the logits are `logits(h)`. A loss that
    computes them chunk by chunk (train/loss.py chunked_cross_entropy) starts from these."""
    h_BTD: Float[Array, "B T D"]  # the final norm's output
    mtp_h_PBTD: Float[Array, "P B T D"] | None  # each MTP depth's normalised output
    stats: ModelStats


class DeepSeekV3(nnx.Module):
    """The forward pass is three pieces, so that a pipeline can run the middle one in stages
    (train/pipelined.py) with the same code: `embed_and_dense`, `moe_stack`, `head_and_mtp`."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs)
        self.dense_layers = (stack_modules(lambda r: Block(cfg, moe=False, rngs=r), cfg.first_k_dense, rngs)
                             if cfg.first_k_dense else None)
        self.moe_layers = (stack_modules(lambda r: Block(cfg, moe=True, rngs=r), cfg.n_moe_layers, rngs, "stage_layers")
                           if cfg.n_moe_layers else None)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, "norm", cfg.param_dtype)
        self.head = Linear((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), cfg, rngs, fp8=False)
        self.mtp = stack_modules(lambda r: MTPModule(cfg, r), cfg.mtp_depth, rngs) if cfg.mtp_depth else None

    def logits(self, h_xD: Float[Array, "*lead D"]) -> Float[Array, "*lead V"]:
        """The (shared) output head, for [B, T, D] or the MTP depths' [P, B, T, D]; logits in fp32
        for a stable softmax."""
        return self.head(h_xD).astype(jnp.float32)

    def __call__(self, tokens_BT: Int[ArrayLike, "B T"], positions_BT: Int[ArrayLike, "B T"] | None = None,
                 with_mtp: bool = True, segment_ids_BT: Int[ArrayLike, "B T"] | None = None) -> ModelOutput:
        """Logits for every position (jax or numpy token ids). Packed examples (post-training) pass
        `segment_ids_BT` (attention stays inside a segment) and `positions_BT` restarting at 0 in
        each segment."""
        h_BTD, mtp_h_PBTD, stats = self.features(tokens_BT, positions_BT, with_mtp, segment_ids_BT)
        return ModelOutput(*self._head_logits(h_BTD, mtp_h_PBTD), stats)

    def _head_logits(self, h_BTD: Array, mtp_h_PBTD: Array | None) -> tuple[Array, Array | None]:
        """(main logits, MTP logits or None) from the head's inputs."""
        return (constrain(self.logits(h_BTD), LOGITS_BTV),
                None if mtp_h_PBTD is None else self.logits(mtp_h_PBTD))

    def features(self, tokens_BT: Int[ArrayLike, "B T"], positions_BT: Int[ArrayLike, "B T"] | None = None,
                 with_mtp: bool = True, segment_ids_BT: Int[ArrayLike, "B T"] | None = None) -> ModelFeatures:
        """The forward pass up to the output head: what `__call__` turns into logits."""
        tokens_BT = jnp.asarray(tokens_BT)
        segment_ids_BT = None if segment_ids_BT is None else jnp.asarray(segment_ids_BT)
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = np.arange(T)[None]  # known when tracing: the rope tables become constants
        cos, sin = rope_tables(self.cfg, positions_BT)
        h_BTD = self.embed_and_dense(tokens_BT, cos, sin, segment_ids_BT)
        h_BTD, moe_stats = self.moe_stack(h_BTD, cos, sin, tokens_BT, segment_ids_BT)
        h_BTD, mtp_h_PBTD, mtp_stats = self.head_inputs_and_mtp(h_BTD, tokens_BT, cos, sin, with_mtp, segment_ids_BT)
        return ModelFeatures(h_BTD, mtp_h_PBTD, ModelStats(moe_stats, mtp_stats))

    # The pieces -------------------------------------------------------------------------------
    def embed_and_dense(self, tokens_BT: Int[Array, "B T"], cos: Array, sin: Array,
                        segment_ids_BT: Array | None = None) -> Float[Array, "B T D"]:
        """Token embedding, then the first_k_dense dense layers."""
        h_BTD = constrain(self.embed(tokens_BT), HIDDEN_BTD)
        if self.dense_layers is not None:
            h_BTD, _ = run_blocks(self.dense_layers, h_BTD, cos, sin, self.cfg, segment_ids_BT=segment_ids_BT)
        return h_BTD

    def moe_stack(self, h_BTD: Array, cos: Array, sin: Array, token_ids_BT: Array | None = None,
                  segment_ids_BT: Array | None = None) -> tuple[Float[Array, "B T D"], RouterStats | None]:
        """The MoE layers (a pipeline runs `run_blocks` on its stages' slices of this stack instead)."""
        if self.moe_layers is None:
            return h_BTD, None
        return run_blocks(self.moe_layers, h_BTD, cos, sin, self.cfg, token_ids_BT, segment_ids_BT)

    def head_and_mtp(self, h_BTD: Array, tokens_BT: Int[Array, "B T"], cos: Array, sin: Array,
                     with_mtp: bool = True, segment_ids_BT: Array | None = None
                     ) -> tuple[Array, Array | None, RouterStats | None]:
        """Final norm and output head on the last hidden state, and the MTP modules (eq. 21-25) fed
        from it: (logits, MTP logits [P, B, T, V] or None, the MTP blocks' router stats or None)."""
        h_normed_BTD, mtp_h_PBTD, mtp_stats = self.head_inputs_and_mtp(h_BTD, tokens_BT, cos, sin, with_mtp,
                                                                       segment_ids_BT)
        return *self._head_logits(h_normed_BTD, mtp_h_PBTD), mtp_stats

    def head_inputs_and_mtp(self, h_BTD: Array, tokens_BT: Int[Array, "B T"], cos: Array, sin: Array,
                            with_mtp: bool = True, segment_ids_BT: Array | None = None
                            ) -> tuple[Array, Array | None, RouterStats | None]:
        """`head_and_mtp` before the output head: (the final norm of the last hidden state, each MTP
        depth's normalised output [P, B, T, D] or None, the MTP blocks' router stats or None)."""
        cfg = self.cfg
        h_normed_BTD = self.final_norm(h_BTD)
        if self.mtp is None or not with_mtp:
            return h_normed_BTD, None, None
        ahead_PBT = tokens_ahead(tokens_BT, cfg.mtp_depth)

        def depth_step(module: MTPModule, h_prev, ahead_BT):
            h_next, h_normed, layer_stats = module(h_prev, self.embed(ahead_BT), cos, sin, ahead_BT, segment_ids_BT)
            return h_next, (h_normed, layer_stats)

        # The main model's final hidden state (before its final norm) is h^0 (eq. 21).
        _, (h_normed_PBTD, mtp_stats) = scan_stack(self.mtp, depth_step, h_BTD, ahead_PBT, cfg.remat, cfg.unroll_layers)
        return h_normed_BTD, h_normed_PBTD, mtp_stats

    # Cached decoding ------------------------------------------------------------------------
    def decode(self, tokens_BT: Int[Array, "B T"], positions_BT: Int[Array, "B T"], caches: dict,
               mode: str = "absorbed") -> tuple[Float[Array, "B T V"], Float[Array, "B T D"], dict]:
        """Main model on T new tokens per row at `positions_BT` against per-stack KV caches.

        Returns (logits fp32, final hidden state before the norm (h^0 for MTP), new caches).
        `caches` maps "dense" / "moe" to a pair of arrays stacked over that stack's layers.
        """
        cos, sin = rope_tables(self.cfg, positions_BT)
        h_BTD = self.embed(tokens_BT)
        caches = dict(caches)
        for name in ("dense", "moe"):
            stack = self.dense_layers if name == "dense" else self.moe_layers
            if stack is not None:
                h_BTD, caches[name] = run_blocks_cached(stack, h_BTD, cos, sin, caches[name], positions_BT, mode,
                                                        tokens_BT)
        return self.logits(self.final_norm(h_BTD)), h_BTD, caches

    def draft(self, h_prev_BTD: Array, next_tokens_BT: Int[Array, "B T"], positions_BT: Int[Array, "B T"],
              mtp_cache, mode: str = "absorbed") -> tuple[Float[Array, "B T V"], tuple]:
        """The first MTP module as a drafter: logits for t_{i+2} from h_i and t_{i+1} (eq. 21-23)."""
        cos, sin = rope_tables(self.cfg, positions_BT)
        graphdef, state = nnx.split(self.mtp)
        first_module = nnx.merge(graphdef, jax.tree.map(lambda x: x[0], state))
        layer_cache = jax.tree.map(lambda x: x[0], mtp_cache)
        h_normed, layer_cache = first_module.cached(h_prev_BTD, self.embed(next_tokens_BT), cos, sin, layer_cache,
                                                    positions_BT, mode, next_tokens_BT)
        mtp_cache = jax.tree.map(lambda full, new: full.at[0].set(new), mtp_cache, layer_cache)
        return self.logits(h_normed), mtp_cache
