"""orbax checkpoints of a run: train state + data iterator state (+ the resolved config beside).

Saves are atomic (orbax writes a temporary directory and renames it when complete), so a
process killed mid-save leaves the previous checkpoint as the latest good one. Restoring a
directory that is not one of ours, or is damaged, raises `UsageError` and touches nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from dsv3_jax.errors import UsageError


class Checkpointer:
    def __init__(self, directory: Path, keep: int = 2, read_only: bool = False):
        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise UsageError(f"checkpoint path {str(self.directory)!r} is a file, not a directory")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                               cleanup_tmp_directories=not read_only,
                                               enable_async_checkpointing=False)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:  # orbax raises assorted errors on unreadable directories
            raise UsageError(f"cannot open checkpoint directory {str(self.directory)!r}: {e}") from None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data_state)), force=True)
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise UsageError(f"no checkpoint found in {str(self.directory)!r}")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"checkpoint {step} in {str(self.directory)!r} cannot be restored into this model "
                             f"(damaged, or written by a different config): {first_line[:300]}") from None
        _check_shapes(abstract_state, restored.state, step, self.directory)
        return restored.state, restored.data, step

    def close(self) -> None:
        self.manager.close()


def _check_shapes(expected: Any, got: Any, step: int, directory: Path) -> None:
    bad = [jax.tree_util.keystr(path) for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(expected),
                                                             jax.tree.leaves(got)) if a.shape != b.shape]
    if bad:
        raise UsageError(f"checkpoint {step} in {str(directory)!r} does not match this model: "
                         f"misshapen {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")


def load_trained(run_dir: Path):
    """(config, model with the latest checkpoint's weights, tokenizer) of a run directory."""
    from flax import nnx

    from dsv3_jax.config import config_from_json
    from dsv3_jax.data.tokenizer import load_tokenizer
    from dsv3_jax.train.state import create_train_state

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise UsageError(f"{str(run_dir)!r} is not a dsv3 run directory (no config.json)")
    config = config_from_json((run_dir / "config.json").read_text())
    tokenizer = load_tokenizer(config.data.tokenizer or run_dir / "tokenizer.json")
    graphdef, _, state = create_train_state(config, config.train.seed)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    checkpointer = Checkpointer(run_dir / "checkpoints", read_only=True)
    state, _, _ = checkpointer.restore(abstract)
    checkpointer.close()
    return config, nnx.merge(graphdef, state.params, state.routing_bias), tokenizer
