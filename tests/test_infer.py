import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import get_preset
from dsv3_jax.errors import UsageError
from dsv3_jax.infer.cache import bytes_per_token, init_caches
from dsv3_jax.infer.generate import _decode, generate, generate_speculative
from dsv3_jax.infer.sampling import sample_token
from dsv3_jax.model.model import DeepSeekV3
from tests.conftest import tiny_model_config


# The full forward every decoding test compares against, jitted once (eager, it compiled one small
# program per op and shape).
full_logits = nnx.jit(lambda model, tokens: model(tokens).logits_BTV)


@pytest.fixture(scope="module")
def model():
    # YaRN on with a short original context, so decoding runs past it (report §4.3).
    cfg = tiny_model_config(mtp_depth=1, yarn_factor=4.0, original_max_position=8)
    return DeepSeekV3(cfg, nnx.Rngs(0))


@pytest.mark.parametrize("mode,cache_dtype", [("absorbed", "float32"), ("expanded", "float32"), ("naive", "float32"),
                                              ("absorbed", "bfloat16")])
def test_cached_decoding_matches_full_forward_at_every_position(model, mode, cache_dtype):
    cfg = model.cfg
    tokens = jax.random.randint(jax.random.key(0), (2, 20), 0, cfg.vocab_size)
    full = full_logits(model, tokens)
    caches = init_caches(cfg, 2, 24, mode, jnp.dtype(cache_dtype))
    graphdef, state = nnx.split(model)
    # Prefill 7 tokens at once, then one token per step past the original context of 8.
    logits, _, caches = _decode(graphdef, state, caches, tokens[:, :7], jnp.broadcast_to(jnp.arange(7), (2, 7)), mode)
    steps = [logits]
    for t in range(7, 20):
        logits, _, caches = _decode(graphdef, state, caches, tokens[:, t:t + 1], jnp.full((2, 1), t), mode)
        steps.append(logits)
    # A bf16 cache rounds the cached latent (8 mantissa bits): the logits follow within bf16 error.
    tolerance = dict(rtol=1e-4, atol=1e-5) if cache_dtype == "float32" else dict(rtol=0, atol=2e-2)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, **tolerance)


def test_absorbed_decode_never_builds_per_head_keys_or_values(model):
    """The absorbed step's jaxpr has no [B, S, H, *] intermediates for the S cached slots."""
    cfg = model.cfg
    caches = init_caches(cfg, 1, 40, "absorbed", jnp.float32)
    jaxpr = jax.make_jaxpr(lambda c: model.decode(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), c))(caches)
    per_head_over_slots = [v.aval.shape for eqn in jaxpr.eqns for v in eqn.outvars
                           if getattr(v.aval, "shape", ()) and 40 in v.aval.shape and cfg.n_heads in v.aval.shape
                           and len(v.aval.shape) == 4 and v.aval.shape[1:3] == (40, cfg.n_heads)]
    assert per_head_over_slots == []
    # ...whereas the expanded path does rebuild them (so the check can fail).
    jaxpr = jax.make_jaxpr(lambda c: model.decode(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), c,
                                                  "expanded"))(caches)
    text = str(jaxpr)
    assert f"[1,40,{cfg.n_heads},{cfg.qk_nope_dim}]" in text


def test_greedy_cached_generation_equals_full_forward_argmax(model):
    """With no cache_dtype given, an fp32 model caches in fp32 and greedy decoding is the forward's argmax."""
    prompt = [5, 17, 33, 2, 9]
    new = generate(model, [prompt], max_new_tokens=15)[0]
    sequence = jnp.array([prompt + new])
    argmax = jnp.argmax(model(sequence[:, :-1]).logits_BTV[0], axis=-1)
    assert list(np.asarray(argmax[len(prompt) - 1:])) == new


