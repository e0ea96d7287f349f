"""One of the 2 processes of the restore-memory test (tests/test_multiprocess.py), run as a script
(1 CPU device per process, joined by jax.distributed):

    python tests/restore_worker.py save DIR PORT PROCESS_ID
        writes a widened tiny train state (seed 0), sharded over fsdp=2, as checkpoint 1 in DIR;
    python tests/restore_worker.py restore DIR PORT PROCESS_ID [--replicated]
        restores it onto fsdp=2 through the restore path every command uses (`restore_target` +
        `Checkpointer.restore`) and prints one JSON line: the state's bytes, the bytes of this
        process's shards, the bytes it read (/proc/self/io rchar) and the rise of its peak resident
        memory during the restore, and whether its shards equal a fresh sharded init.
        `--replicated` restores onto fully replicated targets instead (what a restore that ignored
        the mesh would read): the test's planted contrast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _config():
    import dataclasses

    from dsv3_jax.config import Config, TrainConfig, get_preset

    # Embedding and output head dominate: 2 x 32768 x 512 fp32 weights + 2 AdamW moments ~ 400 MB,
    # far above the runtime's own resident memory noise; their embed dim shards over fsdp.
    # (Not tests/conftest.py's tiny_model_config: importing conftest would give this process 8 host
    # devices, and the fsdp=2 mesh would then lie on process 0 alone.)
    model = dataclasses.replace(get_preset("tiny").model, vocab_size=32768, d_model=512, n_layers=2, mtp_depth=0,
                                dtype="float32")
    return Config(model=model, train=TrainConfig(batch_size=2, seq_len=16))


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _bytes_read() -> int:
    """Bytes this process has passed through read() / pread() so far (page-cache hits included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def _reset_peak_rss() -> bool:
    """Linux: VmHWM := the current resident set (False where the kernel does not allow it)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def save(directory: Path, port: int, process_id: int) -> None:
    from dsv3_jax.checkpoint import Checkpointer
    from dsv3_jax.config import MeshConfig
    from dsv3_jax.parallel import distributed
    from dsv3_jax.parallel.mesh import make_mesh
    from dsv3_jax.train.state import sharded_init

    distributed.initialize(f"127.0.0.1:{port}", 2, process_id, timeout_s=120)
    init, _ = sharded_init(_config(), 0, make_mesh(MeshConfig(fsdp=2)))  # each process writes its own shards
    saver = Checkpointer(directory)
    saver.save(1, init(), {"position": 0})
    saver.close()
    distributed.barrier("save-worker-done")


def restore(directory: Path, port: int, process_id: int, replicated: bool) -> None:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from dsv3_jax.checkpoint import Checkpointer, restore_target
    from dsv3_jax.config import MeshConfig
    from dsv3_jax.parallel import distributed
    from dsv3_jax.parallel.mesh import make_mesh
    from dsv3_jax.train.state import abstract_train_state, sharded_init

    distributed.initialize(f"127.0.0.1:{port}", 2, process_id, timeout_s=120)
    config = _config()
    mesh = make_mesh(MeshConfig(fsdp=2))
    abstract = abstract_train_state(config)[2]
    target = restore_target(abstract, mesh)
    if replicated:
        everywhere = NamedSharding(mesh, PartitionSpec())
        target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=everywhere), target)
    reader = Checkpointer(directory, read_only=True)
    peak_reset = _reset_peak_rss()
    before, read_before = _peak_rss_bytes(), _bytes_read()
    restored, _, _ = reader.restore(target)
    jax.block_until_ready(restored)
    rise, read = _peak_rss_bytes() - before, _bytes_read() - read_before

    leaves = jax.tree.leaves(restored)
    local = sum(shard.data.nbytes for leaf in leaves for shard in leaf.addressable_shards)
    fresh, _ = sharded_init(config, 0, mesh)
    equal = all(np.array_equal(a.data, b.data) for x, y in zip(leaves, jax.tree.leaves(fresh()))
                for a, b in zip(x.addressable_shards, y.addressable_shards)) if not replicated else None
    print(json.dumps({"whole": sum(leaf.nbytes for leaf in leaves), "local": local, "rise": rise, "peak_reset": peak_reset, "read": read,
                      "equal": equal}), flush=True)
    distributed.barrier("restore-worker-done")


if __name__ == "__main__":
    mode, directory = sys.argv[1], Path(sys.argv[2])
    port, process_id = int(sys.argv[3]), int(sys.argv[4])
    if mode == "save":
        save(directory, port, process_id)
    else:
        restore(directory, port, process_id, "--replicated" in sys.argv)
