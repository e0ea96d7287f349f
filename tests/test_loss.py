import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import Config, TrainConfig
from dsv3_jax.model.model import ModelStats
from dsv3_jax.model.routing import Balancing, RouterStats
from dsv3_jax.train.loss import chunked_cross_entropy, cross_entropy, mtp_targets, total_loss
from dsv3_jax.train.state import create_train_state
from dsv3_jax.train.step import make_loss_and_grads
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


def test_chunked_cross_entropy_is_the_cross_entropy_of_the_heads_logits():
    """Values and gradients (hidden states and head weight) of the chunked CE equal the plain CE of
    the full logits, with a mask, at every chunk size that divides T."""
    h_BTD = jax.random.normal(jax.random.key(0), (2, 8, 6))
    w_DV = jax.random.normal(jax.random.key(1), (6, 13))
    labels_BT = jax.random.randint(jax.random.key(2), (2, 8), 0, 13)
    mask_BT = jnp.arange(8)[None, :] < jnp.array([[5], [8]])
    plain = lambda h, w: cross_entropy(h @ w, labels_BT, mask_BT)
    want, want_grads = jax.value_and_grad(plain, argnums=(0, 1))(h_BTD, w_DV)
    for chunk in (1, 2, 4, 8):
        chunked = lambda h, w: chunked_cross_entropy(lambda x: x @ w, h, labels_BT, mask_BT, chunk)
        got, got_grads = jax.value_and_grad(chunked, argnums=(0, 1))(h_BTD, w_DV)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        for g, w in zip(got_grads, want_grads):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="must divide"):
        chunked_cross_entropy(lambda x: x @ w_DV, h_BTD, labels_BT, mask_BT, 3)


def _loss_and_grads(ce_chunk: int, vocab: int = 97, mtp_depth: int = 1):
    config = Config(model=tiny_model_config(vocab_size=vocab, mtp_depth=mtp_depth),
                    train=TrainConfig(batch_size=4, seq_len=32, ce_chunk=ce_chunk))
    graphdef, _, state = create_train_state(config, 0)
    tokens = jax.random.randint(jax.random.key(3), (4, 33), 0, vocab)
    fn = jax.jit(make_loss_and_grads(config, graphdef))
    return fn, (state.params, state.routing_bias, tokens)


def test_train_ce_chunk_gives_the_same_loss_parts_and_gradients_without_the_logits_in_memory():
    """train.ce_chunk: the train step's loss parts (main and MTP heads) and every gradient equal the
    unchunked step's; with a vocabulary large enough for the logits to dominate, the compiled
    step's temporaries shrink (planted: the chunk body without jax.checkpoint keeps every chunk's
    logits for the backward, so nothing is saved, and the ratio check fails)."""
    (fn0, args0), (fn8, args8) = _loss_and_grads(0), _loss_and_grads(8)
    ((_, (want, _)), want_grads), ((_, (got, _)), got_grads) = fn0(*args0), fn8(*args8)
    for field in ("total", "lm", "mtp", "balance"):
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-6, err_msg=field)
    scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(want_grads))  # numpy: no compile per leaf
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale), got_grads, want_grads)
    # Memory: V = 8192 at d_model 32 makes the [B, T, V] fp32 logits (4 MiB each, with their softmax
    # and gradient) most of the step; ce_chunk=4 keeps 1/8 of a sequence's logits at a time.
    temps = {c: (lambda fn, args: fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)(
        *_loss_and_grads(c, vocab=8192, mtp_depth=0)) for c in (0, 4)}
    assert temps[4] < 0.5 * temps[0], temps
