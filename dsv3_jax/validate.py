"""Checks of a whole Config that need the package's own knowledge.

`config.py` is plain data with per-field checks; what depends on other modules is checked here,
by asking those modules: registered routers and balancers (model/routing.py), how the mesh splits
the batch (parallel/sharding.py), whether the MoE stack cuts into the pipeline's stages
(train/pipelined.py). Every failure is a ConfigError naming the field, the value and what is allowed.
"""

from __future__ import annotations

from dsv3_jax.config import Config, ConfigError
from dsv3_jax.model.routing import check_routing
from dsv3_jax.parallel.sharding import RULES
from dsv3_jax.train.pipelined import check_pipeline_config


def validate(config: Config) -> Config:
    """`config` if a run can be built from it, else ConfigError."""
    if config.model.n_moe_layers > 0 or config.model.mtp_depth > 0:
        check_routing(config.model)
    sizes = {axis: getattr(config.mesh, axis) for axis in RULES.mesh_axes("batch")}
    batch_shards = RULES.shards("batch", sizes)
    if config.train.batch_size % batch_shards:
        raise ConfigError(f"train.batch_size={config.train.batch_size} must be divisible by "
                          f"{' x '.join(f'mesh.{a}' for a in sizes)} = {batch_shards}")
    if config.mesh.pipeline > 1:
        check_pipeline_config(config)
    return config
