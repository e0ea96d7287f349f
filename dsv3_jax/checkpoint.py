"""orbax checkpoints of a run: train state + data iterator state (+ the resolved config beside).

A checkpoint does not depend on the mesh that wrote it: every restore is given a target built for
the mesh it runs on now (`restore_target`: the sharding rules of parallel/sharding.py applied to the
abstract state), and orbax reads into each device only the slices of its own shards. The writer's
mesh is metadata (config.json, mesh_changes.jsonl), never a requirement.

Saves are atomic (orbax writes a temporary directory and renames it when complete), so a
process killed mid-save leaves the previous checkpoint as the latest good one. Restoring a
directory that is not one of ours raises `UsageError` and touches nothing; `restore_newest_good`
sets damaged checkpoints aside and falls back to the newest one that restores.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from dsv3_jax.config import Config, DataConfig, TrainConfig, config_from_json
from dsv3_jax.data.tokenizer import load_tokenizer
from dsv3_jax.errors import UsageError, first_line
from dsv3_jax.model.routing import RoutingBias
from dsv3_jax.parallel.mesh import MESH_AXES, make_mesh
from dsv3_jax.parallel.sharding import current_rules
from dsv3_jax.run_dir import require_new_directory
from dsv3_jax.train.state import abstract_train_state, create_train_state


class DamagedCheckpoint(UsageError):
    """A checkpoint whose files cannot be read (as opposed to one written by another model)."""


class PlacementError(UsageError):
    """A sound checkpoint that could not be placed on this mesh: never "damaged", never set aside."""


def restore_target(abstract_state: Any, mesh=None, zero1: bool = False, rules=None) -> Any:
    """`abstract_state` (shapes and dtypes) as a restore target for `mesh`, the mesh this process runs
    on now (None: this process's first device): jax.ShapeDtypeStruct leaves carrying the
    NamedSharding the sharding rules give them on it, so orbax reads into each device only its own
    shards, whatever mesh wrote the checkpoint. `rules`: the run's sharding rules (default: those
    in context)."""

    if mesh is None:
        mesh = make_mesh(dict.fromkeys(MESH_AXES, 1), jax.local_devices()[:1])
    shardings = (rules or current_rules()).tree(abstract_state, mesh, zero1)
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        abstract_state, shardings)


class Checkpointer:
    def __init__(self, directory: Path, keep: int = 2, read_only: bool = False):
        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise UsageError(f"checkpoint path {str(self.directory)!r} is a file, not a directory")
        # orbax's replica-parallel save splits each replicated array among its replicas so that
        # several hosts share the writing; within one process it only adds an on-device slice per
        # shard, each a compiled program (232 of them, 8 s, at the first save of an 8-device run).
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1), override=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                               cleanup_tmp_directories=not read_only,
                                               enable_async_checkpointing=False)
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                               "ema": ocp.StandardCheckpointHandler()})
        except Exception as e:  # orbax raises assorted errors on unreadable directories
            raise UsageError(f"cannot open checkpoint directory {str(self.directory)!r}: {e}") from None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """The steps of the checkpoints on disk, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, ema: Any = None) -> None:
        """The train state, the data iterator's state and, when given, the parameters' EMA
        (train/ema.py: host-memory arrays) as one atomic checkpoint."""
        items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        if ema is not None:
            items["ema"] = ocp.args.StandardSave(ema)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def restore_ema(self, step: int, target: Any) -> Any:
        """The EMA saved with checkpoint `step`, read into `target`'s shapes and shardings."""
        stored = self.manager.item_metadata(step) or {}
        if stored.get("ema") is None:
            raise UsageError(f"checkpoint {step} in {str(self.directory)!r} holds no parameter EMA, but "
                             "train.ema_decay > 0 needs one to resume it")
        try:
            return self.manager.restore(step, args=ocp.args.Composite(ema=ocp.args.StandardRestore(target))).ema
        except Exception as e:
            raise DamagedCheckpoint(f"checkpoint {step} in {str(self.directory)!r}: its EMA cannot be read: "
                                    f"{first_line(e)}") from None

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise UsageError(f"no checkpoint found in {str(self.directory)!r}")
        _require_shardings(abstract_state)
        self._check_compatible(abstract_state, step)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as e:
            if _is_placement_error(e):  # the files are sound: they did not fit the target given
                raise PlacementError(f"checkpoint {step} in {str(self.directory)!r} could not be placed on this "
                                     f"mesh: {first_line(e)}") from None
            raise DamagedCheckpoint(f"checkpoint {step} in {str(self.directory)!r} is damaged: {first_line(e)}") \
                from None
        return restored.state, restored.data, step

    def restore_newest_good(self, abstract_state: Any, set_aside: Path, say=print) -> tuple[Any, dict, int]:
        """Restore the newest checkpoint that reads back. Damaged newer ones are moved into
        `set_aside` (kept for inspection, out of orbax's way) and `say` is told which; a checkpoint
        from a different model is refused at once, as is a run with no readable checkpoint."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise UsageError(f"no checkpoint found in {str(self.directory)!r}")
        damaged: list[tuple[int, DamagedCheckpoint]] = []
        for step in steps:
            try:
                restored = self.restore(abstract_state, step)
            except DamagedCheckpoint as e:
                damaged.append((step, e))
                continue
            break
        else:
            raise DamagedCheckpoint(f"no checkpoint in {str(self.directory)!r} restores: "
                                    + "; ".join(str(e) for _, e in damaged[:2]))
        if damaged:
            set_aside.mkdir(parents=True, exist_ok=True)
            for step, _ in damaged:
                target = set_aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                shutil.move(str(self.directory / str(step)), str(target))
            self.manager.reload()
            say(f"checkpoint(s) {', '.join(str(s) for s, _ in damaged)} could not be read ({damaged[0][1]}); moved to "
                f"{set_aside}; resuming from checkpoint {restored[2]}")
        return restored

    def _check_compatible(self, abstract_state: Any, step: int) -> None:
        """Compare the stored tree's names and shapes with ours before reading any array, so a
        foreign checkpoint is named precisely (and orbax is never left with failed reads)."""
        try:
            stored = self.manager.item_metadata(step)["state"]
            stored_shapes = {_path_name(path): tuple(meta.shape)
                             for path, meta in jax.tree_util.tree_leaves_with_path(stored)}
        except Exception as e:
            raise DamagedCheckpoint(f"checkpoint {step} in {str(self.directory)!r} is damaged or not a dsv3 "
                                    f"checkpoint: {first_line(e)}") from None
        ours = {_path_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)}
        missing = sorted(set(ours) - set(stored_shapes))
        unexpected = sorted(set(stored_shapes) - set(ours))
        misshapen = sorted(k for k in set(ours) & set(stored_shapes) if ours[k] != stored_shapes[k])
        if missing or unexpected or misshapen:
            details = "; ".join(f"{label}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                                for label, names in (("missing", missing), ("unexpected", unexpected),
                                                     ("misshapen", [f"{k} {stored_shapes[k]} != {ours[k]}"
                                                                    for k in misshapen])) if names)
            raise UsageError(f"checkpoint {step} in {str(self.directory)!r} was written by a different model: {details}")

    def close(self) -> None:
        self.manager.close()


def _require_shardings(abstract_state: Any) -> None:
    """Every leaf of a restore target names where it goes (`restore_target`). Without shardings orbax
    falls back to the writer's devices, which this process may not have."""
    missing = [_path_name(path) for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)
               if getattr(leaf, "sharding", None) is None]
    if missing:
        raise ValueError(f"restore target without shardings for {', '.join(missing[:3])}"
                         f"{' ...' if len(missing) > 3 else ''}: build it with checkpoint.restore_target")


