import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig, get_preset
from dsv3_jax.model.rope import apply_rope, inv_frequencies, rope_tables, softmax_scale


def _yarn_by_hand(dim, base, factor, original, beta_fast, beta_slow):
    """YaRN (Peng et al. 2023, as DeepSeek's reference): wavelength-based ramp between dims."""
    out = []
    # dim index d whose frequency makes r rotations over the original context:
    # original / (2 pi base^(2d/dim)) = r  =>  d = dim * ln(original / (2 pi r)) / (2 ln base)
    low = max(math.floor(dim * math.log(original / (2 * math.pi * beta_fast)) / (2 * math.log(base))), 0)
    high = min(math.ceil(dim * math.log(original / (2 * math.pi * beta_slow)) / (2 * math.log(base))), dim - 1)
    for i in range(dim // 2):
        theta = base ** (-2 * i / dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: extrapolate (keep), 1: interpolate
        out.append(theta * (1 - ramp) + theta / factor * ramp)
    return np.array(out)


def test_plain_rope_frequencies():
    cfg = ModelConfig(qk_rope_dim=16, rope_theta=10000.0)
    np.testing.assert_allclose(inv_frequencies(cfg), [10000.0 ** (-2 * i / 16) for i in range(8)], rtol=1e-12)


def test_yarn_frequencies_match_formula_for_v3():
    cfg = get_preset("deepseek-v3-671b").model
    expected = _yarn_by_hand(64, 10000.0, 40.0, 4096, 32.0, 1.0)
    np.testing.assert_allclose(inv_frequencies(cfg), expected, rtol=1e-12)
    freqs = inv_frequencies(cfg)
    plain = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    assert freqs[0] == plain[0]  # the fastest dims are untouched
    np.testing.assert_allclose(freqs[-1], plain[-1] / 40.0)  # the slowest are divided by the factor


def test_yarn_softmax_scale():
    v3 = get_preset("deepseek-v3-671b").model
    mscale = 0.1 * 1.0 * math.log(40.0) + 1.0
    assert math.isclose(softmax_scale(v3), (192 ** -0.5) * mscale ** 2, rel_tol=1e-12)
    lite = get_preset("deepseek-v2-lite").model
    mscale = 0.1 * 0.707 * math.log(40.0) + 1.0
    assert math.isclose(softmax_scale(lite), (192 ** -0.5) * mscale ** 2, rel_tol=1e-12)
    assert softmax_scale(ModelConfig(qk_nope_dim=16, qk_rope_dim=16)) == 32 ** -0.5


def test_rope_rotates_interleaved_pairs_and_is_relative():
    cfg = dataclasses.replace(ModelConfig(), qk_rope_dim=8, yarn_factor=4.0, original_max_position=32)
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 8)).astype(np.float32)

    def rotate(x, pos):
        cos, sin = rope_tables(cfg, jnp.array([[pos]]))
        return np.asarray(apply_rope(jnp.asarray(x)[None, None], cos, sin))[0, 0]

    # Pair (0, 1) at position p rotates by p * inv_freq[0] like a complex number.
    p = 3
    z = complex(q[0], q[1]) * np.exp(1j * p * inv_frequencies(cfg)[0])
    np.testing.assert_allclose(rotate(q, p)[:2], [z.real, z.imag], rtol=1e-5)
    # Norm preserved, and q.k depends only on the offset.
    np.testing.assert_allclose(np.linalg.norm(rotate(q, 7)), np.linalg.norm(q), rtol=1e-5)
    np.testing.assert_allclose(rotate(q, 9) @ rotate(k, 4), rotate(q, 25) @ rotate(k, 20), rtol=1e-4)


def test_yarn_angles_and_logits_at_long_context_match_float64():
    """V3's YaRN context reaches 163,840 tokens (report §4.3). A plain fp32 pos * inv_freq is off by
    up to 5e-3 rad there; the rope angles must stay within fp32 rounding of a float64 reference."""
    cfg = get_preset("deepseek-v3-671b").model
    positions = np.array([0, 1, 4095, 4096, 32767, 65536, 131071, 163838, 163839])
    exact = positions[:, None].astype(np.float64) * inv_frequencies(cfg)  # [P, R/2], float64
    # Traced positions (device fp32) and positions known when tracing (host float64, then constants).
    for given in (jnp.asarray(positions), positions):
        cos, sin = (np.asarray(t, np.float64) for t in rope_tables(cfg, given))
        np.testing.assert_allclose(cos, np.cos(exact), atol=2e-6)
        np.testing.assert_allclose(sin, np.sin(exact), atol=2e-6)

    # Attention logits q_R . k_R between far-apart positions, through apply_rope, against numpy.
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, len(positions), cfg.qk_rope_dim))

    def rotate64(x, angles):
        z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles)
        return np.stack([z.real, z.imag], -1).reshape(x.shape)

    def rotate32(x):
        cos, sin = rope_tables(cfg, jnp.asarray(positions)[None])
        return np.asarray(apply_rope(jnp.asarray(x, jnp.float32)[None], cos, sin)[0], np.float64)

    want = rotate64(q, exact) @ rotate64(k, exact).T * softmax_scale(cfg)
    got = rotate32(q) @ rotate32(k).T * softmax_scale(cfg)
    scale = np.linalg.norm(q, axis=1)[:, None] * np.linalg.norm(k, axis=1)[None] * softmax_scale(cfg)
    assert np.abs(got - want).max() / scale.max() < 1e-5
