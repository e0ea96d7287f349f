"""THE sharding source: one table from logical axis names to mesh axes, and everything derived from it.

Weights are declared with logical axis names (`logical_axes` Variable metadata, e.g.
`("layers", "expert", "embed", "moe_ffn")`), activations are constrained with logical names at
block boundaries (`constrain`), and every `shard_map` in this package takes its in/out specs from
`current_rules().spec(...)`. The table is a value: `DEFAULT_RULES` holds `LOGICAL_RULES`, a run's
`--set sharding.LOGICAL=AXES` overrides entries (`rules_for(config)`), and the job that places and
traces a run installs its rules with `use_rules` (beside `jax.set_mesh`), which the model's
layers read through `current_rules()`. No `PartitionSpec` is built anywhere else.

Two logical axes of one array may not map to the same mesh axis: that is a ShardingCollision
(one line, exit 2 from the CLI; validate.py checks a run's overrides before anything is built), not a
silent replication.

Mesh axes (`parallel/mesh.py`): data, fsdp, tensor, expert, pipeline.
- The batch is split over data x fsdp x expert: expert-parallel ranks are data-parallel ranks for
  everything but the routed experts (report §3.2).
- fsdp also shards the weights' embed dim at rest; compute gathers it (`compute=True` specs).
- pipeline splits pipeline stages ("stage", and the MoE stack's layers, "stage_layers": each
  pipeline rank stores and updates only its stages), and at rest, like fsdp, the embed dim of the
  weights outside the stack (embedding, dense layers, head, MTP): those are used by the first and
  last stages only, so no rank keeps a whole copy between steps; the step gathers them. Inside the
  stack the embed dim is "stage_embed" (model/block.py renames it), split by fsdp only: pipeline
  already splits the stack's layers. (Under SPMD every rank allocates the same buffers, so the
  gathered copy exists on every rank during the step: this saves state, the step's temporaries
  still hold one copy; jobs/plan.py.)
- tensor splits attention heads, FFN hidden dims and the vocabulary.
- expert splits the routed experts.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsv3_jax.errors import UsageError

LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    # Weights.
    "embed": ("fsdp", "pipeline"),  # outside the MoE stack (see the module docstring)
    "stage_embed": ("fsdp",),  # the embed dim of the MoE stack's weights, whose layers pipeline splits
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": (),  # GQA/MQA K/V heads (model/gqa.py): replicated, as MQA has one
    "ffn": ("tensor",),
    "moe_ffn": ("tensor",),
    "expert": ("expert",),
    "stage": ("pipeline",),
    "layers": (),
    "stage_layers": ("pipeline",),  # the MoE stack: rank q stores the layers of its pipeline stages
    "q_lora": (), "kv_lora": (), "qk_head": (), "v_head": (), "router": (), "norm": (), "mtp_concat": (),
    # Activations (and tokens: a flattened batch x sequence is "batch" too).
    "batch": ("data", "fsdp", "expert"),
    "seq": (),
    "act_embed": (),
    "act_vocab": ("tensor",),
}

# Activations at a block boundary, and the logits.
HIDDEN_BTD = ("batch", "seq", "act_embed")
LOGITS_BTV = ("batch", "seq", "act_vocab")
# Every activation layout the package constrains or shard_maps with (validate.py checks a run's
# table against these and the model's weights).
ACTIVATION_LAYOUTS = (HIDDEN_BTD, LOGITS_BTV, ("batch", None), (None, "batch", "seq", "act_embed"))


class ShardingCollision(UsageError):
    """Two logical axes of one array map to the same mesh axis."""


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    table: Mapping[str, tuple[str, ...]]
    # Mesh axes that shard weights at rest only: gathered before compute (FSDP), so specs for
    # compute (shard_map bodies) leave them out.
    storage_only: tuple[str, ...] = ("fsdp", "pipeline")

    def mesh_axes(self, logical: str) -> tuple[str, ...]:
        return self.table[logical]

    def override(self, changes: Mapping[str, tuple[str, ...]] | tuple = ()) -> "ShardingRules":
        """These rules with some logical names mapped to other mesh axes (a run's `sharding`
        overrides); an unknown name is a UsageError naming the known ones."""
        changes = dict(changes)
        unknown = sorted(set(changes) - set(self.table))
        if unknown:
            raise UsageError(f"sharding.{unknown[0]} is not a logical axis; known: {', '.join(sorted(self.table))}")
        return dataclasses.replace(self, table={**self.table, **{k: tuple(v) for k, v in changes.items()}})

    def spec(self, axes: tuple[str | None, ...], shape: tuple[int, ...] | None = None, mesh=None,
             *, compute: bool = False) -> PartitionSpec:
        """PartitionSpec for logical `axes`. Mesh axes of size 1 (or absent, or manual in the current
        context) are left out; with `shape`, a dim its mesh axes do not divide stays replicated.
        `compute`: the layout a computation sees (storage-only axes gathered)."""
        mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
        manual = set(getattr(mesh, "manual_axes", ()) or ())
        spec, claimed = [], {}
        for i, name in enumerate(axes):
            candidates = self.table[name] if name else ()
            chosen = tuple(a for a in candidates if a in mesh.shape and mesh.shape[a] > 1
                           and a not in manual and not (compute and a in self.storage_only))
            for a in chosen:
                if a in claimed:
                    raise ShardingCollision(
                        f"sharding: logical axes {claimed[a]!r} and {name!r} of one array {tuple(axes)} both map to "
                        f"mesh axis {a!r}; map one of them elsewhere (--set sharding.{name}=AXES, empty: replicated)")
                claimed[a] = name
            size = math.prod(mesh.shape[a] for a in chosen)
            if chosen and (shape is None or shape[i] % size == 0):
                spec.append(chosen[0] if len(chosen) == 1 else chosen)
            else:
                spec.append(None)
        return PartitionSpec(*spec)

    def sharding(self, axes: tuple[str | None, ...], mesh: Mesh, shape: tuple[int, ...] | None = None
                 ) -> NamedSharding:
        return NamedSharding(mesh, self.spec(axes, shape, mesh))

    def tree(self, tree, mesh: Mesh, zero1: bool = False):
        """NamedShardings for every leaf: Variables by their logical axes, everything else replicated.

        `zero1` (ZeRO-1, report §3.2): the optimizer state, the leaves under a field named
        `opt_state` (TrainState's), is split further over the batch axes that hold copies of the
        same parameter (`zero1_spec`); the parameters stay as the table places them, so the update
        is computed on each rank's slice and gathered back into the parameters."""
        def sharding(path, leaf):
            if isinstance(leaf, nnx.Variable):
                axes = leaf.get_metadata().get("logical_axes")
                shape = leaf.get_value().shape
                spec = self.spec(tuple(axes), shape, mesh) if axes else PartitionSpec()
                if zero1 and any(getattr(key, "name", None) == "opt_state" for key in path):
                    spec = self.zero1_spec(spec, shape, mesh)
                return leaf.replace(NamedSharding(mesh, spec))
            return NamedSharding(mesh, PartitionSpec())

        return jax.tree_util.tree_map_with_path(sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def zero1_spec(self, spec: PartitionSpec, shape: tuple[int, ...], mesh) -> PartitionSpec:
        """`spec` also split over each batch axis it leaves free (the ranks that hold the same
        parameter), on the first dim whose size its shards there divide; a leaf no dim fits stays
        as it was (small vectors)."""
        entries = [() if s is None else ((s,) if isinstance(s, str) else tuple(s)) for s in spec]
        entries += [()] * (len(shape) - len(entries))
        used = {a for entry in entries for a in entry}
        for axis in self.table["batch"]:
            if axis in used or mesh.shape.get(axis, 1) == 1:
                continue
            for i, entry in enumerate(entries):
                if shape[i] % (math.prod(mesh.shape[a] for a in entry) * mesh.shape[axis]) == 0:
                    entries[i] = entry + (axis,)
                    break
        return PartitionSpec(*(None if not e else e[0] if len(e) == 1 else e for e in entries))

    def batch(self, mesh: Mesh) -> NamedSharding:
        """Token batches [B, S]: rows over the batch axes."""
        return self.sharding(("batch", None), mesh)

    def shards(self, logical: str, sizes: Mapping[str, int]) -> int:
        """How many ways `logical` is split on a mesh of these axis sizes."""
        return math.prod(sizes[a] for a in self.table[logical])

    def constrain(self, x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
        """`with_sharding_constraint` by logical axes under the mesh in context; a no-op without one
        (single device), inside a shard_map that owns the axes, or when nothing would be sharded."""
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return x
        spec = self.spec(axes, x.shape, mesh)
        if all(s is None for s in spec):
            return x
        return jax.lax.with_sharding_constraint(x, spec)


DEFAULT_RULES = ShardingRules(LOGICAL_RULES)
_CURRENT_RULES: contextvars.ContextVar[ShardingRules] = contextvars.ContextVar("sharding_rules", default=DEFAULT_RULES)


def rules_for(config) -> ShardingRules:
    """The rules a run places and traces with: the default table with the run's `sharding` overrides."""
    return DEFAULT_RULES.override(config.sharding)


def current_rules() -> ShardingRules:
    """The rules of the run being traced (`use_rules`), else the default table."""
    return _CURRENT_RULES.get()


@contextlib.contextmanager
def use_rules(rules: ShardingRules) -> Iterator[ShardingRules]:
    """Trace under `rules` (beside `jax.set_mesh`). A jitted function is cached by its arguments,
    not by these rules: build the step inside the context of the run that uses it (the jobs do)."""
    token = _CURRENT_RULES.set(rules)
    try:
        yield rules
    finally:
        _CURRENT_RULES.reset(token)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """`ShardingRules.constrain` with the rules in context."""
    return current_rules().constrain(x, axes)


def per_batch_shard(fn, *arrays_N: jax.Array, replicated: tuple = ()):
    """`fn` of arrays whose leading dim is tokens (or rows), run by each batch shard on its own rows
    (a shard_map over the batch axes of the mesh in context); called directly without one. For
    functions computed row by row that GSPMD does not partition: left to it, `lax.top_k` over the
    experts all-gathers every token's scores to every device, and each device routes the whole batch.

    `replicated`: arguments every shard sees whole (a weight: gathered on the way in, its gradient
    summed over the shards on the way back), passed to `fn` after the rows. Also how Pallas kernels
    run under a mesh: Mosaic calls cannot be partitioned by GSPMD, only called per device."""
    mesh = jax.sharding.get_abstract_mesh()
    rows = current_rules().spec(("batch",), (arrays_N[0].shape[0],), mesh) if not mesh.empty else PartitionSpec()
    if all(s is None for s in rows):
        return fn(*arrays_N, *replicated)
    specs = (rows,) * len(arrays_N) + (PartitionSpec(),) * len(replicated)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=rows, check_vma=False)(*arrays_N, *replicated)
