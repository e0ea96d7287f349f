"""Meshes: the five named axes, `--mesh data=2,expert=4` parsing, and building a Mesh.

What is sharded over which axis is decided in one place, `parallel/sharding.py` (its table, LOGICAL_RULES).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

from dsv3_jax.config import MeshConfig
from dsv3_jax.errors import UsageError

MESH_AXES = tuple(MeshConfig().sizes())  # data, fsdp, tensor, expert, pipeline


def mesh_overrides(text: str) -> list[str]:
    """"data=2,tensor=4" -> ["mesh.data=2", "mesh.tensor=4"] (config overrides, validated there)."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in MESH_AXES:
            raise ValueError(f"--mesh item {item!r} must be AXIS=N with AXIS in {', '.join(MESH_AXES)}")
        out.append(f"mesh.{name}={value}")
    return out


def require_devices(sizes, devices=None) -> list:
    """The devices a mesh of `sizes` (a MeshConfig or a dict) would use; UsageError if too few."""
    sizes = sizes if isinstance(sizes, dict) else sizes.sizes()
    devices = jax.devices() if devices is None else devices
    need = math.prod(sizes.values())
    if need > len(devices):
        raise UsageError(f"the mesh {','.join(f'{a}={n}' for a, n in sizes.items() if n > 1)} needs {need} devices "
                         f"but {len(devices)} are available (on CPU: --host-devices {need})")
    return devices[:need]


def abstract_mesh(sizes) -> AbstractMesh:
    """A device-less mesh of `sizes` (a MeshConfig or a dict; absent axes 1): what the sharding rules
    need to place arrays for a mesh this host does not have."""
    sizes = sizes.sizes() if isinstance(sizes, MeshConfig) else sizes
    return AbstractMesh(tuple(sizes.get(a, 1) for a in MESH_AXES), MESH_AXES)


def make_mesh(sizes, devices=None) -> Mesh:
    """A Mesh over the first prod(sizes) devices; `sizes` is a MeshConfig or a dict of axis sizes."""
    sizes = {**dict.fromkeys(MESH_AXES, 1), **sizes} if isinstance(sizes, dict) else sizes.sizes()
    devices = require_devices(sizes, devices)
    need = len(devices)
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices[:need]).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
