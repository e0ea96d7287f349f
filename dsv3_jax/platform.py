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


# XLA options a platform's compiler needs for a step's collectives to overlap its compute (report
# §3.2.1: DualPipe's F&B pairs hide one chunk's all-to-all behind the other's GEMMs). XLA:TPU keeps
# all-to-all synchronous unless asked; XLA:GPU makes collectives asynchronous and runs its
# latency-hiding scheduler by default, so it needs nothing; XLA:CPU has no asynchronous collectives.
COMPILER_OPTIONS: dict[str, dict[str, bool]] = {
    "tpu": {"xla_tpu_enable_async_all_to_all": True},
    "gpu": {},
    "cpu": {},
}


def compiler_options(platform: Platform) -> dict[str, bool]:
    """The options `jax.jit(..., compiler_options=...)` passes for `platform` (a fresh dict)."""
    return dict(COMPILER_OPTIONS[platform_name(platform)])
