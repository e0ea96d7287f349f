"""One pure training step: forward, loss, grads, AdamW update, then the routing-bias update.

Bias rule of DeepSeek-V3 (report §2.1.2, balancer "aux_free"): after the optimizer step, for
every MoE layer
    b_i <- b_i - gamma * sign(load_i - mean_j load_j)
with loads counted over the whole batch of the step (under data/expert sharding the loads are
global values: the forward's load sums are over the full batch, which XLA reduces across shards).
Other balancers (model/routing.py) plug in their own update and/or auxiliary loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.typing import ArrayLike

from dsv3_jax.config import Config
from dsv3_jax.data.packing import unpack
from dsv3_jax.model.model import ModelStats
from dsv3_jax.model.routing import Balancing, RouterClock
from dsv3_jax.train.loss import total_loss
from dsv3_jax.train.optim import lr_schedule
from dsv3_jax.train.pipelined import make_pipelined_loss_and_grads
from dsv3_jax.train.state import TrainState


def max_violation(load_LE: ArrayLike) -> ArrayLike:
    """MaxVio per layer (Wang et al. 2024): max_i load_i / mean load - 1."""
    return load_LE.max(-1) / jnp.maximum(load_LE.mean(-1), 1e-9) - 1.0


def update_routing_bias(routing_bias: nnx.State, stats: ModelStats, balancing: Balancing) -> nnx.State:
    """Each routed stack's bias (the model's `moe_layers`, `mtp`) moved by the bias balancers from
    that stack's loads (`ModelStats` names its fields after those stacks); router clocks advance."""
    def update(path, variable):
        if isinstance(variable, RouterClock):  # (seed, step): the next step's key
            return variable.replace(variable.get_value().at[..., 1].add(1))
        stack_stats = getattr(stats, str(path[0].key))
        if stack_stats is None:
            return variable
        return variable.replace(balancing.update_bias(variable.get_value(), stack_stats.expert_load))

    return jax.tree.map_with_path(update, routing_bias, is_leaf=lambda x: isinstance(x, nnx.Variable))


def forward_batch(model, batch: jax.Array, with_mtp: bool = True, features: bool = False):
    """The model on a batch's inputs: (ModelOutput, or with `features` the ModelFeatures the output
    head reads, and (tokens_BS, loss_mask_BS, segment_ids_BS) for `total_loss`). A packed batch
    brings its positions and segments (data/packing.py)."""
    tokens_BS, positions_BS, segment_ids_BS, loss_mask_BS = unpack(batch)
    forward = model.features if features else model
    if positions_BS is None:
        out = forward(tokens_BS[:, :-1], with_mtp=with_mtp)
    else:
        out = forward(tokens_BS[:, :-1], positions_BS[:, :-1], with_mtp, segment_ids_BS[:, :-1])
    return out, (tokens_BS, loss_mask_BS, segment_ids_BS)


def batch_loss(model, batch: jax.Array, config: Config, balancing: Balancing, with_mtp: bool = True):
    """(LossParts, ModelStats) of `model` on `batch`: from the logits, or with train.ce_chunk from the
    output head's inputs, `ce_chunk` positions of logits at a time (train/loss.py)."""
    chunk, tc = config.train.ce_chunk, config.train
    out, (tokens_BS, loss_mask_BS, segment_ids_BS) = forward_batch(model, batch, with_mtp, features=bool(chunk))
    main, mtp = (out.h_BTD, out.mtp_h_PBTD) if chunk else (out.logits_BTV, out.mtp_logits_PBTV)
    parts = total_loss(main, mtp, out.stats, tokens_BS, tc.mtp_lambda if with_mtp else 0.0, balancing, loss_mask_BS,
                       segment_ids_BS, head=model.logits if chunk else None, chunk=chunk)
    return parts, out.stats


