"""AdamW (report §4.2: betas 0.9/0.95, weight decay 0.1, clip 1.0) and the LR schedule.

Weight decay applies to matrices only (ndim >= 2 per layer: stacked layers add one axis, so
we look at the `logical_axes` length minus a leading "layers" / "stage_layers"). Only Params reach the optimizer;
the routing bias is a separate Variable type and never does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsv3_jax.config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup -> constant -> cosine decay to lr * min_lr_ratio at the last step (report §4.2)."""
    decay_start = max(cfg.warmup_steps, int(cfg.steps * cfg.decay_start_fraction))
    decay_steps = max(cfg.steps - decay_start, 1)
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * jnp.minimum((step + 1) / max(cfg.warmup_steps, 1), 1.0)
        progress = jnp.clip((step - decay_start) / decay_steps, 0.0, 1.0)
        cosine = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < decay_start, warm, cosine)

    return schedule


def decay_mask(params: nnx.State) -> nnx.State:
    """True for weight matrices (per layer), False for norms' scales and other vectors."""
    def is_matrix(variable):
        axes = variable.get_metadata().get("logical_axes", ())
        per_layer = len(axes) - (1 if axes and axes[0] in ("layers", "stage_layers") else 0)
        return per_layer >= 2

    return jax.tree.map(is_matrix, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """optax.clip_by_global_norm (the same empty state, so checkpoints are unchanged) that takes the
    gradients' norm when the train step has it already (`update(..., grad_norm=)`): one pass over
    the gradients instead of two (in a profile of the `small` train step on XLA:CPU each such pass
    took ~90 ms of ~2.6 s)."""
    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: TrainConfig, params: nnx.State) -> optax.GradientTransformationExtraArgs:
    return optax.chain(
        clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                    mask=decay_mask(params), mu_dtype=jnp.bfloat16 if cfg.bf16_moments else None),
    )
