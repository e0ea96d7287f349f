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
    if "JAX_PLATFORMS" not in os.environ and not host_has_accelerator():
        os.environ["JAX_PLATFORMS"] = "cpu"
