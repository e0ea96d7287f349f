"""DeepSeekMoE (report §2.1.2, eq. 12): h' = u + sum_shared FFN(u) + sum_routed g_i FFN_i(u).

Legend: B batch, T tokens, N = B*T, D model dim, E routed experts, K top-k, F expert ffn dim,
M = N*K routed (token, slot) assignments.

Local expert computation is dropless and never builds an [N, E, D] tensor: the M routed
(token, expert, gate) assignments are sorted by expert, each expert's contiguous rows go through
a grouped matmul (`model/grouped_gemm.py`: `jax.lax.ragged_dot`, or 128-row blocks on CPU), gated
(the gate folded in before the down projection) and scatter-added back to their tokens (which also
serves routers where a token can have any number of experts). Under a mesh with an expert axis, the routed experts run
expert-parallel (`parallel/expert.py`): each rank only its own experts on only their rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from dsv3_jax.config import Fp8Backend, GroupedGemmImpl, ModelConfig
from dsv3_jax.model.blocked_swiglu import blocked_swiglu
from dsv3_jax.model.grouped_gemm import grouped_matmul, resolve_impl
from dsv3_jax.model.layers import MLP, dtype_of, param
from dsv3_jax.model.remat import name
from dsv3_jax.model.routing import Router, RouterStats, Routing, configured_router, is_token_choice
from dsv3_jax.parallel.expert import (Sent, batch_parallel_mesh, batch_parallel_routed_experts, ep_combine,
                                      ep_dispatch, ep_experts, ep_send, expert_axis, expert_parallel_mesh,
                                      expert_parallel_routed_experts, sum_rows)


def grouped_swiglu(x_MD: Float[Array, "M D"], group_sizes_E: Int[Array, "E"], gate_M: Float[Array, "M"],
                   w_gate_EDF: Array, w_up_EDF: Array, w_down_EFD: Array, impl: GroupedGemmImpl = "auto",
                   fp8_backend: Fp8Backend | None = None, cache_fp8: bool = False) -> Float[Array, "M D"]:
    """gate_m x SwiGLU_e(x_m) over rows already sorted by expert; rows [sum(gs[:e]), sum(gs[:e+1]))
    use expert e. The gate multiplies the SwiGLU output before the down projection (the same sum):
    its gradient then needs the SwiGLU output, which the backward has or recomputes, and no row's
    [D] expert output has to be kept for it.

    `fp8_backend`: the three grouped GEMMs run block-scaled in e4m3 (report §3.3), gradients included;
    `cache_fp8` keeps their inputs for the backward as e4m3 tiles (§3.3.4).
    The input is the "expert_in" a remat policy can keep (model/remat.py): recomputing it would
    rerun the dispatch (an all-to-all under expert parallelism).
    """
    x_MD, gate_M1 = name(x_MD, "expert_in"), gate_M.astype(jnp.float32)[:, None]
    cache_fp8 = cache_fp8 and fp8_backend is not None
    if resolve_impl(impl) == "blocked" and fp8_backend != "pallas":  # one fused loop over 128-row blocks
        y_MD = blocked_swiglu(x_MD, group_sizes_E, gate_M1[:, 0], w_gate_EDF, w_up_EDF, w_down_EFD, fp8_backend,
                              jnp.dtype(x_MD.dtype) if cache_fp8 else None)
        return y_MD.astype(x_MD.dtype)
    grouped = lambda x, w: grouped_matmul(x, w, group_sizes_E, impl, fp8_backend, cache_fp8)
    gate_MF, up_MF = name(grouped(x_MD, w_gate_EDF), "swiglu_in"), name(grouped(x_MD, w_up_EDF), "swiglu_in")
    h_MF = name((gate_M1 * jax.nn.silu(gate_MF) * up_MF).astype(x_MD.dtype), "swiglu_out")
    return grouped(h_MF, w_down_EFD).astype(x_MD.dtype)


def routed_experts(x_ND: Float[Array, "N D"], routing: Routing, w_gate_EDF: Array, w_up_EDF: Array,
                   w_down_EFD: Array, impl: GroupedGemmImpl = "auto", fp8_backend: Fp8Backend | None = None,
                   cache_fp8: bool = False) -> Float[Array, "N D"]:
    """Dropless: sort the M assignments by expert -> gated grouped SwiGLU -> scatter-add to tokens.

    With no more assignments than experts (decoding a few tokens) each assignment instead takes its
    expert's weights directly: M weight gathers move less than one grouped pass over all E experts
    (`small` preset, batch-1 decode step on XLA:CPU: 120 -> 17 ms)."""
    E = w_gate_EDF.shape[0]
    if routing.expert_M.shape[0] <= E and fp8_backend is None:
        return per_assignment_experts(x_ND, routing, w_gate_EDF, w_up_EDF, w_down_EFD)
    order_M = jnp.argsort(routing.expert_M, stable=True)
    token_M = routing.token_M[order_M]
    x_MD = jnp.take(x_ND, token_M, axis=0)
    group_sizes_E = jnp.bincount(routing.expert_M, length=E).astype(jnp.int32)
    y_MD = grouped_swiglu(x_MD, group_sizes_E, routing.gate_M[order_M], w_gate_EDF, w_up_EDF, w_down_EFD, impl,
                          fp8_backend, cache_fp8)
    return sum_rows(y_MD, token_M, x_ND.shape[0]).astype(x_ND.dtype)


def per_assignment_experts(x_ND: Float[Array, "N D"], routing: Routing, w_gate_EDF: Array, w_up_EDF: Array,
                           w_down_EFD: Array) -> Float[Array, "N D"]:
    """Each (token, expert) assignment through its expert's gathered weights, gated, summed per token."""
    x_MD = jnp.take(x_ND, routing.token_M, axis=0)
    e_M = routing.expert_M
    dot = lambda a, w: jnp.einsum("md,mdf->mf", a, w, preferred_element_type=jnp.float32)
    gate_M1 = routing.gate_M.astype(jnp.float32)[:, None]
    h_MF = (gate_M1 * jax.nn.silu(dot(x_MD, w_gate_EDF[e_M])) * dot(x_MD, w_up_EDF[e_M])).astype(x_ND.dtype)
    y_MD = dot(h_MF, w_down_EFD[e_M]).astype(x_ND.dtype)
    return sum_rows(y_MD, routing.token_M, x_ND.shape[0]).astype(x_ND.dtype)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        E, D, F = cfg.n_routed_experts, cfg.d_model, cfg.moe_ffn_dim
        pdt = dtype_of(cfg.param_dtype)
        self.router = Router(cfg, rngs)
        # DeepSeek stores the shared experts as one SwiGLU of width n_shared * F.
        self.shared = MLP(cfg, cfg.n_shared_experts * F, rngs, "moe_ffn") if cfg.n_shared_experts else None
        self.w_gate_EDF = param(rngs, (E, D, F), ("expert", "embed", "moe_ffn"), cfg.init_std, pdt)
        self.w_up_EDF = param(rngs, (E, D, F), ("expert", "embed", "moe_ffn"), cfg.init_std, pdt)
        self.w_down_EFD = param(rngs, (E, F, D), ("expert", "moe_ffn", "embed"), cfg.init_std, pdt)
        self.dtype = dtype_of(cfg.dtype)
        self.fp8_backend = cfg.fp8_backend if cfg.fp8 else None
        self.cache_fp8 = cfg.fp8_activation_cache
        self.grouped_gemm = cfg.grouped_gemm
        self.expert_dispatch = cfg.expert_dispatch
        self.capacity_factor = cfg.expert_capacity_factor
        # A group-limited router bounds the ranks a token reaches; others pick experts freely.
        group_limited = getattr(configured_router(cfg), "group_limited", False)
        self.token_choice = is_token_choice(cfg)
        self.groups = (cfg.n_group, cfg.topk_group) if group_limited else (1, 1)

    def __call__(self, x_BTD: Float[Array, "B T D"], token_ids_BT: Array | None = None
                 ) -> tuple[Float[Array, "B T D"], RouterStats]:
        B, T, D = x_BTD.shape
        with jax.named_scope("router"):  # named scopes label profiles and HLO op names
            routing, stats = self.router(x_BTD, token_ids_BT)
        with jax.named_scope("routed_experts"):
            y_ND, stats = self._routed(x_BTD.reshape(B * T, D).astype(self.dtype), routing, stats)
        y_BTD = y_ND.reshape(B, T, D)
        if self.shared is not None:
            with jax.named_scope("shared_experts"):
                y_BTD = y_BTD + self.shared(x_BTD)
        return y_BTD, stats

    # The layer in phases (parallel/expert.py `ep_send` .. `ep_combine`), for the pipeline's F&B pair
    # to interleave with another micro-batch's (Block.PHASES). Their composition is __call__.
    def phased(self) -> bool:
        """Whether the routed experts can run in phases: the "a2a" transport under an expert mesh."""
        return self.expert_dispatch == "a2a" and self.token_choice and expert_parallel_mesh() is not None

    def send(self, x_BTD: Float[Array, "B T D"], token_ids_BT: Array | None = None) -> tuple[Sent, RouterStats]:
        """Route, and gather each destination's rows."""
        B, T, D = x_BTD.shape
        with jax.named_scope("router"):
            routing, stats = self.router(x_BTD, token_ids_BT)
        gate_NK, expert_NK = routing.gate_M.reshape(B * T, -1), routing.expert_M.reshape(B * T, -1)
        with jax.named_scope("routed_experts"):
            sent, dropped = ep_send(x_BTD.reshape(B * T, D).astype(self.dtype), expert_NK, gate_NK,
                                    self.w_gate_EDF.shape[0], expert_parallel_mesh(), self.capacity_factor, self.groups)
        return sent, stats._replace(capacity_dropped=dropped / expert_NK.size)

    def dispatch(self, sent: Sent) -> Sent:
        mesh = expert_parallel_mesh()
        with jax.named_scope("routed_experts"):
            return ep_dispatch(sent, mesh, expert_axis(mesh, self.w_gate_EDF))

    def experts(self, received: Sent, x_BTD: Float[Array, "B T D"]) -> tuple[Sent, Array | None]:
        """The rows through this rank's experts, and the shared experts on the layer's input."""
        cast = lambda w: w[...].astype(self.dtype)  # noqa: E731
        with jax.named_scope("routed_experts"):
            done = ep_experts(received, cast(self.w_gate_EDF), cast(self.w_up_EDF), cast(self.w_down_EFD),
                              expert_parallel_mesh(), self._experts_fn())
        if self.shared is None:
            return done, None
        with jax.named_scope("shared_experts"):
            return done, self.shared(x_BTD)

    def combine(self, done: Sent, shared_BTD: Array | None, shape: tuple[int, int, int]) -> Float[Array, "B T D"]:
        B, T, D = shape
        with jax.named_scope("routed_experts"):
            mesh = expert_parallel_mesh()
            y_BTD = ep_combine(done, B * T, self.dtype, mesh, expert_axis(mesh, self.w_gate_EDF)).reshape(B, T, D)
        return y_BTD if shared_BTD is None else y_BTD + shared_BTD

    def _experts_fn(self):
        return functools.partial(grouped_swiglu, impl=self.grouped_gemm, fp8_backend=self.fp8_backend,
                                 cache_fp8=self.cache_fp8)

    def _routed(self, x_ND: Array, routing: Routing, stats: RouterStats) -> tuple[Array, RouterStats]:
        """The routed experts' sum for every token: expert-parallel under a mesh with an expert axis,
        batch-parallel under data axes only, else on this device."""
        cast = lambda w: w[...].astype(self.dtype)
        weights = cast(self.w_gate_EDF), cast(self.w_up_EDF), cast(self.w_down_EFD)
        explicit = self.expert_dispatch != "gspmd" and self.token_choice  # assignment n * K + k is token n's
        ep_mesh = expert_parallel_mesh() if explicit else None
        dp_mesh = batch_parallel_mesh() if explicit else None
        if ep_mesh is None and dp_mesh is None:
            return routed_experts(x_ND, routing, *weights, self.grouped_gemm, self.fp8_backend, self.cache_fp8), stats
        experts_fn = self._experts_fn()
        N = x_ND.shape[0]
        gate_NK, expert_NK = routing.gate_M.reshape(N, -1), routing.expert_M.reshape(N, -1)
        if ep_mesh is None:
            return batch_parallel_routed_experts(x_ND, expert_NK, gate_NK, *weights, dp_mesh, experts_fn), stats
        y_ND, dropped = expert_parallel_routed_experts(x_ND, expert_NK, gate_NK, *weights, ep_mesh,
                                                       self.expert_dispatch, experts_fn, self.capacity_factor,
                                                       self.groups)
        return y_ND, stats._replace(capacity_dropped=dropped / expert_NK.size)
