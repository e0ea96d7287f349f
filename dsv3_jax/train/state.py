"""TrainState: everything that changes during training, as one pytree (what orbax saves)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsv3_jax.config import Config
from dsv3_jax.model.model import DeepSeekV3
from dsv3_jax.model.routing import RoutingBias
from dsv3_jax.train.optim import make_optimizer


@flax.struct.dataclass
class TrainState:
    params: Any  # nnx.State of Params (fp32 masters)
    routing_bias: Any  # nnx.State of RoutingBias: updated by the sign rule, not by gradients
    opt_state: Any
    step: jax.Array
    rng: jax.Array  # raw uint32 key data (orbax-friendly)


def init_model(config: Config, seed: int) -> DeepSeekV3:
    return DeepSeekV3(config.model, nnx.Rngs(seed))


def create_train_state(config: Config, seed: int) -> tuple[nnx.GraphDef, optax.GradientTransformation, TrainState]:
    model = init_model(config, seed)
    graphdef, params, routing_bias = nnx.split(model, nnx.Param, RoutingBias)
    optimizer = make_optimizer(config.train, params)
    state = TrainState(params=params, routing_bias=routing_bias, opt_state=optimizer.init(params),
                       step=jnp.zeros((), jnp.int32),
                       rng=jax.random.key_data(jax.random.key(seed + 1)))
    return graphdef, optimizer, state
