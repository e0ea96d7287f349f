import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import TrainConfig
from dsv3_jax.model.model import ModelStats
from dsv3_jax.model.routing import Balancing, RouterStats
from dsv3_jax.train.loss import cross_entropy, mtp_targets, total_loss
from tests.conftest import tiny_model_config


def test_mtp_depth_k_targets_are_tokens_t_plus_k_plus_1():
    tokens = jnp.arange(100, 110)[None]  # S = 10, T = 9
    labels, mask = mtp_targets(tokens, depth=3)
    assert labels.shape == mask.shape == (3, 1, 9)
    for k in (1, 2, 3):
        for i in range(9):
            if i + k + 1 <= 9:
                assert bool(mask[k - 1, 0, i]) and int(labels[k - 1, 0, i]) == 100 + i + k + 1
            else:
                assert not bool(mask[k - 1, 0, i])
    assert int(mask[0].sum()) == 8 and int(mask[2].sum()) == 6


def test_cross_entropy_matches_numpy():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11))
    labels = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    lp = np.asarray(jax.nn.log_softmax(logits, -1))
    nll = -np.take_along_axis(lp, np.asarray(labels)[..., None], -1)[..., 0]
    np.testing.assert_allclose(cross_entropy(logits, labels, mask), (nll * mask).sum() / 8, rtol=1e-6)


def test_total_loss_combines_parts_as_eq_25_and_17():
    tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, 13)
    logits = jax.random.normal(jax.random.key(3), (2, 6, 13))
    mtp_logits = jax.random.normal(jax.random.key(4), (2, 2, 6, 13))
    moe = RouterStats(jnp.ones((2, 4)), jnp.zeros(2), jnp.zeros(2), jnp.zeros(2),
                      {"sequence_loss": jnp.array([1.0, 2.0]), "z_loss": jnp.array([4.0, 4.0])}, jnp.zeros((2, 3), jnp.uint32))
    mtp = RouterStats(jnp.ones((1, 4)), jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), {"sequence_loss": jnp.array([0.5])},
                      jnp.zeros((1, 3), jnp.uint32))
    balancing = Balancing.from_config(tiny_model_config(balancer="sequence_loss+z_loss"),
                                      TrainConfig(balance_alpha=0.01, z_loss_coef=0.5))
    parts = total_loss(logits, mtp_logits, ModelStats(moe, mtp), tokens, mtp_lambda=0.3, balancing=balancing)
    labels, mask = mtp_targets(tokens, 2)
    l1 = cross_entropy(mtp_logits[0], labels[0], mask[0])
    l2 = cross_entropy(mtp_logits[1], labels[1], mask[1])
    np.testing.assert_allclose(parts.mtp, (l1 + l2) / 2, rtol=1e-6)
    np.testing.assert_allclose(parts.balance, 0.01 * 3.5 + 0.5 * 8.0, rtol=1e-6)
    np.testing.assert_allclose(parts.total, parts.lm + 0.3 * parts.mtp + 0.01 * 3.5 + 4.0, rtol=1e-6)
