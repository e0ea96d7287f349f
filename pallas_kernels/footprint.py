"""What each Pallas kernel keeps on chip, read from the kernel itself (not restated by hand).

A `pallas_call`'s kernel jaxpr takes one Ref per operand with its block shape and memory space. On
TPU, Mosaic's grid pipeline double-buffers every blocked operand (memory space "default": the next
block is copied in while this one is used) and allocates scratch (VMEM) once; SMEM operands that are
whole arrays (scalars, scalar prefetch) are held once, SMEM blocks of a larger array twice. On GPU
(Triton) a block is the window one program addresses in global memory; the loaded tiles live in
registers / shared memory as Triton decides, so the blocks are reported but not summed as VMEM.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax


def _pallas_calls(jaxpr) -> list:
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn)
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                found += _pallas_calls(inner)
    return found


def _ref_bytes(aval) -> int:
    inner = getattr(aval, "inner_aval", aval)
    return math.prod(inner.shape) * inner.dtype.itemsize


def footprint(fn: Callable, *args: Any) -> list[dict]:
    """For each pallas_call in fn(*args) (args: arrays or ShapeDtypeStructs; nothing runs):
    {"grid", "blocks": [(shape, dtype, memory space)], "vmem_bytes": 2 x blocked operands + scratch,
    "smem_bytes": whole SMEM operands and scalar prefetch once, SMEM blocks of a larger array twice
    (they are pipelined like VMEM blocks)} in call order."""
    rows = []
    for eqn in _pallas_calls(jax.make_jaxpr(fn)(*args).jaxpr):
        grid_mapping = eqn.params["grid_mapping"]
        refs = eqn.params["jaxpr"].invars  # [scalar prefetch..., inputs and outputs..., scratch...]
        first_block = grid_mapping.num_index_operands
        partial = {first_block + i for i, m in enumerate(grid_mapping.block_mappings)
                   if math.prod(m.block_aval.shape) < math.prod(m.array_aval.shape)}
        blocks, vmem, smem = [], 0, 0
        for position, var in enumerate(refs):
            aval = var.aval
            inner = getattr(aval, "inner_aval", aval)
            space = str(getattr(aval, "memory_space", None) or "default").lower()
            space = "smem" if "smem" in space else "vmem scratch" if "vmem" in space else "blocked"
            blocks.append((tuple(inner.shape), str(inner.dtype), space))
            n = _ref_bytes(aval)
            if space == "smem":
                smem += 2 * n if position in partial else n
            else:
                vmem += 2 * n if space == "blocked" else n
        rows.append({"grid": tuple(grid_mapping.grid), "blocks": blocks, "vmem_bytes": vmem, "smem_bytes": smem})
    return rows
