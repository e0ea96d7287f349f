"""The routing lab: routers and balancers as small swappable parts, plus load statistics.

Legend: B batch, T tokens, N = B*T tokens, D model dim, E routed experts, K top-k, G groups,
M routed (token, expert) assignments.

A **Router** maps router logits [N, E] (+ the selection bias, token ids) to a `Routing`: a flat
list of M assignments (token, expert, gate), which covers token choice (M = N*K) and expert
choice (M = E*capacity) alike, plus the affinities the balancers need.
A **Balancer** turns a layer's routing into an auxiliary loss (in the forward pass) and/or a
routing-bias update (after the optimizer step, from the whole batch's expert loads); its
`coefficient` (the loss weight or the bias step) comes from the TrainConfig. A run builds its
`Balancing` once: the configured balancers with their coefficients.
Each MoE layer reports a `RouterStats` (loads, entropy, dropped fraction, unweighted balancer
losses); stacked over layers, they are what the train step, metrics and bias update read.

Adding a variant: write one class and register it (see README, "Routing lab"):

    @register_router("my_router")
    class MyRouter:
        def __call__(self, logits_NE, bias_E, token_ids_N, cfg) -> Routing: ...

Then `dsv3 train --set model.router=my_router` uses it; the rest of the system is unchanged. A
router may also take, by keyword, `params=` (its own parameters, from an `init_params(cfg, key)`
method: they train and checkpoint with the model), `key=` (a PRNG key, new every step and distinct
per layer: noisy top-k, Gumbel sampling) and `step=` (the optimizer steps taken: annealing). A
router whose assignments are not token n's K choices in order (M = N * K, assignment n * K + k) sets
`token_choice = False`: meshes then leave its experts to GSPMD instead of the explicit dispatches.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import typing
from collections.abc import Callable
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from dsv3_jax.config import ConfigError, ModelConfig, TrainConfig
from dsv3_jax.model.layers import dtype_of, param
from dsv3_jax.parallel.sharding import per_batch_shard


class RoutingBias(nnx.Variable):
    """The aux-loss-free selection bias b (eq. 16). Not a Param: no gradient, no optimizer,
    no weight decay; bias balancers move it after each optimizer step."""


class RouterClock(RoutingBias):
    """A router's (seed, step) for the routers that take `key=` / `step=`: int32 [2] per layer, in the
    train state beside the bias (so it is checkpointed and resumes exactly); the seed is drawn at
    initialisation (distinct per layer), the step advances by one after each optimizer step."""


class Routing(NamedTuple):
    token_M: Int[Array, "M"]  # the token each assignment belongs to
    expert_M: Int[Array, "M"]  # the expert it goes to
    gate_M: Float[Array, "M"]  # the weight of that expert's output (0 for a dropped assignment)
    scores_NE: Float[Array, "N E"]  # router probabilities / affinities s (fp32), for the balancers
    logits_NE: Float[Array, "N E"]  # raw router logits (fp32), for the z-loss


class RouterStats(NamedTuple):
    """One MoE layer's routing statistics (each field gains a leading layer axis in a stack)."""
    expert_load: Float[Array, "E"]  # assignments each expert received (dropped ones excluded)
    router_entropy: Float[Array, ""]  # mean entropy of the tokens' routing distributions (nats)
    dropped_fraction: Float[Array, ""]  # fraction of tokens the router left without any expert
    capacity_dropped: Float[Array, ""]  # fraction of assignments an expert-parallel transport dropped
    aux_losses: dict[str, Float[Array, ""]]  # balancer name -> its loss, before its coefficient
    choice_signature_N: Array  # uint32 hash of each token's set of experts (`choice_signature`; eval reads it)

    def without_tokens(self) -> RouterStats:
        """These stats without their per-token field (what a pipeline sums over micro-batches)."""
        return self._replace(choice_signature_N=jnp.zeros(self.choice_signature_N.shape[:-1], jnp.uint32))

    def summed_to_mean(self, n: int) -> RouterStats:
        """Stats summed over n equal micro-batches -> the whole batch's: loads add up, means divide."""
        return self._replace(router_entropy=self.router_entropy / n, dropped_fraction=self.dropped_fraction / n,
                             capacity_dropped=self.capacity_dropped / n,
                             aux_losses={k: v / n for k, v in self.aux_losses.items()})


