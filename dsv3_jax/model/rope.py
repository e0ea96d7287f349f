"""Rotary position embedding with YaRN, as DeepSeek applies it to the decoupled q_R / k_R.

Legend: B batch, T tokens, H heads, R rope dim.
Pairs are interleaved: channels (2i, 2i+1) rotate together by angle pos * inv_freq[i], which is
how DeepSeek's reference implementation views the rope dims (as complex numbers).
YaRN (report §4.3; Peng et al. 2023): frequencies whose wavelength is long compared with the
original context are divided by `factor`, short ones are kept, with a linear ramp between the
dims given by beta_fast / beta_slow rotations; attention logits are scaled by mscale^2.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from dsv3_jax.config import ModelConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_position: int) -> float:
    """The rope dim index whose wavelength makes `num_rotations` turns over `max_position`."""
    return dim * math.log(max_position / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Per-pair inverse frequencies [R/2] in float64, YaRN-interpolated when yarn_factor > 1."""
    dim, base = cfg.qk_rope_dim, cfg.rope_theta
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if cfg.yarn_factor <= 1.0:
        return inv_freq
    low = max(math.floor(_correction_dim(cfg.yarn_beta_fast, dim, base, cfg.original_max_position)), 0)
    high = min(math.ceil(_correction_dim(cfg.yarn_beta_slow, dim, base, cfg.original_max_position)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    # ramp 0 (high-frequency dims): keep; ramp 1 (low-frequency dims): interpolate by factor.
    return inv_freq / cfg.yarn_factor * ramp + inv_freq * (1.0 - ramp)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under YaRN."""
    m = yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim)
    return cfg.qk_head_dim ** -0.5 * m * m


# An fp32 angle pos * inv_freq is off by up to pos * 2^-24 rad from rounding alone: 5e-3 rad
# measured at V3's 163,840-token context, which rotates q_R and k_R visibly wrong at long range (the reference
# implementations compute it that way). Instead the frequency in turns, inv_freq / 2pi, is split
# into a few parts of PART_BITS significant bits each plus a remainder; pos * part is then exact in
# fp32 for pos < 2^(24 - PART_BITS), each product is reduced mod 1 exactly (x - round(x)), and only
# the remainder's tiny product rounds. The angle is within 4e-7 rad of float64 at every position
# below 2^19 (tested up to 163,840).
PART_BITS = 5
N_EXACT_PARTS = 3


def _turn_parts(inv_freq: np.ndarray) -> np.ndarray:
    """[N_EXACT_PARTS + 1, R/2] fp32 parts summing to inv_freq / 2pi (float64 on the host)."""
    rest = inv_freq / (2 * np.pi)
    parts = []
    for _ in range(N_EXACT_PARTS):
        mantissa, exponent = np.frexp(rest)
        part = np.ldexp(np.round(mantissa * 2 ** PART_BITS), exponent - PART_BITS)  # PART_BITS significant bits
        parts.append(part)
        rest = rest - part
    return np.stack([*parts, rest]).astype(np.float32)


def rope_angles(cfg: ModelConfig, positions: Int[Array, "*P"]) -> Float[Array, "*P R_half"]:
    """pos * inv_freq reduced to [-pi, pi], in fp32 without the rounding of a plain product
    (R_half = R / 2: one angle per rotated pair)."""
    pos = positions.astype(jnp.float32)[..., None]
    turns = jnp.zeros(positions.shape + (cfg.qk_rope_dim // 2,), jnp.float32)
    for part in _turn_parts(inv_frequencies(cfg)):
        product = pos * jax.lax.broadcast_to_rank(jnp.asarray(part), pos.ndim)
        turns = turns + (product - jnp.round(product))  # each term in [-1/2, 1/2], exact
    return (turns - jnp.round(turns)) * jnp.float32(2 * np.pi)


def rope_tables(cfg: ModelConfig, positions: Int[Array, "*P"] | np.ndarray) -> tuple[Array, Array]:
    """cos/sin [*P, R/2] for the given positions (fp32).

    Positions known when tracing (a numpy array: the plain 0..T-1 of a training batch) give tables
    computed on the host in float64, which the compiled program holds as constants: computed on the
    device, XLA fuses the cos/sin into every consumer and recomputes them per head in every layer
    (on XLA:CPU about 5 ms of the `tiny` preset's ~140 ms train step).
    Under YaRN, HF also scales cos/sin by mscale(mscale)/mscale(mscale_all_dim) (1 for V2/V3).
    """
    attn_factor = yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale) / yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim)
    if isinstance(positions, np.ndarray):
        angles = positions.astype(np.float64)[..., None] * inv_frequencies(cfg)
        return (jnp.asarray((np.cos(angles) * attn_factor).astype(np.float32)),
                jnp.asarray((np.sin(angles) * attn_factor).astype(np.float32)))
    angles = rope_angles(cfg, positions)
    return jnp.cos(angles) * attn_factor, jnp.sin(angles) * attn_factor


def apply_rope(x: Float[Array, "B T ... R"], cos_TR: Array, sin_TR: Array) -> Float[Array, "B T ... R"]:
    """Rotate interleaved pairs of the last dim. cos/sin: [B or 1, T, R/2], broadcast over heads."""
    extra = x.ndim - cos_TR.ndim  # head dims between T and R
    cos = cos_TR.reshape(cos_TR.shape[:2] + (1,) * extra + cos_TR.shape[2:])
    sin = sin_TR.reshape(sin_TR.shape[:2] + (1,) * extra + sin_TR.shape[2:])
    x32 = x.astype(jnp.float32)
    x_even, x_odd = x32[..., 0::2], x32[..., 1::2]
    rot_even = x_even * cos - x_odd * sin
    rot_odd = x_even * sin + x_odd * cos
    return jnp.stack([rot_even, rot_odd], axis=-1).reshape(x.shape).astype(x.dtype)
