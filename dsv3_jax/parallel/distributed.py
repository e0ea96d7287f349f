"""Multi-controller runs: one `dsv3` process per host, joined by JAX's own distributed runtime.

Every process runs the same program over the global mesh (jax.devices() spans all hosts); arrays
are global, each process holding the shards of its own devices. What differs per process is only
I/O: process 0 writes the run directory's metrics, plots, config and console output; orbax
writes checkpoints from every process (each its shards, process 0 the metadata). Stop signals are
agreed on, so all processes finish the same step and save the same checkpoint.

On CPU the collectives between processes go through gloo (two local processes reproduce a
two-host run). On a cluster, `jax.distributed.initialize()` without arguments reads what SLURM or
Cloud TPU set; `--coordinator HOST:PORT --num-processes N --process-id I` name it explicitly.

When a peer dies, the survivors stop with one line and status 1 (`peers_guarded`): a collective
with the dead process fails at once (gloo: connection reset), and a process waiting elsewhere
learns it from the coordinator, which declares a process dead after the heartbeat timeout
(`--distributed-timeout` / 3, at least 10 s). Left alone, JAX would print its C++ stack and abort
from its error-polling thread, or wait in its shutdown barrier. The checkpoints already written
are complete (orbax renames a checkpoint into place only when every process has written it).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

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


def exit_together(status: int) -> None:
    """End a multi-process run with `status` once every process has got here, without the
    interpreter's and JAX's teardown (a no-op for one process: it returns). Tearing down at the same
    time, the processes' gloo threads now and then threw in one of them after a stop signal
    ("terminate called after throwing", status -6 instead of 143; tests/test_multiprocess.py). By
    then the run has closed everything it writes: checkpoints, metrics, the run lock."""
    import jax

    if jax.process_count() == 1:
        return
    barrier("exit")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _stop(reason: str, advice: str) -> None:
    """One line, then exit at once: a normal exit would wait in JAX's shutdown barrier for the
    dead peer and end in its abort."""
    sys.stderr.write(f"dsv3: error: {reason}; {advice}\n")
    sys.stderr.flush()
    os._exit(1)


def _watch_peers(advice: str, poll_s: float, done: threading.Event, decide: threading.Lock) -> None:
    import jax
    from jax._src import distributed as jax_distributed

    ids, me = list(range(jax.process_count())), jax.process_index()
    while not done.wait(poll_s):
        try:
            missing = sorted(set(ids) - set(jax_distributed.global_state.client.get_live_nodes(ids)))
            reason = f"process {', '.join(map(str, missing))} of {len(ids)} stopped responding" if missing else ""
        except Exception as e:  # the coordinator itself (process 0) is gone
            reason = f"lost the run's coordinator, process 0 ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        with decide:  # never once the guarded work has ended (the runtime then shuts down)
            if reason and not done.is_set() and me not in missing:
                _stop(reason, advice)


@contextlib.contextmanager
def peers_guarded(advice: str, poll_s: float = 1.0):
    """Within a multi-process run: when another process dies, stop this one with one line (what
    happened, then `advice`) and status 1, whether it is in a collective or waiting."""
    import jax

    if jax.process_count() == 1:
        yield
        return
    done, decide = threading.Event(), threading.Lock()
    threading.Thread(target=_watch_peers, args=(advice, poll_s, done, decide), daemon=True, name="dsv3-peers").start()
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        _stop(f"a collective with another process failed, most likely because it died ({first[:200]})", advice)
    finally:
        with decide:
            done.set()
