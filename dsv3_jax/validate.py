"""Checks of a whole Config that need the package's own knowledge.

`config.py` is plain data with per-field checks; what depends on other modules is checked here,
by asking those modules: registered routers and balancers (model/routing.py), how the mesh splits
the batch and whether a run's sharding overrides name real logical axes without two of one array
landing on the same mesh axis (parallel/sharding.py), whether the MoE stack cuts into the pipeline's stages
(train/pipelined.py). Every failure is a ConfigError naming the field, the value and what is allowed.
"""

from __future__ import annotations

import jax
from flax import nnx

from dsv3_jax.config import Config, ConfigError
from dsv3_jax.model.routing import check_routing
from dsv3_jax.parallel.expert import check_dispatch
from dsv3_jax.parallel.mesh import abstract_mesh, require_devices
from dsv3_jax.parallel.sharding import ACTIVATION_LAYOUTS, rules_for
from dsv3_jax.platform import platform_of
from dsv3_jax.post.tasks import TASKS
from dsv3_jax.train.pipelined import check_pipeline_config
from dsv3_jax.train.state import abstract_train_state


def validate(config: Config, devices=None) -> Config:
    """`config` if a run can be built from it on `devices` (default: this host's; `dsv3 compile`
    passes the target's), else ConfigError."""
    if config.model.n_moe_layers > 0 or config.model.mtp_depth > 0:
        check_routing(config.model)
    rules = rules_for(config)  # an unknown sharding.NAME: one line
    if config.sharding:
        _check_layouts(config, rules)
    sizes = {axis: config.mesh.sizes()[axis] for axis in rules.mesh_axes("batch")}
    batch_shards = rules.shards("batch", sizes)
    if config.train.batch_size % batch_shards:
        raise ConfigError(f"train.batch_size={config.train.batch_size} must be divisible by "
                          f"{' x '.join(f'mesh.{a}' for a in sizes)} = {batch_shards}")
    devices = require_devices(config.mesh, devices)  # before anything is built or written
    if config.mesh.expert > 1 and config.model.n_routed_experts:
        _check_expert_parallel(config, platform_of(devices[0]))
    if config.train.objective == "grpo":
        if config.grpo.task not in TASKS:
            raise ConfigError(f"grpo.task={config.grpo.task!r} is not a registered task; choose one of: "
                              f"{', '.join(TASKS)}")
        if config.mesh.n_devices > 1:
            raise ConfigError("GRPO runs on one device (rollouts use the single-device generator); drop --mesh")
    if config.mesh.pipeline > 1:
        check_pipeline_config(config)
        if config.train.objective != "pretrain":
            raise ConfigError(f"train.objective={config.train.objective} runs without a pipeline: use mesh.pipeline=1 "
                              "(data, fsdp, tensor and expert axes work)")
    return config


def _check_expert_parallel(config: Config, platform: str) -> None:
    cfg, ep = config.model, config.mesh.expert
    if cfg.expert_dispatch == "gspmd":
        return
    if cfg.router == "expert_choice":
        raise ConfigError(f"model.expert_dispatch={cfg.expert_dispatch} needs a token-choice router (each token "
                          "picks its experts); model.router=expert_choice lets experts pick tokens: use "
                          "model.expert_dispatch=gspmd")
    if cfg.n_routed_experts % ep:
        raise ConfigError(f"model.n_routed_experts={cfg.n_routed_experts} must be divisible by mesh.expert={ep}")
    try:
        check_dispatch(cfg.expert_dispatch, platform)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_layouts(config: Config, rules) -> None:
    """ShardingCollision (one line) if the run's table maps two logical axes of one of its arrays, a
    weight or an activation layout, to the same mesh axis of its mesh. Only for runs that override
    the table: the default table is checked for every preset by the tests."""
    mesh = abstract_mesh(config.mesh)
    _, _, state = abstract_train_state(config)
    variables = jax.tree.leaves(state.params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    layouts = {tuple(v.get_metadata()["logical_axes"]) for v in variables
               if isinstance(v, nnx.Variable) and v.get_metadata().get("logical_axes")}
    for axes in sorted(layouts) + list(ACTIVATION_LAYOUTS):
        rules.spec(axes, None, mesh)