def make_loss_and_grads(config: Config, graphdef: nnx.GraphDef, pipeline_mesh=None):
    """(params, routing_bias, batch) -> ((total loss, (LossParts, ModelStats)), grads): what the
    train step differentiates, through the pipeline schedule when `pipeline_mesh` is given. A batch
    is tokens [B, S] (pretraining) or packed examples [B, 4, S] (SFT; data/packing.py)."""
    balancing = Balancing.from_config(config.model, config.train)
    if pipeline_mesh is not None:
        return make_pipelined_loss_and_grads(config, graphdef, pipeline_mesh, balancing)

    def loss_fn(params, routing_bias, batch):
        parts, stats = batch_loss(nnx.merge(graphdef, params, routing_bias), batch, config, balancing)
        return parts.total, (parts, stats)

    return jax.value_and_grad(loss_fn, has_aux=True)


def make_train_step(config: Config, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    pipeline_mesh=None):
    """The pure train step. With `pipeline_mesh` (mesh.pipeline > 1) the loss and gradients come from
    the pipeline schedule (train/pipelined.py); everything after them is the same code."""
    tc = config.train
    schedule = lr_schedule(tc)
    balancing = Balancing.from_config(config.model, tc)
    loss_and_grads = make_loss_and_grads(config, graphdef, pipeline_mesh)

    def train_step(state: TrainState, batch: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        (_, (parts, stats)), grads = loss_and_grads(state.params, state.routing_bias, batch)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, grad_norm=grad_norm)
        params = optax.apply_updates(state.params, updates)
        routing_bias = update_routing_bias(state.routing_bias, stats, balancing)
        metrics = {"loss": parts.total, "lm_loss": parts.lm, "grad_norm": grad_norm, "lr": schedule(state.step)}
        if stats.moe_layers is not None or stats.mtp is not None:
            metrics["balance_loss"] = parts.balance
            metrics.update(balancing.terms(stats.moe_layers, stats.mtp))
        if stats.moe_layers is not None:
            metrics["max_vio"] = max_violation(stats.moe_layers.expert_load).mean()
            metrics["expert_load"] = stats.moe_layers.expert_load
            metrics["router_entropy"] = stats.moe_layers.router_entropy.mean()
            metrics["dropped_fraction"] = stats.moe_layers.dropped_fraction.mean()
            metrics["capacity_dropped"] = stats.moe_layers.capacity_dropped.mean()
        if config.model.mtp_depth:
            metrics["mtp_loss"] = parts.mtp
        metrics["nonfinite_state"] = nonfinite_weights(params, routing_bias)
        new_state = state.replace(params=params, routing_bias=routing_bias, opt_state=opt_state, step=state.step + 1)
        return new_state, metrics

    return train_step


def nonfinite_weights(params, routing_bias) -> jax.Array:
    """Non-finite values among the updated weights. A state is saved only when this is 0 and the
    loss and gradient norm are finite (jobs/train.py `check_finite`): a finite loss can come with
    a NaN gradient, and finite gradients times a huge lr can still overflow the weights. The AdamW
    moments need no pass of their own: from finite moments, m' = b1 m + (1 - b1) g and
    v' = b2 v + (1 - b2) g^2 are finite whenever the gradient norm is (every g^2 then is), and the
    moments start at 0 (skipping them saves a read of 2/3 of the state: ~75 ms of a `small` step)."""
    return count_nonfinite((params, routing_bias))


def count_nonfinite(tree) -> jax.Array:
    """How many values in the floating-point leaves of `tree` are NaN or infinite."""
    floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return sum((jnp.sum(~jnp.isfinite(x)) for x in floats), jnp.zeros((), jnp.int32))


def make_eval_step(config: Config, graphdef: nnx.GraphDef):
    no_balancing = Balancing(())

    def eval_step(state: TrainState, batch: jax.Array) -> dict[str, jax.Array]:
        parts, stats = batch_loss(nnx.merge(graphdef, state.params, state.routing_bias), batch, config, no_balancing,
                                  with_mtp=False)
        metrics = {"lm_loss": parts.lm}
        if stats.moe_layers is not None:
            metrics["expert_load"] = stats.moe_layers.expert_load
            metrics["choice_signature"] = stats.moe_layers.choice_signature_N  # [L_moe, B*T]
        return metrics

    return eval_step
