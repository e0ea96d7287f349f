"""Basic layers: RMSNorm, Embed, Linear, SwiGLU MLP, and the attention mask / softmax all attentions share.

Legend: B batch, T tokens, D model dim, F ffn dim, V vocab.
Weights are fp32 (or `param_dtype`) masters declared with logical axis names; they are cast to
the compute dtype at use. `parallel/mesh.py` maps logical names to mesh axes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.remat import name
from dsv3_jax.quant.fp8 import fp8_matmul


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float,
          dtype: jnp.dtype) -> nnx.Param:
    """A normal(0, std) weight tagged with its logical axes (one name per dimension)."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axis_name: str = "norm", dtype: str = "float32"):
        self.scale = nnx.Param(jnp.ones((dim,), dtype_of(dtype)), logical_axes=(axis_name,))
        self.eps = eps

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        # Normalise in fp32 whatever the compute dtype, then cast back.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = jax.lax.broadcast_to_rank(self.scale[...].astype(jnp.float32), x32.ndim)
        return name((x32 * scale).astype(x.dtype), "norm")


class Embed(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.table_VD = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std,
                              dtype_of(cfg.param_dtype))
        self.dtype = dtype_of(cfg.dtype)

    def __call__(self, tokens_BT: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        return jnp.take(self.table_VD[...], tokens_BT, axis=0).astype(self.dtype)


class Linear(nnx.Module):
    """y = x @ W with W of shape `in_shape + out_shape` (multi-dim in/out, e.g. heads).

    With `cfg.fp8` (and `fp8=True`, the default) the product runs as a block-scaled FP8 GEMM in
    forward and backward (dsv3_jax/quant/fp8.py); the output head passes `fp8=False` (§3.3.1), and
    the Linear after attention `cache_fp8=False` (its input kept in bf16, §3.3.4).
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], axes: tuple[str, ...],
                 cfg: ModelConfig, rngs: nnx.Rngs, std: float | None = None, fp8: bool = True,
                 cache_fp8: bool = True):
        self.n_in = len(in_shape)
        self.kernel = param(rngs, tuple(in_shape) + tuple(out_shape), axes,
                            cfg.init_std if std is None else std, dtype_of(cfg.param_dtype))
        self.dtype = dtype_of(cfg.dtype)
        self.fp8_backend = cfg.fp8_backend if (cfg.fp8 and fp8) else None
        self.cache_fp8 = cfg.fp8_activation_cache and cache_fp8  # its input kept in e4m3 (§3.3.4)

    def __call__(self, x: Array) -> Array:
        w = self.kernel[...].astype(self.dtype)
        if self.fp8_backend is not None:
            in_shape, out_shape = w.shape[:self.n_in], w.shape[self.n_in:]
            batch_shape = x.shape[:x.ndim - self.n_in]
            y = fp8_matmul(x.astype(self.dtype).reshape(-1, math.prod(in_shape)),
                           w.reshape(math.prod(in_shape), -1), self.fp8_backend, self.cache_fp8)
            return y.reshape(batch_shape + out_shape)
        return linear_product(x.astype(self.dtype), w, self.n_in).astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linear_product(x: Array, w: Array, n_in: int) -> Float[Array, "..."]:
    """x [..., in...] . w [in..., out...] over the n_in `in` dims, fp32 out.

    The VJP is JAX's own (same products, same dtypes), written out so that each gradient is
    one product in the orientation XLA:CPU runs fast: JAX's rule forms dW as (dy^T x)^T, which
    XLA:CPU turned into an Eigen product with a transposed copy of dy: the output head's Wgrad
    alone took ~20 ms of `tiny`'s 134 ms train step, against ~3 ms as x^T dy.
    """
    return jax.lax.dot_general(x, w, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())),
                               preferred_element_type=jnp.float32)


def _linear_product_fwd(x, w, n_in):
    return linear_product(x, w, n_in), (x, w)


def _linear_product_bwd(n_in, residuals, dy):
    x, w = residuals
    n_batch = x.ndim - n_in
    # dx = dy . w over the `out` dims; dW = x . dy over the batch dims.
    dx = jax.lax.dot_general(dy, w, ((tuple(range(n_batch, dy.ndim)), tuple(range(n_in, w.ndim))), ((), ())),
                             preferred_element_type=jnp.float32)
    dw = jax.lax.dot_general(x, dy, ((tuple(range(n_batch)), tuple(range(n_batch))), ((), ())),
                             preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


linear_product.defvjp(_linear_product_fwd, _linear_product_bwd)


class MLP(nnx.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, cfg: ModelConfig, hidden_dim: int, rngs: nnx.Rngs, hidden_axis: str = "ffn"):
        D = cfg.d_model
        self.gate = Linear((D,), (hidden_dim,), ("embed", hidden_axis), cfg, rngs)
        self.up = Linear((D,), (hidden_dim,), ("embed", hidden_axis), cfg, rngs)
        self.down = Linear((hidden_dim,), (D,), (hidden_axis, "embed"), cfg, rngs)

    def __call__(self, x_BTD: Float[Array, "... D"]) -> Float[Array, "... D"]:
        gate, up = name(self.gate(x_BTD), "swiglu_in"), name(self.up(x_BTD), "swiglu_in")
        return self.down(name(jax.nn.silu(gate) * up, "swiglu_out"))


def attention_mask(T: int, segment_ids_BT: Array | None = None) -> Array:
    """Causal mask [1 or B, T, T]; with segment ids (packed examples) a token sees only its own segment."""
    mask_BTS = jnp.tril(jnp.ones((T, T), bool))[None]
    if segment_ids_BT is not None:
        mask_BTS = mask_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    return mask_BTS


def cache_mask(slots: int, positions_BT: Array) -> Array:
    """[B, T, S] for T new tokens against S cache slots: each sees the slots <= its own position
    (new entries are written before attending)."""
    return jnp.arange(slots)[None, None, :] <= positions_BT[:, :, None]


CAUSAL_CHUNK = 128  # query rows per chunk of causal training attention (`dot_product_attention`)


def dot_product_attention(q_BTHK: Array, k_BSGK: Array, v_BSGV: Array, mask_BTS: Array, scale: float,
                          causal: bool = False) -> Array:
    """softmax(scale q.k, masked) v per query head, scores in fp32; out [B, T, H, Vh] in v's dtype.
    K/V have G heads, G dividing H: query head h reads K/V head h // (H / G) (G = H: MLA's expanded
    heads and MHA; G < H: GQA; G = 1: MQA).

    Two savings over the textbook form, both exact in real arithmetic:
    - `causal` (query t is key t, training on whole sequences): queries [t0, t0 + CAUSAL_CHUNK) are
      scored against keys [0, t0 + CAUSAL_CHUNK) only, skipping the upper triangle of the score
      matrix (a quarter of the scores at T = 2 chunks, 3/8 at 4);
    - the softmax's division is applied to the [B, T, H, Vh] output, not the [B, H, T, S] scores.
    On XLA:CPU, fwd + bwd of `tiny`'s attention (T = 256) took about 30% less time this way.
    """
    B, T, H, K = q_BTHK.shape
    G = k_BSGK.shape[2]
    # Query heads grouped as [G, H / G] when K/V heads are shared; one head axis when not (measured:
    # a size-1 group axis made MLA's attention 30% slower on XLA:CPU).
    q = q_BTHK if G == H else q_BTHK.reshape(B, T, G, H // G, K)
    if not causal or T <= CAUSAL_CHUNK:
        out = _attend(q, k_BSGK, v_BSGV, mask_BTS, scale)
    else:
        out = jnp.concatenate(
            [_attend(q[:, t0:t0 + CAUSAL_CHUNK], k_BSGK[:, :t0 + CAUSAL_CHUNK], v_BSGV[:, :t0 + CAUSAL_CHUNK],
                     mask_BTS[:, t0:t0 + CAUSAL_CHUNK, :t0 + CAUSAL_CHUNK], scale) for t0 in range(0, T, CAUSAL_CHUNK)],
            axis=1)
    return out.reshape(B, T, H, -1)


def _heads(q: Array) -> tuple[str, str]:
    """einsum letters of q's head axes ("h", or "gq" when grouped) and of K/V's head axis."""
    heads = "h" if q.ndim == 4 else "gq"
    return heads, heads[0]


def _scores(q: Array, k_BSGK: Array, mask_BTS: Array, scale: float) -> Array:
    """scale q.k in fp32 [B, heads..., T, S], -inf where masked."""
    heads, kv = _heads(q)
    logits = jnp.einsum(f"bt{heads}k,bs{kv}k->b{heads}ts", q, k_BSGK, preferred_element_type=jnp.float32)
    mask = mask_BTS.reshape(mask_BTS.shape[:1] + (1,) * len(heads) + mask_BTS.shape[1:])
    return jnp.where(mask, logits * scale, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q: Array, k_BSGK: Array, v_BSGV: Array, mask_BTS: Array, scale: float) -> Array:
    """q [B, T, H, K] (one head axis: "h") or [B, T, G, Q, K] (grouped: "gq"); scores [B, heads..., T, S].

    The VJP keeps q, k, v, the output and each row's log-sum-exp, and recomputes the softmax from
    them (as flash attention does), instead of JAX's residuals of every [B, H, T, S] intermediate;
    each gradient product is written in the orientation XLA:CPU runs fast. `tiny`'s train step:
    89 -> 82 ms (one-process A/B, experiments/results/bench_vs_hf.md)."""
    return _attend_fwd(q, k_BSGK, v_BSGV, mask_BTS, scale)[0]


def _attend_fwd(q, k_BSGK, v_BSGV, mask_BTS, scale):
    heads, kv = _heads(q)
    logits = _scores(q, k_BSGK, mask_BTS, scale)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)  # a fully masked row gives zeros
    unnorm = jnp.exp(logits - peak)
    total = jnp.maximum(jnp.sum(unnorm, axis=-1), 1e-30)  # [B, heads..., T]
    out = jnp.einsum(f"b{heads}ts,bs{kv}v->bt{heads}v", unnorm.astype(v_BSGV.dtype), v_BSGV,
                     preferred_element_type=jnp.float32)
    out = (out / jnp.einsum(f"b{heads}t->bt{heads}", total)[..., None]).astype(v_BSGV.dtype)
    # Named inside the forward rule so a remat policy can keep the core's own residuals (model/remat.py).
    out, log_sum_exp = name(out, "attention"), name(peak[..., 0] + jnp.log(total), "attention")
    return out, (q, k_BSGK, v_BSGV, mask_BTS, out, log_sum_exp)


def _attend_bwd(scale, residuals, d_out):
    q, k_BSGK, v_BSGV, mask_BTS, out, log_sum_exp = residuals
    heads, kv = _heads(q)
    probs = jnp.exp(_scores(q, k_BSGK, mask_BTS, scale) - log_sum_exp[..., None])
    dv = jnp.einsum(f"b{heads}ts,bt{heads}v->bs{kv}v", probs.astype(d_out.dtype), d_out,
                    preferred_element_type=jnp.float32)
    d_probs = jnp.einsum(f"bt{heads}v,bs{kv}v->b{heads}ts", d_out, v_BSGV, preferred_element_type=jnp.float32)
    # softmax's VJP: dlogits = p * (dp - sum_s p dp), and sum_s p dp = sum_v d_out * out.
    row_dot = jnp.einsum(f"bt{heads}v,bt{heads}v->b{heads}t", d_out.astype(jnp.float32), out.astype(jnp.float32))
    d_logits = (probs * (d_probs - row_dot[..., None]) * scale).astype(q.dtype)
    dq = jnp.einsum(f"b{heads}ts,bs{kv}k->bt{heads}k", d_logits, k_BSGK, preferred_element_type=jnp.float32)
    dk = jnp.einsum(f"b{heads}ts,bt{heads}k->bs{kv}k", d_logits, q, preferred_element_type=jnp.float32)
    return dq.astype(q.dtype), dk.astype(k_BSGK.dtype), dv.astype(v_BSGV.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)


def masked_softmax(logits: Array, mask: Array) -> Array:
    """fp32 softmax with masked entries at -inf (rows fully masked give zeros, not NaN)."""
    logits = jnp.where(mask, logits.astype(jnp.float32), -jnp.inf)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    unnorm = jnp.exp(logits - jax.lax.stop_gradient(peak))
    return unnorm / jnp.maximum(jnp.sum(unnorm, axis=-1, keepdims=True), 1e-30)
