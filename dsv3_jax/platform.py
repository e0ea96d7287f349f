"""The platform a program is built for, decided in one place.

Implementation choices (grouped GEMM, expert transport, Pallas interpret mode) depend on what the
program will run on, which is not always the host: `dsv3 compile --target tpu-v5p:2x2x1` traces on a
CPU host whose `jax.default_backend()` is "cpu" while the program is for TPU. The mesh in context
(`jax.set_mesh`) carries its devices' platform, compile-only target devices included, so that is
what decides; only a program traced with no mesh (one device) falls back to the default device.
"""

from __future__ import annotations

import typing
from typing import Literal

import jax

Platform = Literal["cpu", "gpu", "tpu"]
PLATFORMS: tuple[str, ...] = typing.get_args(Platform)
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def platform_name(name: str) -> Platform:
    """"cuda" / "rocm" / "gpu" -> "gpu"; "tpu", "cpu" unchanged."""
    name = _ALIASES.get(name.lower(), name.lower())
    if name not in PLATFORMS:
        raise ValueError(f"platform {name!r} must be one of {PLATFORMS}")
    return typing.cast(Platform, name)


def platform_of(device) -> Platform:
    return platform_name(device.platform)


def current_platform() -> Platform:
    """The platform of the mesh in context while tracing, else that of the default device."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    if device is not None:
        return platform_name(device.platform)
    return platform_of(jax.devices()[0])
