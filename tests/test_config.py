import dataclasses

import pytest

from dsv3_jax.config import PRESETS, ConfigError, ModelConfig, apply_overrides, config_from_json, get_preset


def test_presets_are_valid_and_named():
    assert set(PRESETS) >= {"tiny", "small", "deepseek-v2-lite", "deepseek-v3-671b"}
    v3 = get_preset("deepseek-v3-671b").model
    assert (v3.n_routed_experts, v3.top_k, v3.n_group, v3.topk_group) == (256, 8, 8, 4)
    assert v3.kv_cache_values_per_token_per_layer == 576


@pytest.mark.parametrize("changes, fragment", [
    (dict(topk_group=5, n_group=4), "model.topk_group=5"),
    (dict(n_routed_experts=10, n_group=4), "n_routed_experts=10 must be divisible by model.n_group=4"),
    (dict(top_k=5, n_group=4, topk_group=2, n_routed_experts=8), "top_k=5"),  # only 2 groups x 2 reachable
    (dict(qk_rope_dim=7), "qk_rope_dim=7"),
    (dict(first_k_dense=9, n_layers=4), "first_k_dense=9"),
    (dict(score_func="relu"), "score_func='relu'"),
    (dict(yarn_factor=0.5), "yarn_factor=0.5"),
    (dict(d_model=0), "d_model=0"),
])
def test_invalid_values_name_the_field(changes, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        dataclasses.replace(ModelConfig(), **changes)


def test_overrides_parse_by_declared_type():
    cfg = apply_overrides(get_preset("tiny"), ["model.n_layers=6", "model.routed_scaling_factor=1.5",
                                               "model.norm_topk_prob=false", "model.score_func=softmax"])
    assert (cfg.model.n_layers, cfg.model.routed_scaling_factor) == (6, 1.5)
    assert cfg.model.norm_topk_prob is False and cfg.model.score_func == "softmax"


@pytest.mark.parametrize("override, fragment", [
    ("model.nope=1", "unknown config key 'model.nope'"),
    ("model.n_layers=two", "must be an integer"),
    ("model.n_layers", "must look like"),
    ("model=3", "is a section"),
    ("model.dtype=float16", "must be one of: float32, bfloat16"),
    ("model.remat=some", "model.remat='some' must be one of none, full, report, or a comma-separated list"),
    ("model.remat=norm,,mla_up", "list of the activations to keep from: norm, mla_down"),
])
def test_bad_overrides(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        apply_overrides(get_preset("tiny"), [override])


def test_remat_reads_policies_names_and_the_old_switch():
    tiny = get_preset("tiny")
    for text, want in (("true", "full"), ("false", "none"), ("report", "report"), ("attention,expert_in",
                                                                                   "attention,expert_in")):
        assert apply_overrides(tiny, [f"model.remat={text}"]).model.remat == want
    # config.json of a run from before policies holds a boolean
    old = tiny.to_json().replace('"remat": "none"', '"remat": true')
    assert '"remat": true' in old and config_from_json(old).model.remat == "full"


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        get_preset("huge")


def test_json_round_trip():
    cfg = apply_overrides(get_preset("small"), ["model.mtp_depth=2"])
    assert config_from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="unknown config key"):
        config_from_json('{"model": {"bogus": 1}}')