def _is_placement_error(error: Exception) -> bool:
    """orbax's complaints about the target's devices or shardings, as opposed to unreadable files."""
    return "topology mismatch" in str(error).lower()


def _path_name(path: tuple) -> str:
    """'params.moe_layers.ffn.w_gate_EDF.value' from a pytree key path (dict, attr or index keys)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return ".".join(parts)


def load_trained(run_dir: Path, with_tokenizer: bool = True, mesh=None):
    """(config, model with the latest checkpoint's weights, tokenizer) of a run directory, placed on
    `mesh` (None: this process's first device), whatever mesh the run was trained on."""
    from flax import nnx

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise UsageError(f"{str(run_dir)!r} is not a dsv3 run directory (no config.json)")
    config = config_from_json((run_dir / "config.json").read_text())
    tokenizer = load_tokenizer(config.data.tokenizer or run_dir / "tokenizer.json") if with_tokenizer else None
    graphdef, _, abstract = abstract_train_state(config, config.train.seed)
    if config.train.objective == "grpo":
        # A GRPO checkpoint is jobs/grpo.py's GRPOState: the policy's train state beside the
        # frozen reference. The same fields as a dict restore it without importing the GRPO loop.
        abstract = {"policy": abstract, "reference": abstract.params, "reference_bias": abstract.routing_bias}
    checkpointer = Checkpointer(run_dir / "checkpoints", read_only=True)
    state, _, _ = checkpointer.restore(restore_target(abstract, mesh))
    checkpointer.close()
    if config.train.objective == "grpo":
        state = state["policy"]
    return config, nnx.merge(graphdef, state.params, state.routing_bias), tokenizer


def save_as_run(model, model_config, run_dir: Path, tokenizer_file: Path | None = None) -> None:
    """A new run directory (config.json + checkpoint 0) holding `model`'s weights and a fresh
    optimizer state: `dsv3 generate` and `dsv3 train --resume` (fine-tuning) work on it."""
    import dataclasses
    import shutil

    from flax import nnx

    run_dir = Path(run_dir)
    require_new_directory(run_dir)
    train = TrainConfig(seq_len=min(TrainConfig().seq_len, model_config.max_seq_len))
    config = Config(model=model_config, train=train, data=DataConfig(tokenizer=""))
    _, optimizer, fresh = create_train_state(config, 0)
    _, params, bias = nnx.split(model, nnx.Param, RoutingBias)
    state = dataclasses.replace(fresh, params=params, routing_bias=bias, opt_state=optimizer.init(params))
    run_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_file is not None and Path(tokenizer_file).is_file():
        shutil.copy(tokenizer_file, run_dir / "tokenizer.json")
    checkpointer = Checkpointer(run_dir / "checkpoints")
    checkpointer.save(0, state, {"next_index": 0})
    checkpointer.close()
    (run_dir / "config.json").write_text(config.to_json())
