"""The logical-axis table as a value: a run's `--set sharding.LOGICAL=AXES` changes where its arrays
live and how its step is partitioned, with the same numbers; two logical axes of one array on the
same mesh axis are an error, never a silent replication."""


import jax
import numpy as np
import pytest
from flax import nnx

from conftest import need_devices, tiny_model_config
from dsv3_jax.config import Config, ConfigError, MeshConfig, TrainConfig, apply_overrides, get_preset
from dsv3_jax.hlo_stats import collectives
from dsv3_jax.parallel.mesh import MESH_AXES, abstract_mesh, make_mesh
from dsv3_jax.parallel.sharding import (ACTIVATION_LAYOUTS, DEFAULT_RULES, ShardingCollision, ShardingRules,
                                        current_rules, rules_for, use_rules)
from dsv3_jax.train.state import abstract_train_state, create_train_state
from dsv3_jax.train.step import make_train_step

EVERY_AXIS_2 = abstract_mesh(dict.fromkeys(MESH_AXES, 2))


def _weight_layouts(config: Config) -> set[tuple[str, ...]]:
    _, _, state = abstract_train_state(config)
    variables = jax.tree.leaves(state.params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return {tuple(v.get_metadata()["logical_axes"]) for v in variables if v.get_metadata().get("logical_axes")}


@pytest.mark.parametrize("preset", ["tiny", "small", "deepseek-v3-671b"])
def test_the_default_table_places_every_array_of_every_preset_without_a_collision(preset):
    layouts = _weight_layouts(get_preset(preset))
    # The MoE stack's weights are stage-owned: pipeline takes their layers, fsdp alone their embed dim.
    assert ("stage_layers", "expert", "stage_embed", "moe_ffn") in layouts, sorted(layouts)
    for axes in sorted(layouts) + list(ACTIVATION_LAYOUTS):
        DEFAULT_RULES.spec(axes, None, EVERY_AXIS_2)  # raises ShardingCollision on a collision
    spec = DEFAULT_RULES.spec(("stage_layers", "expert", "stage_embed", "moe_ffn"), None, EVERY_AXIS_2)
    assert tuple(spec) == ("pipeline", "expert", "fsdp", "tensor")
    assert tuple(DEFAULT_RULES.spec(("vocab", "embed"), None, EVERY_AXIS_2)) == ("tensor", ("fsdp", "pipeline"))


def test_a_collision_is_an_error_naming_both_axes_not_a_replication():
    rules = DEFAULT_RULES.override({"moe_ffn": ("expert",)})
    with pytest.raises(ShardingCollision, match="'expert' and 'moe_ffn'.*mesh axis 'expert'"):
        rules.spec(("layers", "expert", "embed", "moe_ffn"), (3, 8, 32, 16), EVERY_AXIS_2)
    # A mesh axis of size 1 splits nothing, so it cannot collide.
    one_expert = abstract_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert tuple(rules.spec(("layers", "expert", "embed", "moe_ffn"), (3, 8, 32, 16), one_expert)) == \
        (None, None, "fsdp", None)
    with pytest.raises(Exception, match="sharding.attention is not a logical axis"):
        DEFAULT_RULES.override({"attention": ("tensor",)})


def test_sharding_overrides_parse_save_and_reload():
    config = apply_overrides(get_preset("tiny"), ["sharding.heads=", "sharding.batch=data, fsdp"])
    assert config.sharding == (("heads", ()), ("batch", ("data", "fsdp")))
    from dsv3_jax.config import config_from_json
    assert config_from_json(config.to_json()) == config
    assert rules_for(config).table["heads"] == () and rules_for(config).table["batch"] == ("data", "fsdp")
    with pytest.raises(ConfigError, match="sharding.heads=gpu must list distinct mesh axes"):
        apply_overrides(get_preset("tiny"), ["sharding.heads=gpu"])
    with pytest.raises(ConfigError, match="must look like sharding.LOGICAL"):
        apply_overrides(get_preset("tiny"), ["sharding.heads.x=tensor"])


def test_use_rules_is_what_the_layers_see_and_is_undone_on_exit():
    mine = ShardingRules({**DEFAULT_RULES.table, "act_embed": ("tensor",)})
    assert current_rules() is DEFAULT_RULES
    with use_rules(mine):
        assert current_rules() is mine
    assert current_rules() is DEFAULT_RULES


def _step(config: Config, mesh):
    graphdef, optimizer, state = create_train_state(config, 0, mesh)
    rules = rules_for(config)
    shardings = rules.tree(state, mesh)
    step = jax.jit(make_train_step(config, graphdef, optimizer), in_shardings=(shardings, rules.batch(mesh)))
    batch = jax.random.randint(jax.random.key(1), (config.train.batch_size, config.train.seq_len + 1), 0,
                               config.model.vocab_size)
    with jax.set_mesh(mesh), use_rules(rules):
        compiled = step.lower(state, batch).compile()
        _, metrics = compiled(state, jax.device_put(batch, rules.batch(mesh)))
    return state, compiled.as_text(), float(metrics["loss"])


def test_a_sharding_override_changes_the_layout_and_the_program_not_the_numbers():
    """tensor=2 x data=2: by default attention heads and FFN hidden dims are split over tensor;
    `sharding.heads=` and `sharding.ffn=` (replicated) keep those weights whole on every device, so
    the step has fewer tensor-parallel reductions, and the loss is the same."""
    need_devices(4)
    base = Config(model=tiny_model_config(mtp_depth=0), train=TrainConfig(batch_size=4, seq_len=16),
                  mesh=MeshConfig(data=2, tensor=2))
    overridden = apply_overrides(base, ["sharding.heads=", "sharding.ffn="])
    mesh = make_mesh(base.mesh)
    results = {name: _step(config, mesh) for name, config in (("default", base), ("override", overridden))}

    def shard_shape(state, *path):
        leaf = state.params
        for key in path:
            leaf = leaf[key]
        array = leaf.get_value()
        return array.shape, array.addressable_shards[0].data.shape

    for path in (("dense_layers", "ffn", "gate", "kernel"), ("moe_layers", "attn", "w_o", "kernel")):
        full, default_shard = shard_shape(results["default"][0], *path)
        _, override_shard = shard_shape(results["override"][0], *path)
        assert override_shard == full and default_shard != full, (path, full, default_shard, override_shard)
    default_counts, override_counts = (collectives(results[k][1]) for k in ("default", "override"))
    assert override_counts["all-reduce"]["count"] < default_counts["all-reduce"]["count"], (default_counts, override_counts)
    np.testing.assert_allclose(results["override"][2], results["default"][2], rtol=1e-5)
