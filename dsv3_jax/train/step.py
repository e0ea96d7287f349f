"""One pure training step: forward, loss, grads, AdamW update, then the aux-loss-free bias update.

Bias rule (report §2.1.2): after the optimizer step, for every MoE layer
    b_i <- b_i - gamma * sign(load_i - mean_j load_j)
with loads counted over the whole batch of the step (under data/expert sharding the loads are
global values: the forward's load sums are over the full batch, which XLA reduces across shards).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsv3_jax.config import Config
from dsv3_jax.train.loss import total_loss
from dsv3_jax.train.optim import lr_schedule
from dsv3_jax.train.state import TrainState

# Which router statistics feed which bias stack: stats key -> top-level module name.
_LOAD_FOR_STACK = {"moe_layers": "expert_load", "mtp": "mtp_expert_load"}


def sign_bias_update(bias_LE: jax.Array, load_LE: jax.Array, gamma: float) -> jax.Array:
    """b -= gamma * sign(load - mean load), per layer (row)."""
    return bias_LE - gamma * jnp.sign(load_LE - load_LE.mean(axis=-1, keepdims=True))


def max_violation(load_LE: jax.Array) -> jax.Array:
    """MaxVio per layer (Wang et al. 2024): max_i load_i / mean load - 1."""
    return load_LE.max(-1) / jnp.maximum(load_LE.mean(-1), 1e-9) - 1.0


def update_routing_bias(routing_bias: nnx.State, stats: dict[str, jax.Array], gamma: float) -> nnx.State:
    def update(path, variable):
        load = stats.get(_LOAD_FOR_STACK.get(str(path[0].key), ""))
        return variable if load is None else variable.replace(sign_bias_update(variable.get_value(), load, gamma))

    return jax.tree.map_with_path(update, routing_bias, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_train_step(config: Config, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation):
    tc = config.train
    schedule = lr_schedule(tc)

    def loss_fn(params, routing_bias, tokens_BS):
        out = nnx.merge(graphdef, params, routing_bias)(tokens_BS[:, :-1])
        parts = total_loss(out.logits_BTV, out.mtp_logits_PBTV, out.stats, tokens_BS, tc.mtp_lambda, tc.balance_alpha)
        return parts.total, (parts, out.stats)

    def train_step(state: TrainState, tokens_BS: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        (_, (parts, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.routing_bias, tokens_BS)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        routing_bias = update_routing_bias(state.routing_bias, stats, tc.bias_gamma)
        metrics = {"loss": parts.total, "lm_loss": parts.lm, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state.step)}
        if "expert_load" in stats or "mtp_expert_load" in stats:
            metrics["balance_loss"] = parts.balance
        if "expert_load" in stats:
            metrics["max_vio"] = max_violation(stats["expert_load"]).mean()
            metrics["expert_load"] = stats["expert_load"]
        if config.model.mtp_depth:
            metrics["mtp_loss"] = parts.mtp
        new_state = state.replace(params=params, routing_bias=routing_bias, opt_state=opt_state, step=state.step + 1)
        return new_state, metrics

    return train_step


def make_eval_step(config: Config, graphdef: nnx.GraphDef):
    def eval_step(state: TrainState, tokens_BS: jax.Array) -> dict[str, jax.Array]:
        out = nnx.merge(graphdef, state.params, state.routing_bias)(tokens_BS[:, :-1], with_mtp=False)
        parts = total_loss(out.logits_BTV, None, out.stats, tokens_BS, 0.0, 0.0)
        metrics = {"lm_loss": parts.lm}
        if "expert_load" in out.stats:
            metrics["expert_load"] = out.stats["expert_load"]
        return metrics

    return eval_step
