"""Multi-controller runs: one `dsv3` process per host, joined by JAX's own distributed runtime.

Every process runs the same program over the global mesh (jax.devices() spans all hosts); arrays
are global, each process holding the shards of its own devices. What differs per process is only
I/O: process 0 writes the run directory's metrics, plots, config and console output; orbax
writes checkpoints from every process (each its shards, process 0 the metadata). Stop signals are
agreed on, so all processes finish the same step and save the same checkpoint.

On CPU the collectives between processes go through gloo (two local processes reproduce a
two-host run). On a cluster, `jax.distributed.initialize()` without arguments reads what SLURM or
Cloud TPU set; `--coordinator HOST:PORT --num-processes N --process-id I` name it explicitly.
"""

from __future__ import annotations

import numpy as np

from dsv3_jax.errors import UsageError


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               timeout_s: int = 300, from_environment: bool = False) -> None:
    """Join the run's processes (a no-op for a single-process run)."""
    explicit = (coordinator, num_processes, process_id)
    if not from_environment and all(v is None for v in explicit):
        return
    if not from_environment and any(v is None for v in explicit):
        raise UsageError("a multi-process run needs all of --coordinator HOST:PORT, --num-processes N and "
                         "--process-id I (or a launcher's environment: SLURM, Cloud TPU)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise UsageError(f"--process-id={process_id} must be in [0, --num-processes={num_processes})")
    import jax

    # Only the CPU backend reads this (GPU/TPU collectives are NCCL / ICI): gloo between processes.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s, heartbeat_timeout_seconds=max(10, timeout_s // 3))


def is_main() -> bool:
    """Process 0 owns the run directory's files and the console."""
    import jax

    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any (a stop signal received by one host)."""
    import jax

    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.array(flag))).any())


def barrier(name: str) -> None:
    """Wait until every process reaches `name` (no-op for one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