def test_batched_prompts_of_different_lengths_equal_one_by_one(model):
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [40]]
    batched = generate(model, prompts, max_new_tokens=10, cache_dtype=jnp.float32)
    for prompt, got in zip(prompts, batched):
        assert generate(model, [prompt], max_new_tokens=10, cache_dtype=jnp.float32)[0] == got


def test_generation_stops_at_eos(model):
    prompt = [5, 17, 33, 2, 9]
    free = generate(model, [prompt], max_new_tokens=12, cache_dtype=jnp.float32)[0]
    eos = free[4]
    stopped = generate(model, [prompt], max_new_tokens=12, eos_id=eos, cache_dtype=jnp.float32)[0]
    assert stopped == free[:free.index(eos) + 1]


@pytest.mark.parametrize("prompt", [[5, 17, 33, 2, 9], [1], list(range(3, 30, 2))])
def test_speculative_decoding_equals_greedy(model, prompt):
    greedy = generate(model, [prompt], max_new_tokens=20, cache_dtype=jnp.float32)[0]
    spec, stats = generate_speculative(model, prompt, max_new_tokens=20, cache_dtype=jnp.float32)
    assert spec == greedy
    assert stats.drafted > 0 and stats.main_forward_passes <= 20


def test_speculative_bookkeeping():
    """One main pass per draft (+ the prefill); each pass yields 1 token, or 2 when the draft is accepted."""
    cfg = tiny_model_config(mtp_depth=1)
    model = DeepSeekV3(cfg, nnx.Rngs(1))
    spec, stats = generate_speculative(model, [3, 4, 5], max_new_tokens=16, cache_dtype=jnp.float32)
    assert len(spec) == 16
    assert stats.main_forward_passes == 1 + stats.drafted
    assert 1 + stats.drafted + stats.accepted >= 16


def test_cache_bytes_per_token_from_the_arrays():
    v3 = get_preset("deepseek-v3-671b").model
    abstract = jax.eval_shape(lambda: init_caches(v3, 1, 128, "absorbed", jnp.bfloat16))
    assert bytes_per_token(abstract, 1, 128) == 70_272 == v3.n_layers * (v3.kv_lora_rank + v3.qk_rope_dim) * 2
    small = get_preset("small").model
    caches = init_caches(small, 2, 64, "absorbed", jnp.bfloat16)
    assert bytes_per_token(caches, 2, 64) == small.n_layers * (small.kv_lora_rank + small.qk_rope_dim) * 2
    naive = jax.eval_shape(lambda: init_caches(v3, 1, 128, "naive", jnp.bfloat16))
    assert bytes_per_token(naive, 1, 128) == v3.n_layers * 128 * (192 + 128) * 2  # 71x more


def test_out_of_range_prompt_tokens_are_refused(model):
    with pytest.raises(UsageError, match=r"out of range: ids must be in \[0, 97\)"):
        generate(model, [[1, 2, 500]], 3)


def test_top_p_sampling_stays_in_the_nucleus():
    logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
    draws = jax.vmap(lambda k: sample_token(logits, k, 1.0, top_p=0.75))(jax.random.split(jax.random.key(0), 2000))
    counts = np.bincount(np.asarray(draws), minlength=4)
    assert counts[2] == counts[3] == 0  # outside the 0.8 mass of {0, 1}
    assert abs(counts[0] / 2000 - 0.5 / 0.8) < 0.05
    assert int(sample_token(logits, jax.random.key(1), 0.0)) == 0


def test_cache_dtype_follows_the_models_compute_dtype_unless_asked(model, monkeypatch):
    import dsv3_jax.infer.generate as generate_module

    seen, real = [], generate_module.init_caches
    monkeypatch.setattr(generate_module, "init_caches", lambda *args: seen.append(jnp.dtype(args[4])) or real(*args))
    generate(model, [[1, 2, 3]], max_new_tokens=2)
    generate(model, [[1, 2, 3]], max_new_tokens=2, cache_dtype="bfloat16")
    assert model.cfg.dtype == "float32" and seen == [jnp.float32, jnp.bfloat16]
