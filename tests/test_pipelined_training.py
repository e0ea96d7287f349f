"""The MoE stack run through a pipeline schedule (train/pipelined.py) gives the unpipelined train step:
loss parts, expert loads, biases, gradients (DualPipeV, MTP included); bad pipeline configs are refused.
Every schedule on composed meshes: test_pipelined_composed.py."""

import dataclasses

import jax
import numpy as np
import pytest

from dsv3_jax.config import Config, ConfigError, MeshConfig, TrainConfig
from dsv3_jax.parallel.mesh import make_mesh
from dsv3_jax.train.state import create_train_state
from dsv3_jax.train.step import make_loss_and_grads
from dsv3_jax.validate import validate
from tests.conftest import need_devices, tiny_model_config

pytestmark = pytest.mark.multidevice


@pytest.fixture(scope="module")
def reference():
    model = tiny_model_config(n_layers=5, first_k_dense=1, mtp_depth=1)  # 4 MoE layers
    config = Config(model=model, train=TrainConfig(batch_size=8, seq_len=16, warmup_steps=1, microbatches=4))
    graphdef, optimizer, state = create_train_state(config, 0)
    tokens = jax.random.randint(jax.random.key(0), (8, 17), 0, model.vocab_size)
    return config, graphdef, optimizer, state, tokens


@pytest.fixture(scope="module")
def unpipelined_grads(reference):
    """((loss, (LossParts, ModelStats)), gradients) of the unpipelined step's own loss function,
    compiled once for the module."""
    config, graphdef, _, state, tokens = reference
    return jax.jit(make_loss_and_grads(config, graphdef))(state.params, state.routing_bias, tokens)


def _pipelined(config, schedule):
    return dataclasses.replace(config, mesh=MeshConfig(pipeline=2),
                               train=dataclasses.replace(config.train, pipeline_schedule=schedule))


def test_pipelined_loss_and_gradients_equal_unpipelined(reference, unpipelined_grads):
    """What the train step differentiates (make_loss_and_grads), through DualPipeV: every loss part,
    every layer's expert loads and router statistics (which the bias update reads) and every element
    of every gradient leaf, before clipping and AdamW. (The step after it is the unpipelined code;
    `dsv3 train` runs it pipelined in tests/test_pipelined_cli.py.)"""
    need_devices(2)
    config, graphdef, _, state, tokens = reference
    config = _pipelined(config, "dualpipev")  # 4 stages on 2 ranks in a V
    (loss, (parts, stats)), grads = jax.jit(make_loss_and_grads(config, graphdef, pipeline_mesh=make_mesh(config.mesh)))(
        state.params, state.routing_bias, tokens)
    (want_loss, (want_parts, want_stats)), want_grads = unpipelined_grads
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for field in parts._fields:
        np.testing.assert_allclose(getattr(parts, field), getattr(want_parts, field), rtol=1e-4, err_msg=field)
    for stack in ("moe_layers", "mtp"):  # loads per layer and expert; entropy, drops, balance losses
        got_s, want_s = getattr(stats, stack)._replace(choice_signature_N=0), getattr(want_stats, stack)._replace(
            choice_signature_N=0)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=stack), got_s, want_s)
    scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(want_grads))  # numpy: no compile per leaf
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale), grads, want_grads)


def test_a_pipeline_with_chunked_cross_entropy_has_the_unchunked_unpipelined_gradients(reference, unpipelined_grads):
    """train.ce_chunk on the last stage's head (train/pipelined.py): 1F1B over pipeline=2 with the
    loss computed 4 positions of logits at a time gives the plain step's loss and gradients."""
    need_devices(2)
    config, graphdef, _, state, tokens = reference
    config = _pipelined(config, "1f1b")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, ce_chunk=4))
    (loss, _), grads = jax.jit(make_loss_and_grads(config, graphdef, pipeline_mesh=make_mesh(config.mesh)))(
        state.params, state.routing_bias, tokens)
    (want_loss, _), want_grads = unpipelined_grads
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(want_grads))  # numpy: no compile per leaf
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale), grads, want_grads)


def test_pipeline_config_errors():
    model = tiny_model_config(n_layers=4, first_k_dense=1)  # 3 MoE layers
    with pytest.raises(ConfigError, match="3 MoE layers must split into 2 equal pipeline stages"):
        validate(Config(model=model, train=TrainConfig(batch_size=8, seq_len=16, microbatches=4),
                        mesh=MeshConfig(pipeline=2)))
    with pytest.raises(ConfigError, match="train.batch_size=6 must be divisible by train.microbatches=4"):
        validate(Config(model=tiny_model_config(n_layers=5), train=TrainConfig(batch_size=6, seq_len=16, microbatches=4),
                        mesh=MeshConfig(pipeline=2)))
    with pytest.raises(ConfigError, match="micro-batch of .* = 2 rows must split over the 4 batch shards"):
        validate(Config(model=tiny_model_config(n_layers=5), train=TrainConfig(batch_size=8, seq_len=16, microbatches=4),
                        mesh=MeshConfig(pipeline=2, data=2, expert=2)))
    dualpipe = lambda **train: TrainConfig(seq_len=16, pipeline_schedule="dualpipe", **train)
    with pytest.raises(ConfigError, match="dualpipe needs an even number of ranks"):
        validate(Config(model=tiny_model_config(n_layers=7), train=dualpipe(batch_size=6, microbatches=6),
                        mesh=MeshConfig(pipeline=3)))
    with pytest.raises(ConfigError, match="dualpipe needs at least 4 micro-batches for 2 ranks"):
        validate(Config(model=tiny_model_config(n_layers=5), train=dualpipe(batch_size=8, microbatches=2),
                        mesh=MeshConfig(pipeline=2)))
