"""TrainState: everything that changes during training, as one pytree (what orbax saves).

Under a mesh the state is created sharded: its shapes are taken abstractly first, the sharding
rules (parallel/sharding.py) give every leaf its NamedSharding, and the initialisation runs under
`jit` with those `out_shardings`, so each device computes and holds only its shards and the whole
state never exists on one device (a model larger than one device can start).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsv3_jax.config import Config
from dsv3_jax.model.model import DeepSeekV3
from dsv3_jax.model.routing import RoutingBias
from dsv3_jax.parallel.sharding import rules_for
from dsv3_jax.train.optim import make_optimizer


@flax.struct.dataclass
class TrainState:
    params: Any  # nnx.State of Params (fp32 masters)
    routing_bias: Any  # nnx.State of RoutingBias: updated by the sign rule, not by gradients
    opt_state: Any
    # Arrays in a live state; the same tree also holds ShapeDtypeStructs (abstract state) or
    # NamedShardings (the state's shardings), hence Any.
    step: Any  # int32 []
    rng: Any  # raw uint32 key data (orbax-friendly)


def init_model(config: Config, seed: int) -> DeepSeekV3:
    return DeepSeekV3(config.model, nnx.Rngs(seed))


def _build(config: Config, seed: int) -> tuple[nnx.GraphDef, optax.GradientTransformation, TrainState]:
    model = init_model(config, seed)
    graphdef, params, routing_bias = nnx.split(model, nnx.Param, RoutingBias)
    optimizer = make_optimizer(config.train, params)
    state = TrainState(params=params, routing_bias=routing_bias, opt_state=optimizer.init(params),
                       step=jnp.zeros((), jnp.int32),
                       rng=jax.random.key_data(jax.random.key(seed + 1)))
    return graphdef, optimizer, state


def _traceable(config: Config, seed: int):
    """(a function returning the state alone, traceable by eval_shape / jit, and a dict it fills
    with the graphdef and optimizer, which are not arrays)."""
    static: dict = {}

    def state_only() -> TrainState:
        static["graphdef"], static["optimizer"], state = _build(config, seed)
        return state

    return state_only, static


def abstract_train_state(config: Config, seed: int = 0
                         ) -> tuple[nnx.GraphDef, optax.GradientTransformation, TrainState]:
    """The train state's shapes and dtypes (jax.ShapeDtypeStruct leaves); nothing is allocated."""
    state_only, static = _traceable(config, seed)
    abstract = jax.eval_shape(state_only)
    return static["graphdef"], static["optimizer"], abstract


def sharded_init(config: Config, seed: int, mesh) -> tuple[Callable[[], TrainState], dict]:
    """(the jitted initialisation, with outputs sharded by the rules on `mesh`; a dict that holds
    the graphdef and optimizer once it has been traced or compiled)."""
    state_only, static = _traceable(config, seed)
    return jax.jit(state_only, out_shardings=rules_for(config).tree(jax.eval_shape(state_only), mesh, config.train.zero1)), static


def create_train_state(config: Config, seed: int, mesh=None
                       ) -> tuple[nnx.GraphDef, optax.GradientTransformation, TrainState]:
    """(graphdef, optimizer, state): on one device eagerly; with `mesh`, created sharded (bit-equal
    to the same jitted program on one device, as the counter-based RNG does not depend on how its
    output is split; within an ulp of the eager values, since XLA fuses std * normal)."""
    if mesh is None:
        return _build(config, seed)
    init, static = sharded_init(config, seed, mesh)
    state = init()
    return static["graphdef"], static["optimizer"], state
