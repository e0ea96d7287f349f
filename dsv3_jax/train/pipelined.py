"""DeepSeek-V3's loss and gradients through a pipeline schedule (report §3.2.1).

The MoE stack is the pipeline: its L layers are cut into S equal stages (S = P ranks, 2P for
DualPipeV) run by `parallel/pipeline/executor.py`. The stack is stored stage-owned (its "stage_layers"
axis is sharded over `pipeline`, so each rank keeps, updates and checkpoints 1/P of it and of its
optimizer state), and data / fsdp / tensor / expert parallelism work inside each stage as they do
without a pipeline (a micro-batch's rows split over the batch axes, experts over `expert`). The
first stage embeds each micro-batch's tokens and runs the dense layers (V3 has 3 of 61) before its
MoE layers, and hands their gradients back to their parameters; the last stage closes each
micro-batch with the final norm, the output head and the MTP modules. Those parameters (embedding,
dense layers, head, MTP) are stored split over the pipeline ranks at rest (their embed dim, as fsdp
splits it: parallel/sharding.py) and gathered for the step, which hands each rank back its slice of
their summed gradients.

The result has the unpipelined step's form: ((total loss, (LossParts, stats)), grads), so the
optimizer, bias update and metrics of `train/step.py` run unchanged. Losses are means over
micro-batches of equal size, hence equal to the full-batch means; balance losses that are means
over sequences or tokens (the default `sequence_loss`, `z_loss`) are exactly the full-batch ones,
a batch-global `aux_loss` is computed per micro-batch (as in any pipelined trainer).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.config import Config, ConfigError
from dsv3_jax.model.block import Block, run_blocks
from dsv3_jax.model.remat import rematerialised
from dsv3_jax.model.model import ModelStats
from dsv3_jax.model.rope import rope_tables
from dsv3_jax.model.routing import Balancing, RouterStats
from dsv3_jax.parallel.pipeline.executor import StageLayers, pipeline_value_and_grad
from dsv3_jax.parallel.pipeline.schedules import make_schedule
from dsv3_jax.parallel.sharding import constrain, rules_for
from dsv3_jax.train.loss import LossParts, total_loss


def check_pipeline_config(config: Config) -> int:
    """Number of stages; ConfigError naming what does not fit."""
    P, cfg, tc = config.mesh.pipeline, config.model, config.train
    n_mb = tc.microbatches
    if cfg.router == "hash":
        raise ConfigError("mesh.pipeline > 1 needs a router that does not read token ids (not model.router=hash)")
    n_stages = 2 * P if tc.pipeline_schedule == "dualpipev" else P
    if cfg.n_moe_layers % n_stages:
        raise ConfigError(f"model.n_layers - model.first_k_dense = {cfg.n_moe_layers} MoE layers must split into "
                          f"{n_stages} equal pipeline stages ({tc.pipeline_schedule}, mesh.pipeline={P})")
    if tc.batch_size % n_mb:
        raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible by train.microbatches={n_mb}")
    shards = rules_for(config).shards("batch", config.mesh.sizes())
    if (tc.batch_size // n_mb) % shards:
        raise ConfigError(f"a micro-batch of train.batch_size / train.microbatches = {tc.batch_size // n_mb} rows "
                          f"must split over the {shards} batch shards (mesh.data x fsdp x expert) inside each "
                          f"pipeline stage: make train.batch_size a multiple of {n_mb * shards}")
    try:
        make_schedule(tc.pipeline_schedule, P, n_mb)  # its own checks (e.g. DualPipe's micro-batches)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return n_stages


class HeadStats(NamedTuple):
    """What the last stage reports per micro-batch (summed over micro-batches by the executor)."""
    parts: LossParts  # each already divided by the number of micro-batches
    mtp: RouterStats | None


def layer_layout(stack):
    """tree -> tree constrained as one layer of `stack` is (its Variables' logical axes after the
    layer axis), for trees of `stack`'s structure with two leading axes (the stages a pipeline rank
    runs, and their layers), inside the pipeline's shard_map: routed experts stay split over
    `expert` there, as at rest (report §3.2.2: expert weights are never gathered)."""
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    axes = [tuple(v.get_metadata().get("logical_axes") or ()) for v in jax.tree.leaves(stack, is_leaf=is_variable)]

    def layout(tree):
        leaves, treedef = jax.tree.flatten(tree)
        return treedef.unflatten([constrain(x, (None, None) + a[1:]) if a else x for x, a in zip(leaves, axes)])

    return layout


def make_pipelined_loss_and_grads(config: Config, graphdef: nnx.GraphDef, mesh, balancing: Balancing):
    """(params, routing_bias, tokens_BS) -> ((total, (LossParts, ModelStats)), grads), pipelined over `mesh`."""
    cfg, tc = config.model, config.train
    n_stages, n_mb = check_pipeline_config(config), tc.microbatches
    schedule = make_schedule(tc.pipeline_schedule, config.mesh.pipeline, n_mb)

    def loss_and_grads(params, routing_bias, tokens_BS):
        B, S = tokens_BS.shape
        T, b = S - 1, B // n_mb
        cos, sin = rope_tables(cfg, np.arange(T)[None])

        # The model's own pieces: `embed_and_dense` on the first stage, the MoE stack in stages, and
        # `head_and_mtp` on the last stage, each from a model merged without the stages' weights.
        stack_graphdef, stack_params, stack_bias = nnx.split(nnx.merge(graphdef, params, routing_bias).moe_layers,
                                                             nnx.Param, ...)
        rest = nnx.State({k: v for k, v in params.raw_mapping.items() if k != "moe_layers"})
        abstract_stack = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params["moe_layers"])
        model_without_stack = lambda rest: nnx.merge(graphdef, nnx.State({**rest, "moe_layers": abstract_stack}),
                                                     routing_bias)

        # The MoE stack as S stages of L/S layers: leaves [L, ...] -> [S, L/S, ...].
        to_stages = lambda tree: jax.tree.map(lambda a: a.reshape((n_stages, -1) + a.shape[1:]), tree)
        from_stages = lambda tree: jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), tree)

        def first_fn(rest, tokens_bS):  # per micro-batch, on the first stage's rank
            return model_without_stack(rest).embed_and_dense(tokens_bS[:, :-1], cos, sin)

        def finish_fn(stats):  # a stage's loss and stats from its layers' stats (summed over micro-batches)
            return balancing.loss(stats) / n_mb, stats.without_tokens()

        def stage_fn(stage, x_bTD):
            y_bTD, stats = run_blocks(nnx.merge(stack_graphdef, *stage), x_bTD, cos, sin, cfg)
            return y_bTD, *finish_fn(stats)

        # The pair's lockstep runs a stage phase by phase (executor.StageLayers): the MoE block's four
        # phases when its routed experts run the "a2a" transport under an expert mesh, else whole blocks.
        block = lambda layer: nnx.merge(stack_graphdef, *layer)  # noqa: E731
        if block(jax.tree.map(lambda a: a[0], (stack_params, stack_bias))).phased():
            _, *rest_phases = Block.PHASES
            phases = [lambda layer, x_bTD: block(layer).attend_and_send(x_bTD, cos, sin)]
            phases += [lambda layer, carry, name=name: getattr(block(layer), name)(carry) for name in rest_phases]
        else:
            phases = [lambda layer, x_bTD: block(layer)(x_bTD, cos, sin)]
        phases = tuple(rematerialised(phase, cfg.remat) for phase in phases)

        def loss_fn(rest, y_bTD, tokens_bS):
            model = model_without_stack(rest)
            if tc.ce_chunk:  # the loss from the head's inputs, ce_chunk positions of logits at a time
                h_bTD, mtp_h, mtp_stats = model.head_inputs_and_mtp(y_bTD, tokens_bS[:, :-1], cos, sin)
                parts = total_loss(h_bTD, mtp_h, ModelStats(None, mtp_stats), tokens_bS, tc.mtp_lambda, balancing,
                                   head=model.logits, chunk=tc.ce_chunk)
            else:
                logits, mtp_logits, mtp_stats = model.head_and_mtp(y_bTD, tokens_bS[:, :-1], cos, sin)
                parts = total_loss(logits, mtp_logits, ModelStats(None, mtp_stats), tokens_bS, tc.mtp_lambda,
                                   balancing)
            return parts.total / n_mb, HeadStats(jax.tree.map(lambda x: x / n_mb, parts),
                                                 None if mtp_stats is None else mtp_stats.without_tokens())

        # Micro-batch m is rows m, m + n_mb, ...: each data rank's block of rows then holds b / shards
        # rows of every micro-batch (the split stays on the rows, never on the micro-batch index).
        split_mb = lambda a: jnp.swapaxes(a.reshape((b, n_mb) + a.shape[1:]), 0, 1)
        tokens_MbS = split_mb(tokens_BS)
        result = pipeline_value_and_grad(stage_fn, loss_fn, schedule, mesh, to_stages((stack_params, stack_bias)),
                                         rest, tokens_MbS, tokens_MbS, first_fn=first_fn,
                                         keep_residuals=tc.pipeline_keep_residuals,
                                         stage_layout=layer_layout((stack_params, stack_bias)),
                                         stage_layers=StageLayers(phases, finish_fn))

        # Gradients: the stack from its stages; everything else (embedding and dense layers on the
        # first stage, head and MTP on the last) from the executor's head gradients.
        grads = nnx.State({**result.head_grads.raw_mapping, "moe_layers": from_stages(result.stage_grads[0])})
        grads = jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(grads))  # params' node types

        # Statistics with the unpipelined step's meaning: loads summed over micro-batches, means averaged.
        moe_stats = from_stages(result.stage_stats).summed_to_mean(n_mb)
        head = result.head_stats
        mtp_stats = None if head.mtp is None else head.mtp.summed_to_mean(n_mb)
        parts = head.parts._replace(total=result.loss, balance=balancing.loss(moe_stats) + head.parts.balance)
        return (result.loss, (parts, ModelStats(moe_stats, mtp_stats))), grads

    return loss_and_grads
