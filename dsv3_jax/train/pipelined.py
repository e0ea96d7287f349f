"""DeepSeek-V3's loss and gradients through a pipeline schedule (report §3.2.1).

The MoE stack is the pipeline: its L layers are cut into S equal stages (S = P ranks, 2P for
DualPipeV) run by `parallel/pipeline/executor.py`. Before it, the embedding and the dense layers
run on every pipeline rank (few and cheap: V3 has 3 dense layers of 61); after it, the last stage
closes each micro-batch with the final norm, the output head and the MTP modules. The input
gradient the pipeline hands back continues into the dense layers and the embedding by `jax.vjp`.

The result has the unpipelined step's form: ((total loss, (LossParts, stats)), grads), so the
optimizer, bias update and metrics of `train/step.py` run unchanged. Losses are means over
micro-batches of equal size, hence equal to the full-batch means; balance losses that are means
over sequences or tokens (the default `sequence_loss`, `z_loss`) are exactly the full-batch ones,
a batch-global `aux_loss` is computed per micro-batch (as in any pipelined trainer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import Config
from dsv3_jax.model.block import run_blocks, scan_stack
from dsv3_jax.model.mtp import tokens_ahead
from dsv3_jax.model.rope import rope_tables
from dsv3_jax.parallel.pipeline.executor import pipeline_value_and_grad
from dsv3_jax.parallel.pipeline.schedules import make_schedule
from dsv3_jax.train.loss import LossParts, aux_loss, total_loss

HEAD_MODULES = ("embed", "final_norm", "head", "mtp")  # what the last stage needs


def check_pipeline_config(config: Config) -> int:
    """Number of stages; raises ValueError naming what does not fit."""
    P, cfg, n_mb = config.mesh.pipeline, config.model, config.train.microbatches
    n_stages = 2 * P if config.train.pipeline_schedule == "dualpipev" else P
    if cfg.n_moe_layers % n_stages:
        raise ValueError(f"model.n_layers - model.first_k_dense = {cfg.n_moe_layers} MoE layers must split into "
                         f"{n_stages} equal pipeline stages ({config.train.pipeline_schedule}, mesh.pipeline={P})")
    if config.train.batch_size % n_mb:
        raise ValueError(f"train.batch_size={config.train.batch_size} must be divisible by "
                         f"train.microbatches={n_mb}")
    make_schedule(config.train.pipeline_schedule, P, n_mb)  # its own checks (e.g. DualPipe's micro-batches)
    return n_stages


def make_pipelined_loss_and_grads(config: Config, graphdef: nnx.GraphDef, mesh, aux_weights: dict[str, float]):
    """(params, routing_bias, tokens_BS) -> ((total, (LossParts, stats)), grads), pipelined over `mesh`."""
    cfg, tc = config.model, config.train
    n_stages, n_mb = check_pipeline_config(config), tc.microbatches
    schedule = make_schedule(tc.pipeline_schedule, config.mesh.pipeline, n_mb)

    def loss_and_grads(params, routing_bias, tokens_BS):
        model = nnx.merge(graphdef, params, routing_bias)
        B, S = tokens_BS.shape
        tokens_BT = tokens_BS[:, :-1]
        T, b = S - 1, B // n_mb
        cos, sin = rope_tables(cfg, jnp.broadcast_to(jnp.arange(T), (b, T)))
        cos_full, sin_full = rope_tables(cfg, jnp.broadcast_to(jnp.arange(T), (B, T)))

        def before_pipeline(params):  # embedding + dense layers, on every pipeline rank
            m = nnx.merge(graphdef, params, routing_bias)
            h_BTD = m.embed(tokens_BT)
            if m.dense_layers is not None:
                h_BTD, _ = run_blocks(m.dense_layers, h_BTD, cos_full, sin_full, cfg.remat)
            return h_BTD

        h_BTD, back_to_embedding = jax.vjp(before_pipeline, params)

        # The MoE stack as S stages of L/S layers: leaves [L, ...] -> [S, L/S, ...].
        stack_graphdef, stack_params, stack_bias = nnx.split(model.moe_layers, nnx.Param, ...)
        to_stages = lambda tree: jax.tree.map(lambda a: a.reshape((n_stages, -1) + a.shape[1:]), tree)

        def stage_fn(stage, x_bTD):
            y_bTD, stats = run_blocks(nnx.merge(stack_graphdef, *stage), x_bTD, cos, sin, cfg.remat)
            return y_bTD, aux_loss(stats, aux_weights) / n_mb, stats

        head_defs, head_states = {}, {}
        for name in HEAD_MODULES:
            if getattr(model, name) is not None:
                head_defs[name], head_states[name] = nnx.split(getattr(model, name))

        def loss_fn(head_states, y_bTD, tokens_bS):
            m = {name: nnx.merge(head_defs[name], state) for name, state in head_states.items()}
            logits_bTV = m["head"](m["final_norm"](y_bTD)).astype(jnp.float32)
            mtp_logits, stats = None, {}
            if "mtp" in m:
                def depth_step(module, h_prev, ahead_bT):
                    h_next, h_normed, layer_stats = module(h_prev, m["embed"](ahead_bT), cos, sin, ahead_bT)
                    return h_next, (h_normed, layer_stats)

                ahead_PbT = tokens_ahead(tokens_bS[:, :-1], cfg.mtp_depth)
                _, (h_normed_PbTD, mtp_stats) = scan_stack(m["mtp"], depth_step, y_bTD, ahead_PbT, cfg.remat)
                mtp_logits = m["head"](h_normed_PbTD).astype(jnp.float32)
                stats = {f"mtp_{k}": v for k, v in mtp_stats.items()}
            parts = total_loss(logits_bTV, mtp_logits, stats, tokens_bS, tc.mtp_lambda, aux_weights)
            return parts.total / n_mb, {**stats, "lm": parts.lm, "mtp": parts.mtp, "balance": parts.balance}

        split_mb = lambda a: a.reshape((n_mb, b) + a.shape[1:])
        result = pipeline_value_and_grad(stage_fn, loss_fn, schedule, mesh, to_stages((stack_params, stack_bias)),
                                          head_states, split_mb(h_BTD), split_mb(tokens_BS))

        # Gradients: embedding + dense (through the pipeline's input gradient), the MoE stack, the head side.
        (grads,) = back_to_embedding(result.dx_MA.reshape(h_BTD.shape))
        from_stages = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), result.stage_grads[0])
        grads["moe_layers"] = from_stages
        for name, state in result.head_grads.items():
            head_params = nnx.split(nnx.merge(head_defs[name], state), nnx.Param, ...)[1]
            grads[name] = jax.tree.map(jnp.add, grads[name], head_params)

        # Statistics with the unpipelined step's meaning: loads summed, means averaged.
        per_layer = {k: v.reshape((-1,) + v.shape[2:]) for k, v in result.stage_stats.items()}
        mean_or_sum = lambda k, v: v if k.endswith("expert_load") else v / n_mb
        stats = {k: mean_or_sum(k, v) for k, v in {**per_layer, **result.head_stats}.items()
                 if k not in ("lm", "mtp", "balance")}
        head = result.head_stats
        main_stack = {k: v for k, v in stats.items() if not k.startswith("mtp_")}
        balance = aux_loss(main_stack, aux_weights) + head["balance"] / n_mb
        parts = LossParts(result.loss, head["lm"] / n_mb, head["mtp"] / n_mb, balance)
        return (result.loss, (parts, stats)), grads

    return loss_and_grads
