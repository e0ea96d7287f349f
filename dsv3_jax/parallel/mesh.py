"""Meshes and THE logical-axis table: the one place that maps model axis names to mesh axes.

Every weight is declared with logical axis names (`logical_axes` Variable metadata, e.g.
`("layers", "expert", "embed", "moe_ffn")`); `LOGICAL_RULES` maps each to a mesh axis (or None =
replicated). Mesh axes: data, fsdp, tensor, expert, pipeline. With these shardings on the
inputs of a jitted step, XLA's SPMD partitioner (GSPMD) shards the computation: data/fsdp/expert
split the batch, fsdp also shards weights' embed dim (gathered per layer), tensor splits heads and
FFN hidden dims, expert splits routed experts (dispatch by GSPMD, or by explicit all-to-alls:
parallel/expert.py). "layers" stays unsharded until a pipeline executor
owns it (DESIGN §4).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert", "pipeline")

LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),  # expert-parallel ranks are data-parallel ranks (report §3.2)
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "ffn": "tensor",
    "moe_ffn": "tensor",
    "expert": "expert",
    "q_lora": None,
    "kv_lora": None,
    "qk_head": None,
    "v_head": None,
    "router": None,
    "norm": None,
    "mtp_concat": None,
    "layers": None,
}


def mesh_overrides(text: str) -> list[str]:
    """"data=2,tensor=4" -> ["mesh.data=2", "mesh.tensor=4"] (config overrides, validated there)."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in MESH_AXES:
            raise ValueError(f"--mesh item {item!r} must be AXIS=N with AXIS in {', '.join(MESH_AXES)}")
        out.append(f"mesh.{name}={value}")
    return out


def make_mesh(sizes, devices=None) -> Mesh:
    """A Mesh over the first prod(sizes) devices; `sizes` is a MeshConfig or a dict of axis sizes."""
    sizes = sizes if isinstance(sizes, dict) else {a: getattr(sizes, a) for a in MESH_AXES}
    devices = jax.devices() if devices is None else devices
    need = math.prod(sizes.values())
    if need > len(devices):
        from dsv3_jax.errors import UsageError

        raise UsageError(f"the mesh {','.join(f'{a}={n}' for a, n in sizes.items() if n > 1)} needs {need} devices "
                         f"but {len(devices)} are available (on CPU: --host-devices {need})")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices[:need]).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for logical `axes`; a dim its mesh axes do not divide stays replicated."""
    spec, used = [], set()
    for name, dim in zip(axes, shape):
        mesh_axes = LOGICAL_RULES.get(name) if name else None
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if mesh_axes and dim % size == 0:
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
            used.update(mesh_axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for every leaf: Variables by their logical axes, everything else replicated."""
    def sharding(leaf):
        if isinstance(leaf, nnx.Variable):
            axes = leaf.get_metadata().get("logical_axes")
            value = leaf.get_value()
            spec = logical_spec(tuple(axes), value.shape, mesh) if axes else PartitionSpec()
            return leaf.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    shards = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    return NamedSharding(mesh, logical_spec(("batch", None), (shards, 1), mesh))
