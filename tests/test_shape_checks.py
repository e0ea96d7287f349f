"""The suite runs with its shape annotations checked (tests/conftest.py, dsv3_jax/__init__.py):
jaxtyping + beartype on every function of the package, and implicit rank promotion raising. These
tests show the checks are on and catch what they are for."""

import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jaxtyping import TypeCheckError

from conftest import tiny_model_config
from dsv3_jax.model.layers import RMSNorm
from dsv3_jax.model.model import DeepSeekV3
from dsv3_jax.model.rope import rope_angles


@pytest.fixture(scope="module")
def model():
    return DeepSeekV3(tiny_model_config(mtp_depth=1), nnx.Rngs(0))


def test_the_checks_are_on():
    assert os.environ["DSV3_CHECK_SHAPES"] == "1"
    assert jax.config.jax_numpy_rank_promotion == "raise"
    with pytest.raises(ValueError, match="rank_promotion"):
        jnp.ones((2, 3)) + jnp.ones((3,))


def test_a_wrong_rank_dtype_or_dim_into_the_model_fails_its_annotation(model):
    tokens_BT = jnp.zeros((2, 8), jnp.int32)
    assert model(tokens_BT).logits_BTV.shape == (2, 8, model.cfg.vocab_size)
    with pytest.raises(TypeCheckError, match="tokens_BT"):  # rank 3 where "B T" is declared
        model(tokens_BT[..., None])
    with pytest.raises(TypeCheckError, match="tokens_BT"):  # floats where Int[...] is declared
        model(tokens_BT.astype(jnp.float32))
    with pytest.raises(TypeCheckError, match="positions_BT"):  # T=9 positions for T=8 tokens
        model(tokens_BT, positions_BT=jnp.zeros((2, 9), jnp.int32))
    with pytest.raises(TypeCheckError):  # inside jit: checked on the tracers, once per trace
        jax.jit(lambda t: model(t).logits_BTV)(tokens_BT[..., None])


def test_layers_check_their_dtypes_and_ranks():
    cfg = tiny_model_config()
    norm = RMSNorm(cfg.d_model, cfg.norm_eps, "norm", "float32")
    assert norm(jnp.ones((2, 3, cfg.d_model))).shape == (2, 3, cfg.d_model)
    with pytest.raises(TypeCheckError):  # Float[Array, "... D"]: integers are refused
        norm(jnp.ones((2, 3, cfg.d_model), jnp.int32))
    assert rope_angles(cfg, jnp.arange(5)).shape == (5, cfg.qk_rope_dim // 2)
    with pytest.raises(TypeCheckError, match="positions"):
        rope_angles(cfg, jnp.arange(5.0))
