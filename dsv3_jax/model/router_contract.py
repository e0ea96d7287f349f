"""The contract every router of the routing lab must keep (`dsv3 check-router MODULE:NAME`).

Legend: N tokens, E routed experts, K top-k, M assignments.

The checks the suite runs on the built-in routers, runnable on a plugin before it trains: the
`Routing` it returns is well formed (shapes, indices in range), gates are finite and >= 0 and,
for a router that says what they sum to (an optional `gate_sum(cfg)` method), sum to that per
token; a token-choice router gives each token K distinct experts as assignments n * K + k; it
jits (same result), is deterministic given its key (a router that takes `key=` gets the same one
twice, and must then give the same routing), has finite gradients, and gives the same routing when the
tokens are sharded over an expert mesh as on one device (what the model's expert-parallel layers
rely on: a router that routes per shard, e.g. capacity per device, fails it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.routing import Routing, call_router, configured_router, is_token_choice, router_inputs
from dsv3_jax.parallel.mesh import make_mesh
from dsv3_jax.parallel.sharding import current_rules

N_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


def contract_config(base: ModelConfig, router: str) -> ModelConfig:
    """`base` routing `router` over 8 experts in 4 groups, top-2: small enough to check in seconds."""
    return dataclasses.replace(base, router=router, n_routed_experts=8, top_k=2, n_group=4, topk_group=2)


def _inputs(cfg: ModelConfig, seed: int = 0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    E = cfg.n_routed_experts
    logits_NE = jax.random.normal(k1, (N_TOKENS, E), jnp.float32) * 2
    bias_E = jax.random.normal(k2, (E,), jnp.float32) * 0.1
    token_ids_N = jax.random.randint(k3, (N_TOKENS,), 0, 1000)
    return logits_NE, bias_E, token_ids_N


def _equal(a: Routing, b: Routing) -> bool:
    return all(np.allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6) for x, y in zip(a, b))


def check_router(cfg: ModelConfig, devices: list | None = None) -> list[Check]:
    """Every check of the contract on `cfg.router` (see the module docstring); none raises."""
    plugin = configured_router(cfg)
    init = getattr(plugin, "init_params", None)
    params = None if init is None else {k: jnp.asarray(v, jnp.float32) for k, v in init(cfg, jax.random.key(1)).items()}

    key, step = jax.random.key(3), jnp.asarray(5, jnp.int32)  # for a router that takes key= / step=

    def router(logits_NE, bias_E, token_ids_N, cfg, params=params):  # with its own parameters, if any
        return call_router(plugin, logits_NE, bias_E, token_ids_N, cfg, params, key, step)

    logits_NE, bias_E, token_ids_N = _inputs(cfg)
    N, E, K = N_TOKENS, cfg.n_routed_experts, cfg.top_k
    checks: list[Check] = []

    def check(name: str, fn: Callable[[], tuple[bool, str]]) -> None:
        try:
            passed, detail = fn()
        except Exception as e:  # a router that raises fails the check, with why
            passed, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        checks.append(Check(name, bool(passed), detail))

    routing = router(logits_NE, bias_E, token_ids_N, cfg)

    def well_formed():
        if not isinstance(routing, Routing):
            return False, f"returned {type(routing).__name__}, not a Routing"
        m = {routing.token_M.shape, routing.expert_M.shape, routing.gate_M.shape}
        if len(m) != 1 or len(next(iter(m))) != 1:
            return False, f"token_M, expert_M, gate_M must be one [M] shape, got {sorted(m)}"
        if routing.scores_NE.shape != (N, E) or routing.logits_NE.shape != (N, E):
            return False, f"scores_NE / logits_NE must be [{N}, {E}], got {routing.scores_NE.shape} / {routing.logits_NE.shape}"
        if not (jnp.issubdtype(routing.token_M.dtype, jnp.integer) and jnp.issubdtype(routing.expert_M.dtype, jnp.integer)):
            return False, "token_M and expert_M must be integers"
        in_range = bool(jnp.all((routing.token_M >= 0) & (routing.token_M < N)) &
                        jnp.all((routing.expert_M >= 0) & (routing.expert_M < E)))
        return in_range, f"M = {routing.gate_M.shape[0]} assignments" if in_range else "an index out of range"

    check("well-formed Routing", well_formed)
    check("gates finite and >= 0", lambda: (bool(jnp.all(jnp.isfinite(routing.gate_M)) & jnp.all(routing.gate_M >= 0)),
                                            f"min gate {float(routing.gate_M.min()):.3g}"))
    claimed = getattr(plugin, "gate_sum", None)
    total = None if claimed is None else claimed(cfg)
    if total is not None:
        def sums():
            per_token = jnp.zeros((N,), jnp.float32).at[routing.token_M].add(routing.gate_M)
            routed = jnp.zeros((N,), bool).at[routing.token_M].max(routing.gate_M > 0)
            err = float(jnp.max(jnp.where(routed, jnp.abs(per_token - total), 0.0)))
            return err <= 1e-4 * max(1.0, abs(total)), f"claims {total:g} per token; largest error {err:.3g}"
        check("gates sum to what the router claims", sums)
    if is_token_choice(cfg):
        def token_choice():
            if routing.gate_M.shape[0] != N * K:
                return False, f"token choice needs M = N * K = {N * K}, got {routing.gate_M.shape[0]}"
            if not np.array_equal(np.asarray(routing.token_M), np.repeat(np.arange(N), K)):
                return False, "assignment n * K + k must belong to token n (else set token_choice = False)"
            experts_NK = np.asarray(routing.expert_M).reshape(N, K)
            repeated = int(sum(len(set(row)) < K for row in experts_NK))
            return repeated == 0, f"{repeated} tokens got an expert twice" if repeated else f"{K} distinct experts per token"
        check("token choice: K distinct experts per token", token_choice)
    check("jit gives the same routing", lambda: (_equal(jax.jit(lambda *a: router(*a, cfg))(logits_NE, bias_E, token_ids_N),
                                                        routing), "jax.jit(router) against eager"))
    check("deterministic given its key", lambda: (_equal(router(logits_NE, bias_E, token_ids_N, cfg), routing),
                                                  "called twice" + (" with the same key" if "key" in
                                                                    router_inputs(plugin) else "")))

    def gradients():  # with respect to the logits and the router's own parameters
        weights_M = jax.random.normal(jax.random.key(7), routing.gate_M.shape)
        objective = lambda l, p: jnp.sum(router(l, bias_E, token_ids_N, cfg, params=p).gate_M * weights_M)
        grads = jax.grad(objective, argnums=(0, 1))(logits_NE, params)
        finite = all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
        own = f"; own parameters: {', '.join(params)}" if params else ""
        return finite, f"|d gates / d logits| max {float(jnp.abs(grads[0]).max()):.3g}{own}"

    check("finite gradients", gradients)
    devices = jax.devices() if devices is None else devices
    shards = max((n for n in (8, 4, 2) if n <= len(devices) and N % n == 0), default=1)
    if shards > 1:
        def sharded():
            mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "expert": shards, "pipeline": 1}, devices[:shards])
            rules = current_rules()
            rows = rules.sharding(("batch", None), mesh, logits_NE.shape)
            with jax.set_mesh(mesh):
                run = jax.jit(lambda l, b, t: router(l, b, t, cfg), in_shardings=(rows, rules.sharding((), mesh),
                                                                                   rules.sharding(("batch",), mesh)))
                compiled = run.lower(logits_NE, bias_E, token_ids_N).compile()
                got = compiled(logits_NE, bias_E, token_ids_N)
            # The compiled program really holds N / shards tokens per device (else the check proves nothing).
            per_device = compiled.input_shardings[0][0].shard_shape(logits_NE.shape)
            if per_device[0] != N // shards:
                return False, f"the tokens were not split: {per_device[0]} of {N} rows per device"
            return _equal(jax.device_get(got), routing), \
                f"tokens over expert={shards} ({per_device[0]} of {N} per device) against one device"
        check("sharded == unsharded", sharded)
    else:
        checks.append(Check("sharded == unsharded", True, "skipped: one device (dsv3 check-router --host-devices 4)"))
    return checks