def token_choice(expert_idx_NK: Array, gates_NK: Array, scores_NE: Array, logits_NE: Array) -> Routing:
    N, K = expert_idx_NK.shape
    return Routing(jnp.repeat(jnp.arange(N), K), expert_idx_NK.reshape(-1), gates_NK.reshape(-1), scores_NE, logits_NE)


def chosen_mask(routing: Routing, n_tokens: int, n_experts: int, token_choice: bool = False) -> Float[Array, "N E"]:
    """1 where token n was sent to expert e with a non-zero gate. `token_choice`: assignment n * K + k
    is token n's, so the mask is built per token without a scatter by token index (which GSPMD
    reshards across devices under a mesh, inside a pipeline stage's branch too)."""
    kept = (routing.gate_M != 0).astype(jnp.float32)
    if token_choice:
        kept_NK, expert_NK = kept.reshape(n_tokens, -1), routing.expert_M.reshape(n_tokens, -1)
        hit_NKE = (expert_NK[:, :, None] == jnp.arange(n_experts)[None, None, :]).astype(jnp.float32) * kept_NK[:, :, None]
        return hit_NKE.max(axis=1)
    return jnp.zeros((n_tokens, n_experts), jnp.float32).at[routing.token_M, routing.expert_M].max(kept)


def _mix32(x: Array) -> Array:
    """A 32-bit integer finaliser (MurmurHash3's fmix32): nearby inputs give unrelated outputs."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def choice_signature(routing: Routing, n_tokens: int, token_choice: bool = False) -> Array:
    """uint32 [N]: the sum (mod 2^32) of a hash of each expert token n was sent to with a non-zero
    gate. Equal expert sets give equal values in any order; two different sets collide with
    probability about 2^-32 (a sum of hashed indices, not of the indices, which would collide often)."""
    hashed_M = _mix32(routing.expert_M.astype(jnp.uint32) + jnp.uint32(1)) * (routing.gate_M != 0).astype(jnp.uint32)
    if token_choice:  # assignment n * K + k is token n's: no scatter by token index (see chosen_mask)
        return hashed_M.reshape(n_tokens, -1).sum(-1, dtype=jnp.uint32)
    return jnp.zeros((n_tokens,), jnp.uint32).at[routing.token_M].add(hashed_M)


def expert_load(routing: Routing, n_experts: int) -> Float[Array, "E"]:
    """How many (token, expert) assignments each expert received (dropped ones excluded)."""
    return jnp.zeros((n_experts,), jnp.float32).at[routing.expert_M].add((routing.gate_M != 0).astype(jnp.float32))


# Routers ---------------------------------------------------------------------------------------

@typing.runtime_checkable
class RouterFn(Protocol):
    def __call__(self, logits_NE: Array, bias_E: Array, token_ids_N: Array, cfg: ModelConfig) -> Routing: ...


def _registrar(registry: dict):
    """A class decorator factory: `@register(name)` puts the class in `registry` under `name`."""
    def register(name: str):
        def wrap(cls):
            registry[name] = cls
            return cls
        return wrap
    return register


ROUTERS: dict[str, Callable[[], RouterFn]] = {}
register_router = _registrar(ROUTERS)


def affinities(logits_NE: Float[Array, "N E"], score_func: str) -> Float[Array, "N E"]:
    logits_NE = logits_NE.astype(jnp.float32)
    return jax.nn.sigmoid(logits_NE) if score_func == "sigmoid" else jax.nn.softmax(logits_NE, axis=-1)


def group_mask(biased_NE: Array, n_group: int, topk_group: int, score_func: str) -> Array:
    """Boolean [N, E]: experts in each token's `topk_group` best groups."""
    N, E = biased_NE.shape
    grouped_NGe = biased_NE.reshape(N, n_group, E // n_group)
    if score_func == "sigmoid":
        group_score_NG = jax.lax.top_k(grouped_NGe, 2)[0].sum(-1)  # sum of each group's top-2
    else:
        group_score_NG = grouped_NGe.max(-1)  # V2 group_limited_greedy
    _, kept_groups = jax.lax.top_k(group_score_NG, topk_group)
    kept_NG = jnp.any(jax.nn.one_hot(kept_groups, n_group, dtype=bool), axis=1)
    return jnp.repeat(kept_NG, E // n_group, axis=1)


def route(logits_NE: Float[Array, "N E"], bias_E: Float[Array, "E"], cfg: ModelConfig,
          score_func: str | None = None, norm_topk_prob: bool | None = None
          ) -> tuple[Int[Array, "N K"], Float[Array, "N K"], Float[Array, "N E"]]:
    """DeepSeek token-choice routing: (expert_idx, gates, scores); `bias_E` selects but never weights.
    `score_func` / `norm_topk_prob` override the config's (the V2 router fixes them)."""
    score_func = cfg.score_func if score_func is None else score_func
    norm_topk_prob = cfg.norm_topk_prob if norm_topk_prob is None else norm_topk_prob
    scores_NE = affinities(logits_NE, score_func)
    biased_NE = scores_NE + jax.lax.stop_gradient(bias_E.astype(jnp.float32))[None, :]

    def select(biased_NE):  # per token: the best groups, then the top-K experts within them
        if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
            biased_NE = jnp.where(group_mask(biased_NE, cfg.n_group, cfg.topk_group, score_func), biased_NE, -jnp.inf)
        return jax.lax.top_k(biased_NE, cfg.top_k)[1]

    expert_idx_NK = per_batch_shard(select, biased_NE)
    gates_NK = jnp.take_along_axis(scores_NE, expert_idx_NK, axis=-1)
    if norm_topk_prob:
        gates_NK = gates_NK / (gates_NK.sum(-1, keepdims=True) + 1e-20)
    return expert_idx_NK, gates_NK * cfg.routed_scaling_factor, scores_NE


@register_router("deepseek_v3")
class DeepSeekV3Router:
    """DeepSeek-V3 (report §2.1.2, eq. 13-16): s = sigmoid(u.e); top-K of s + b within the
    `topk_group` best of `n_group` groups (each scored by its top-2 sum; others masked with
    -inf); gates = selected unbiased s, normalised, times routed_scaling_factor. With
    `model.score_func=softmax` and `norm_topk_prob=false` this is DeepSeek-V2's router."""
    group_limited = True  # a token's experts lie in topk_group groups (bounds its expert-parallel fan-out)

    def gate_sum(self, cfg):  # what each token's gates sum to (the router contract checks it)
        return cfg.routed_scaling_factor if cfg.norm_topk_prob else None

    def __call__(self, logits_NE, bias_E, token_ids_N, cfg):
        expert_idx_NK, gates_NK, scores_NE = route(logits_NE, bias_E, cfg)
        return token_choice(expert_idx_NK, gates_NK, scores_NE, logits_NE.astype(jnp.float32))


@register_router("deepseek_v2")
class DeepSeekV2Router:
    """DeepSeek-V2 (arXiv:2405.04434 §2.2): softmax affinities, top-K within the best
    `topk_group` groups by their maximum ("device-limited routing"), unnormalised gates times
    routed_scaling_factor. The selection bias, if a bias balancer moves it, only selects."""
    group_limited = True

    def __call__(self, logits_NE, bias_E, token_ids_N, cfg):
        expert_idx_NK, gates_NK, scores_NE = route(logits_NE, bias_E, cfg, score_func="softmax", norm_topk_prob=False)
        return token_choice(expert_idx_NK, gates_NK, scores_NE, logits_NE.astype(jnp.float32))


@register_router("switch")
class SwitchRouter:
    """Switch / GShard-style (Fedus et al. 2021; Lepikhin et al. 2020): softmax over all experts,
    plain top-K, gates = the top-K probabilities renormalised to sum to 1 (top-1: the probability)."""

    def gate_sum(self, cfg):
        return 1.0 if cfg.top_k > 1 else None

    def __call__(self, logits_NE, bias_E, token_ids_N, cfg):
        probs_NE = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
        biased = probs_NE + jax.lax.stop_gradient(bias_E)[None, :]
        expert_idx_NK = per_batch_shard(lambda b: jax.lax.top_k(b, cfg.top_k)[1], biased)
        gates_NK = jnp.take_along_axis(probs_NE, expert_idx_NK, axis=-1)
        if cfg.top_k > 1:
            gates_NK = gates_NK / gates_NK.sum(-1, keepdims=True)
        return token_choice(expert_idx_NK, gates_NK, probs_NE, logits_NE.astype(jnp.float32))


@register_router("expert_choice")
class ExpertChoiceRouter:
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by softmax score,
    C = N * K / E, so every expert gets exactly its capacity; a token may get 0..E experts.
    Note: choosing over the batch lets a token's routing depend on later tokens (not causal)."""

    token_choice = False  # assignments are per expert, not n * K + k (the explicit dispatches need that)

    def __call__(self, logits_NE, bias_E, token_ids_N, cfg):
        probs_NE = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
        N, E = probs_NE.shape
        capacity = max(1, N * cfg.top_k // E)
        gates_EC, token_EC = jax.lax.top_k(probs_NE.T, capacity)
        expert_EC = jnp.broadcast_to(jnp.arange(E)[:, None], (E, capacity))
        return Routing(token_EC.reshape(-1), expert_EC.reshape(-1), gates_EC.reshape(-1), probs_NE,
                       logits_NE.astype(jnp.float32))


@register_router("hash")
class HashRouter:
    """Hash routing baseline (Roller et al. 2021): a fixed hash of the token id picks K distinct
    experts; gates are 1/K. The router weights receive no gradient."""

    def gate_sum(self, cfg):
        return 1.0

    def __call__(self, logits_NE, bias_E, token_ids_N, cfg):
        N, E = logits_NE.shape
        start_N = (token_ids_N.astype(jnp.uint32) * jnp.uint32(2654435761)) % jnp.uint32(E)
        stride = max(1, E // cfg.top_k)
        expert_idx_NK = (start_N[:, None].astype(jnp.int32) + stride * jnp.arange(cfg.top_k)[None, :]) % E
        gates_NK = jnp.full((N, cfg.top_k), 1.0 / cfg.top_k, jnp.float32)
        uniform_NE = jnp.full((N, E), 1.0 / E, jnp.float32)
        return token_choice(expert_idx_NK, gates_NK, uniform_NE, logits_NE.astype(jnp.float32))


# Balancers -------------------------------------------------------------------------------------

@typing.runtime_checkable
class Balancer(Protocol):
    """`coefficient` and at least one of the optional methods, whose absence means "does nothing"
    (checked when the config is: `check_balancer`), so they are not members of the protocol:

        def loss(self, routing: Routing, batch: int, seq: int, cfg: ModelConfig) -> Float[Array, ""] | None
        def bias_update(self, bias_LE: Array, load_LE: Array, rate: float) -> Array | None
    """

    def coefficient(self, train: TrainConfig) -> float: ...  # its loss weight, or its bias step


BALANCER_METHODS = ("coefficient", "loss", "bias_update")


def check_balancer(name: str, balancer) -> None:
    """ConfigError unless `balancer` has a callable `coefficient` and a callable `loss` and/or
    `bias_update`, and no public method that is none of these (a misspelling would be ignored)."""
    public = [a for a in dir(balancer) if not a.startswith("_") and callable(getattr(balancer, a))
              and not isinstance(getattr(balancer, a), type)]  # methods, not nested classes
    unknown = [a for a in public if a not in BALANCER_METHODS]
    if unknown:
        raise ConfigError(f"balancer {name!r} defines {', '.join(unknown)}, which a balancer does not call; "
                          f"its methods are {', '.join(BALANCER_METHODS)}")
    if "coefficient" not in public:
        raise ConfigError(f"balancer {name!r} has no coefficient(train) method (its loss weight or bias step)")
    if "loss" not in public and "bias_update" not in public:
        raise ConfigError(f"balancer {name!r} has neither loss(routing, batch, seq, cfg) nor "
                          "bias_update(bias_LE, load_LE, rate): it would do nothing")


OPTIONAL_ROUTER_INPUTS = ("params", "key", "step")


def router_inputs(router) -> tuple[str, ...]:
    """Which of params= / key= / step= the router's __call__ takes."""
    try:
        taken = inspect.signature(router).parameters
    except (TypeError, ValueError):  # a builtin or C callable: the four positional inputs only
        return ()
    return tuple(name for name in OPTIONAL_ROUTER_INPUTS if name in taken)


def check_router_callable(name: str, router) -> None:
    """ConfigError unless `router` is callable as (logits_NE, bias_E, token_ids_N, cfg) -> Routing, and
    takes `params=` exactly when it has an `init_params` method."""
    if not callable(router):
        raise ConfigError(f"router {name!r} is not callable: define __call__(self, logits_NE, bias_E, token_ids_N, cfg)")
    has_init, takes_params = getattr(router, "init_params", None) is not None, "params" in router_inputs(router)
    if has_init != takes_params:
        raise ConfigError(f"router {name!r} " + ("has init_params but its __call__ takes no params=" if has_init else
                                                 "takes params= but has no init_params(cfg, key) to create them"))


def balancer_loss(balancer: Balancer, routing: Routing, batch: int, seq: int, cfg: ModelConfig):
    """The balancer's loss, or None when it defines none (a bias-only balancer)."""
    loss = getattr(balancer, "loss", None)
    return None if loss is None else loss(routing, batch, seq, cfg)


BALANCERS: dict[str, Callable[[], Balancer]] = {}
register_balancer = _registrar(BALANCERS)


class _NoLoss:
    def loss(self, routing, batch, seq, cfg):
        return None


class _NoBias:
    def bias_update(self, bias_LE, load_LE, rate):
        return None


@register_balancer("none")
class NoBalancing(_NoLoss, _NoBias):
    """No balancing at all: routing is free to collapse."""

    def coefficient(self, train):
        return 0.0


@register_balancer("aux_free")
class SignBiasBalancer(_NoLoss):
    """DeepSeek-V3 aux-loss-free balancing (report §2.1.2; Wang et al. 2024):
    after each step, b_i -= gamma * sign(load_i - mean load), per layer."""

    def coefficient(self, train):
        return train.bias_gamma

    def bias_update(self, bias_LE, load_LE, rate):
        return bias_LE - rate * jnp.sign(load_LE - load_LE.mean(axis=-1, keepdims=True))


@register_balancer("aux_free_proportional")
class ProportionalBiasBalancer(_NoLoss):
    """A proportional variant: b_i -= gamma * (load_i - mean) / mean, so the step shrinks as the
    load evens out (no sign dithering around balance)."""

    def coefficient(self, train):
        return train.bias_gamma

    def bias_update(self, bias_LE, load_LE, rate):
        mean = load_LE.mean(axis=-1, keepdims=True)
        return bias_LE - rate * (load_LE - mean) / jnp.maximum(mean, 1e-9)


@register_balancer("sequence_loss")
class SequenceBalanceLoss(_NoBias):
    """Complementary sequence-wise balance loss (report eq. 17-20), scaled by alpha."""

    def coefficient(self, train):
        return train.balance_alpha

    def loss(self, routing, batch, seq, cfg):
        E = cfg.n_routed_experts
        chosen_BTE = chosen_mask(routing, batch * seq, E, is_token_choice(cfg)).reshape(batch, seq, E)
        return sequence_balance_loss(routing.scores_NE.reshape(batch, seq, E), chosen_BTE, cfg.top_k)


@register_balancer("aux_loss")
class GlobalAuxLoss(_NoBias):
    """Switch / GShard auxiliary loss over the whole batch: E * sum_i f_i P_i, where f_i is the
    fraction of assignments routed to expert i and P_i the mean router probability (1 when
    perfectly balanced)."""

    def coefficient(self, train):
        return train.aux_loss_alpha

    def loss(self, routing, batch, seq, cfg):
        E = cfg.n_routed_experts
        f_E = jax.lax.stop_gradient(expert_load(routing, E) / jnp.maximum(routing.expert_M.shape[0], 1))
        probs_NE = routing.scores_NE / routing.scores_NE.sum(-1, keepdims=True)
        return E * jnp.sum(f_E * probs_NE.mean(0))


@register_balancer("z_loss")
class RouterZLoss(_NoBias):
    """Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): mean_n (logsumexp_i logits_{n,i})^2,
    keeps router logits small and training stable."""

    def coefficient(self, train):
        return train.z_loss_coef

    def loss(self, routing, batch, seq, cfg):
        return jnp.mean(jax.nn.logsumexp(routing.logits_NE, axis=-1) ** 2)


def _build(cls, name: str, kind: str, key: str, args: tuple):
    """`cls()`, or `cls(cls.Args(**args))` for a plugin that declares its hyperparameters as an `Args`
    dataclass (ConfigError naming the key for an undeclared field or a value of the wrong type)."""
    declared = getattr(cls, "Args", None)
    if declared is None:
        if args:
            raise ConfigError(f"{key}: {kind} {name!r} declares no hyperparameters (no Args dataclass), "
                              f"got {', '.join(k for k, _ in args)}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(declared)}
    hints = typing.get_type_hints(declared)
    values = {}
    for field, value in args:
        if field not in fields:
            raise ConfigError(f"{key}.{field}: {kind} {name!r} has no hyperparameter {field!r}; "
                              f"its Args: {', '.join(fields) or 'none'}")
        want = hints.get(field)
        ok = {float: (int, float), int: (int,), bool: (bool,), str: (str,)}.get(want)
        if ok and (not isinstance(value, ok) or (want is not bool and isinstance(value, bool))):
            raise ConfigError(f"{key}.{field}={value!r}: {kind} {name!r} declares it {want.__name__}")
        values[field] = float(value) if want is float else value
    return cls(declared(**values))


@functools.cache
def router_for(name: str, args: tuple = ()) -> RouterFn:
    """The registered router `name` with its hyperparameters (model.router_args), built once."""
    return _build(resolve(ROUTERS, name, "router"), name, "router", "model.router_args", args)


@functools.cache
def balancer_for(name: str, args: tuple = ()) -> Balancer:
    """The registered balancer `name` with its hyperparameters (model.balancer_args.NAME), built once."""
    return _build(resolve(BALANCERS, name, "balancer"), name, "balancer", f"model.balancer_args.{name}", args)


def configured_router(cfg: ModelConfig) -> RouterFn:
    return router_for(cfg.router, cfg.router_args)


def configured_balancer(cfg: ModelConfig, name: str) -> Balancer:
    return balancer_for(name, cfg.args_of_balancer(name))


def check_routing(cfg: ModelConfig) -> None:
    """ConfigError unless model.router and every model.balancer name is registered (or importable),
    each satisfies its protocol, and their hyperparameters are fields of their Args."""
    names = {n for name in cfg.balancer_names for n in (name, name.rpartition(":")[2])}
    for key, _ in cfg.balancer_args:
        if key.rpartition(".")[0] not in names:
            raise ConfigError(f"model.balancer_args.{key}: {key.rpartition('.')[0]!r} is not one of the run's "
                              f"balancers (model.balancer={cfg.balancer!r})")
    for names, kind, build, check in (([cfg.router], "router", lambda _: configured_router(cfg), check_router_callable),
                                      (cfg.balancer_names, "balancer", lambda n: configured_balancer(cfg, n),
                                       check_balancer)):
        for name in names:
            try:
                built = build(name)
            except (KeyError, ImportError) as e:
                raise ConfigError(f"model.{kind}={name!r}: {str(e).strip(chr(39)).strip(chr(34))}") from None
            except TypeError as e:  # a plugin whose constructor does not take its Args
                raise ConfigError(f"model.{kind}={name!r}: cannot build it: {e}") from None
            try:
                check(name, built)
            except ConfigError as e:
                raise ConfigError(f"model.{kind}={name!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Balancing:
    """A run's balancers with their coefficients, built once: the loss they add and the bias update."""
    balancers: tuple[tuple[str, Balancer, float], ...]  # (name, balancer, coefficient)

    @classmethod
    def from_config(cls, model: ModelConfig, train: TrainConfig) -> Balancing:
        return cls(tuple((name, configured_balancer(model, name), configured_balancer(model, name).coefficient(train))
                         for name in model.balancer_names))

    def loss(self, stats: RouterStats | None) -> Float[Array, ""]:
        """sum_b coefficient_b * sum over the stack's layers of balancer b's loss (e.g. alpha * eq. 17)."""
        total = jnp.zeros((), jnp.float32)
        if stats is None:
            return total
        for name, _, weight in self.balancers:
            if weight and name in stats.aux_losses:
                total = total + weight * stats.aux_losses[name].sum()
        return total

    def terms(self, *stacks: RouterStats | None) -> dict[str, Float[Array, ""]]:
        """Per balancer, by name: its coefficient ("coefficient/NAME") and, for one with a loss, its
        term of the objective ("balance/NAME": coefficient x its loss summed over the stacks' layers)."""
        out = {}
        for name, _, weight in self.balancers:
            out[f"coefficient/{name}"] = jnp.asarray(weight, jnp.float32)
            losses = [s.aux_losses[name].sum() for s in stacks if s is not None and name in s.aux_losses]
            if losses:
                out[f"balance/{name}"] = weight * sum(losses)
        return out

    def update_bias(self, bias_LE: Array, load_LE: Array) -> Array:
        """Every bias balancer's step in turn, from this step's whole-batch loads (eq. 16's bias)."""
        for _, balancer, rate in self.balancers:
            update = getattr(balancer, "bias_update", None)
            new = None if update is None else update(bias_LE, load_LE, rate)
            bias_LE = bias_LE if new is None else new
        return bias_LE


def sequence_balance_loss(scores_BTE: Float[Array, "B T E"], chosen_BTE: Float[Array, "B T E"],
                          top_k: int) -> Float[Array, ""]:
    """Eq. 17-20 without alpha:
    f_i = E/(K T) * #{t : expert i chosen for token t}   (eq. 18; `chosen` is the router's actual
          selection, i.e. eq. 18's Topk with the bias and group limit applied; f is a constant)
    s'  = s / sum_j s_j (eq. 19);  P_i = mean_t s'_{i,t} (eq. 20);  L = sum_i f_i P_i (eq. 17),
    averaged over the B sequences.
    """
    B, T, E = scores_BTE.shape
    f_BE = jax.lax.stop_gradient(chosen_BTE.astype(jnp.float32).sum(1) * E / (top_k * T))
    P_BE = (scores_BTE / scores_BTE.sum(-1, keepdims=True)).mean(1)
    return jnp.mean(jnp.sum(f_BE * P_BE, axis=-1))


def router_entropy(scores_NE: Array) -> Float[Array, ""]:
    """Mean entropy (nats) of each token's normalised routing distribution."""
    p = scores_NE / scores_NE.sum(-1, keepdims=True)
    return -jnp.mean(jnp.sum(p * jnp.log(jnp.maximum(p, 1e-20)), axis=-1))


def is_token_choice(cfg: ModelConfig) -> bool:
    """Whether the configured router's assignment n * K + k belongs to token n (routers say otherwise
    with `token_choice = False`)."""
    return getattr(configured_router(cfg), "token_choice", True)


def resolve(registry: dict, name: str, kind: str):
    """A registered name, or "package.module:name" whose import registers it."""
    if name not in registry and ":" in name:
        module, _, short = name.partition(":")
        importlib.import_module(module)
        if short in registry:
            registry[name] = registry[short]
    if name not in registry:
        raise KeyError(f"unknown {kind} {name!r}; registered: {', '.join(sorted(k for k in registry if ':' not in k))}")
    return registry[name]


class RouterParams(nnx.Module):
    """A plugin router's own parameters, one Param per name (replicated: they are small)."""

    def __init__(self, arrays: dict[str, Array]):
        self.names = tuple(sorted(arrays))
        for name in self.names:
            value = jnp.asarray(arrays[name], jnp.float32)
            setattr(self, name, nnx.Param(value, logical_axes=(None,) * value.ndim))

    def values(self) -> dict[str, Array]:
        return {name: getattr(self, name)[...] for name in self.names}


def call_router(router, logits_NE, bias_E, token_ids_N, cfg, params: dict | None = None,
                key: Array | None = None, step: Array | None = None) -> Routing:
    """A router's routing, passing the optional inputs (params=, key=, step=) it takes."""
    given = {"params": params, "key": key, "step": step}
    optional = {name: given[name] for name in router_inputs(router)}
    missing = [name for name, value in optional.items() if value is None]
    if missing:
        raise ValueError(f"this router takes {', '.join(n + '=' for n in missing)}: pass them")
    return router(logits_NE, bias_E, token_ids_N, cfg, **optional)


def clock_key(clock: Int[Array, "2"]) -> Array:
    """The PRNG key of a router clock's step: its layer's seed folded with the step."""
    return jax.random.fold_in(jax.random.key(clock[0]), clock[1])


class Router(nnx.Module):
    """Centroids e_i and the routing bias b; runs the configured router and balancer losses."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        check_routing(cfg)
        self.cfg = cfg
        # Gating stays in fp32 (report §3.3.1 keeps "the gating module" in higher precision).
        self.centroids_DE = param(rngs, (cfg.d_model, cfg.n_routed_experts), ("embed", "router"),
                                  cfg.init_std, dtype_of(cfg.param_dtype))
        self.bias_E = RoutingBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32), logical_axes=("router",))
        # A plugin router's own parameters (`init_params(cfg, key) -> {name: array}`): Params of
        # this layer, so they train, are stacked over layers and checkpoint with the model.
        init = getattr(configured_router(cfg), "init_params", None)
        self.own = None if init is None else RouterParams(init(cfg, rngs.params()))
        # A router that takes key= / step= gets them from its layer's clock (seed, step).
        wants_clock = {"key", "step"} & set(router_inputs(configured_router(cfg)))
        self.clock = None if not wants_clock else RouterClock(
            jnp.stack([jax.random.randint(rngs.params(), (), 0, jnp.iinfo(jnp.int32).max, jnp.int32),
                       jnp.zeros((), jnp.int32)]), logical_axes=(None,))

    def __call__(self, x_BTD: Float[Array, "B T D"], token_ids_BT: Array | None = None
                 ) -> tuple[Routing, RouterStats]:
        B, T, D = x_BTD.shape
        cfg = self.cfg
        logits_NE = jnp.dot(x_BTD.reshape(B * T, D).astype(jnp.float32), self.centroids_DE[...].astype(jnp.float32))
        token_ids_N = (token_ids_BT if token_ids_BT is not None else jnp.zeros((B, T), jnp.int32)).reshape(-1)
        clock = None if self.clock is None else self.clock[...]
        routing = call_router(configured_router(cfg), logits_NE, self.bias_E[...], token_ids_N, cfg,
                              None if self.own is None else self.own.values(),
                              None if clock is None else clock_key(clock), None if clock is None else clock[1])
        losses = {name: balancer_loss(configured_balancer(cfg, name), routing, B, T, cfg) for name in cfg.balancer_names}
        stats = RouterStats(
            expert_load=expert_load(routing, cfg.n_routed_experts),
            router_entropy=router_entropy(routing.scores_NE),
            dropped_fraction=1.0 - jnp.mean(chosen_mask(routing, B * T, cfg.n_routed_experts,
                                                         is_token_choice(cfg)).max(-1)),
            capacity_dropped=jnp.zeros((), jnp.float32),
            aux_losses={name: loss for name, loss in losses.items() if loss is not None},
            choice_signature_N=choice_signature(routing, B * T, is_token_choice(cfg)))
        return routing, stats
