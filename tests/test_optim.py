import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dsv3_jax.config import TrainConfig
from dsv3_jax.model.model import DeepSeekV3
from dsv3_jax.model.routing import RoutingBias
from dsv3_jax.train.optim import clip_by_global_norm, decay_mask, lr_schedule
from tests.conftest import tiny_model_config


def test_schedule_warmup_constant_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, decay_start_fraction=0.5, min_lr_ratio=0.1)
    lr = lr_schedule(cfg)
    np.testing.assert_allclose([lr(s) for s in (0, 4, 9)], [0.1, 0.5, 1.0], rtol=1e-6)  # linear warmup
    np.testing.assert_allclose([lr(s) for s in (10, 30, 49)], 1.0)  # constant
    np.testing.assert_allclose(lr(75), 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)), rtol=1e-6)  # cosine
    np.testing.assert_allclose(lr(100), 0.1, rtol=1e-6)
    values = [float(lr(s)) for s in range(50, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_weight_decay_only_on_matrices_and_bias_is_not_optimised():
    model = DeepSeekV3(tiny_model_config(), nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    mask = nnx.to_flat_state(decay_mask(params))
    by_name = {"/".join(map(str, p)): bool(v) for p, v in mask}
    assert by_name["moe_layers/ffn/w_gate_EDF"] and by_name["embed/table_VD"] and by_name["head/kernel"]
    assert not by_name["moe_layers/attn_norm/scale"] and not by_name["final_norm/scale"]
    assert not any("bias_E" in name for name in by_name)
    assert nnx.to_flat_state(nnx.state(model, RoutingBias))  # it exists, outside the Params


def test_clip_by_global_norm_equals_optax_with_or_without_a_given_norm():
    """The clip that takes the train step's gradient norm clips as optax does (same empty state)."""
    grads = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([-4.0, 0.5])}
    for max_norm in (100.0, 2.0):  # not clipped, clipped (the norm is 8.5)
        want, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
        ours = clip_by_global_norm(max_norm)
        for given in (None, optax.tree.norm(grads)):
            got, state = ours.update(grads, ours.init(grads), grad_norm=given)
            assert state == optax.clip_by_global_norm(max_norm).init(grads)
            for key in grads:
                np.testing.assert_allclose(got[key], want[key], rtol=1e-6)
