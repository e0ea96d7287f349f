"""Which JAX backend a process on this host opens, decided before JAX starts.

With the `tpu` or `cuda12` extra installed (CI installs `tpu` to compile for TPU targets), JAX on a
host with no such device still tries to open it: libtpu prints several lines of initialisation
errors to every `dsv3` command and test process, and a failed CUDA backend breaks the compile-only
GPU topologies. So where no accelerator device file exists, JAX_PLATFORMS defaults to cpu; a host
with a GPU or TPU keeps JAX's own choice, and JAX_PLATFORMS set by the user always wins.
"""

from __future__ import annotations

import os
from pathlib import Path

# NVIDIA GPUs, TPU v4 / v5p (accel), TPU v5e / v6e (vfio).
_ACCELERATOR_DEVICES = ("nvidia[0-9]*", "accel[0-9]*", "vfio/[0-9]*")


def host_has_accelerator() -> bool:
    return any(any(Path("/dev").glob(pattern)) for pattern in _ACCELERATOR_DEVICES)


def default_to_cpu_without_accelerator() -> None:
    if host_has_accelerator():
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # No driver to check: without this, the CUDA plugin's version check fails when JAX first starts
    # its backends (any jax.devices()), and the compile-only GPU topologies of `dsv3 compile` are
    # gone for the rest of the process ("topology not implemented for cuda").
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


# XLA:CPU aborts the process (SIGABRT) when a collective's participants have not all arrived within
# 40 s (`xla_cpu_collective_call_terminate_timeout_seconds`). Host devices share the machine's cores,
# so on CI's 2 cores with 8 devices a DualPipe step's collective-permute waited longer than that for
# the other stage's threads, still computing: slowness, not a deadlock. Runs on host devices wait
# this long before calling a collective stuck.
HOST_COLLECTIVE_TIMEOUT_S = 900
_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"


def allow_slow_host_collectives() -> None:
    """Raise XLA:CPU's collective timeout to HOST_COLLECTIVE_TIMEOUT_S unless XLA_FLAGS sets it;
    read when the CPU backend starts, so call before the first device is touched."""
    flags = os.environ.get("XLA_FLAGS", "")
    if _TIMEOUT_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_TIMEOUT_FLAG}={HOST_COLLECTIVE_TIMEOUT_S}".strip()
