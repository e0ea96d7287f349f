"""Decoder block: x + Attention(RMSNorm(x)) (MLA, or MHA/GQA/MQA to compare), then + FFN(RMSNorm(.)) with a dense SwiGLU or DeepSeekMoE.

Also the layer-stack helpers: a stack is one module whose weights carry a leading "layers" axis,
built with `jax.vmap` over per-layer keys and run with `jax.lax.scan` over (graphdef, state), so
compile time stays flat in depth and a pipeline stage is a slice of the stack.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.gqa import GroupedQueryAttention
from dsv3_jax.model.layers import MLP, RMSNorm
from dsv3_jax.model.mla import MLA
from dsv3_jax.model.remat import name, rematerialised
from dsv3_jax.model.moe import MoE
from dsv3_jax.model.routing import RouterStats
from dsv3_jax.parallel.sharding import HIDDEN_BTD, constrain


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, moe: bool, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, "norm", cfg.param_dtype)
        self.attn = MLA(cfg, rngs) if cfg.attention == "mla" else GroupedQueryAttention(cfg, rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, "norm", cfg.param_dtype)
        self.ffn = MoE(cfg, rngs) if moe else MLP(cfg, cfg.ffn_dim, rngs, "ffn")
        self.is_moe = moe

    def __call__(self, x_BTD: Float[Array, "B T D"], cos: Array, sin: Array, token_ids_BT: Array | None = None,
                 segment_ids_BT: Array | None = None) -> tuple[Float[Array, "B T D"], RouterStats | None]:
        """The block and its router statistics (None for a dense block); the output is constrained to
        the activation layout of parallel/sharding.py (a no-op without a mesh). `segment_ids_BT`
        keeps packed examples from attending to each other (see MLA.__call__)."""
        with jax.named_scope("attention"):  # named scopes label profiles and HLO op names
            x_BTD = name(x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin, segment_ids_BT), "residual")
        with jax.named_scope("ffn"):
            x_BTD, stats = self._ffn(x_BTD, token_ids_BT)
        return constrain(x_BTD, HIDDEN_BTD), stats

    # The MoE block in four phases that alternate compute and communication, for the pipeline's F&B
    # pair (report §3.2.1, Figure 4: parallel/pipeline/executor.py `lockstep_pair` runs one micro-batch's
    # phase beside the other's mirror phase: attention beside the combine's backward, dispatch beside
    # the experts' backward, ...). Their composition is __call__ (the same ops; the routed experts as
    # four shard_maps instead of one). `phased()` says whether the block has them.
    PHASES = ("attend_and_send", "dispatch", "compute", "combine")

    def phased(self) -> bool:
        return self.is_moe and self.ffn.phased()

    def attend_and_send(self, x_BTD: Float[Array, "B T D"], cos: Array, sin: Array) -> dict:
        """Attention, then the router and the rows each expert-parallel rank will receive."""
        with jax.named_scope("attention"):
            x_BTD = name(x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin), "residual")
        with jax.named_scope("ffn"):
            h_BTD = self.ffn_norm(x_BTD)
            sent, stats = self.ffn.send(h_BTD)
        return dict(x_BTD=x_BTD, h_BTD=h_BTD, sent=sent, stats=stats)

    def dispatch(self, carry: dict) -> dict:  # communication only
        with jax.named_scope("ffn"):
            return dict(carry, sent=self.ffn.dispatch(carry["sent"]))

    def compute(self, carry: dict) -> dict:  # the routed experts on the rows that arrived, the shared experts
        with jax.named_scope("ffn"):
            done, shared_BTD = self.ffn.experts(carry["sent"], carry["h_BTD"])
        return dict(x_BTD=carry["x_BTD"], sent=done, shared_BTD=shared_BTD, stats=carry["stats"])

    def combine(self, carry: dict) -> tuple[Float[Array, "B T D"], RouterStats]:  # communication, then the residual
        x_BTD = carry["x_BTD"]
        with jax.named_scope("ffn"):
            y_BTD = self.ffn.combine(carry["sent"], carry["shared_BTD"], x_BTD.shape)
        return constrain(x_BTD + y_BTD, HIDDEN_BTD), carry["stats"]

    def cached(self, x_BTD: Array, cos: Array, sin: Array, cache: tuple[Array, Array], positions_BT: Array,
               mode: str, token_ids_BT: Array | None = None) -> tuple[Array, tuple[Array, Array]]:
        """The block on new tokens against a KV cache (see MLA.cached); returns the updated cache."""
        y_BTD, cache = self.attn.cached(self.attn_norm(x_BTD), cos, sin, cache, positions_BT, mode)
        x_BTD, _ = self._ffn(x_BTD + y_BTD, token_ids_BT)
        return x_BTD, cache

    def _ffn(self, x_BTD: Array, token_ids_BT: Array | None) -> tuple[Array, RouterStats | None]:
        if self.is_moe:
            y_BTD, stats = self.ffn(self.ffn_norm(x_BTD), token_ids_BT)
        else:
            y_BTD, stats = self.ffn(self.ffn_norm(x_BTD)), None
        return x_BTD + y_BTD, stats


def stack_modules(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs, axis: str = "layers"
                  ) -> nnx.Module:
    """n independently initialised copies of `make(rngs)` as one module with stacked weights.

    Every Variable's `logical_axes` gains a leading `axis` name ("layers", or "stage_layers" for
    the stack a pipeline cuts into stages, which each pipeline rank stores its part of). In a
    "stage_layers" stack the embed dim is "stage_embed": pipeline already splits its layers, so
    it may not split the embed dim too, as it does outside the stack (parallel/sharding.py).
    """
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    keys = jax.random.split(rngs.params(), n)
    state = jax.vmap(lambda key: nnx.state(make(nnx.Rngs(key))))(keys)
    stacked = nnx.merge(graphdef, state)
    for _, variable in nnx.iter_graph(stacked):
        if isinstance(variable, nnx.Variable):
            axes = variable.get_metadata().get("logical_axes")
            if axes is not None:
                if axis == "stage_layers":
                    axes = tuple("stage_embed" if a == "embed" else a for a in axes)
                variable.set_metadata(logical_axes=(axis,) + tuple(axes))
    return stacked


def scan_stack(stack: nnx.Module, step: Callable, carry, xs=None, remat: str = "none", unroll_layers: int = 0):
    """lax.scan of `step(layer, carry, x) -> (carry, y)` over the layers of a stacked module.

    The module is split once; each iteration merges its own slice of the state (pure, no
    hidden mutation), so the same code runs under jit, grad, shard_map and pipeline stages.
    Each layer keeps for its backward pass what the `remat` policy says (model/remat.py). A stack of
    at most `unroll_layers` layers is unrolled (`model.unroll_layers`).
    """
    graphdef, state = nnx.split(stack)

    def body(carry, scanned):
        layer_state, x = scanned
        return step(nnx.merge(graphdef, layer_state), carry, x)

    body = rematerialised(body, remat)
    n_layers = jax.tree.leaves(state)[0].shape[0]
    if n_layers > unroll_layers:
        return jax.lax.scan(body, carry, (state, xs))
    # Unrolled as a Python loop over static slices, not `lax.scan(unroll=True)`: XLA:TPU's SPMD
    # partitioner aborts (IsManualSubgroup check) on an unrolled scan whose body holds the router's
    # nested shard_map inside the pipeline's partial-manual one (tests/test_compile.py).
    ys = []
    for i in range(n_layers):
        carry, y = body(carry, jax.tree.map(lambda a: a[i], (state, xs)))
        ys.append(y)
    return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)


def run_blocks(stack: nnx.Module, x_BTD: Array, cos: Array, sin: Array, cfg: ModelConfig,
               token_ids_BT: Array | None = None, segment_ids_BT: Array | None = None
               ) -> tuple[Array, RouterStats | None]:
    """Apply a stack of Blocks in order (the whole stack, or a pipeline stage's slice of it); returns
    the output and the per-layer router stats stacked on axis 0 (None for dense blocks)."""
    return scan_stack(stack, lambda block, x, _: block(x, cos, sin, token_ids_BT, segment_ids_BT), x_BTD,
                      remat=cfg.remat, unroll_layers=cfg.unroll_layers)


def run_blocks_cached(stack: nnx.Module, x_BTD: Array, cos: Array, sin: Array, cache: tuple[Array, Array],
                      positions_BT: Array, mode: str, token_ids_BT: Array | None = None
                      ) -> tuple[Array, tuple[Array, Array]]:
    """Apply a stack of Blocks with per-layer caches stacked on axis 0; returns the new caches."""
    return scan_stack(stack, lambda block, x, layer_cache: block.cached(x, cos, sin, layer_cache, positions_BT, mode,
                                                                        token_ids_BT), x_BTD, cache)
