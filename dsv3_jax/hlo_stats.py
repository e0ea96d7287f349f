"""What an optimized HLO program does, read from its text: collectives (count, bytes) and kernels.

Counts are of instructions in the program text: a collective inside a loop body (a pipeline tick,
a rolled layer scan) counts once however often it runs. Bytes are each collective's result per
device (for `*-start` / `*-done` pairs, the `-done`'s result), so an all-gather counts what it
gathers and a reduce-scatter what it keeps.
"""

from __future__ import annotations

import collections
import math
import re

COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "reduce-scatter", "all-reduce",
               "collective-permute")
# custom-call targets of kernels. A Pallas kernel's call carries "pallas_call" in its op_name; XLA:TPU
# also emits Mosaic kernels of its own (ragged-dot), and XLA:GPU calls cuBLAS / cuDNN.
KERNEL_BACKENDS = {"tpu_custom_call": "Mosaic TPU", "mosaic_gpu": "Mosaic GPU", "mosaic_gpu_v2": "Mosaic GPU",
                   "__gpu$xla.gpu.triton": "Triton"}
_LIBRARY_PREFIXES = {"__cublas": "cuBLAS", "__cudnn": "cuDNN"}
PALLAS = "(Pallas)"
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1,
                "f8e5m2fnuz": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}
# "%name = SHAPE op(": SHAPE an array or a (possibly nested) tuple, e.g. ((s32[2]), s32[2]) for an async start.
_SHAPE = r"(?:\((?:[^()]|\((?:[^()]|\([^()]*\))*\))*\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)"
_INSTRUCTION = re.compile(rf"=\s*(?P<shape>{_SHAPE})\s+(?P<op>[a-z][a-z0-9-]*)\(")
_NAMED = re.compile(rf"^\s*(?:ROOT\s+)?%(?P<name>[\w.-]+)\s*=\s*(?P<shape>{_SHAPE})\s+(?P<op>[a-z][a-z0-9-]*)\((?P<args>[^)]*)")
_ARRAY = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")
_CUSTOM_CALL = re.compile(r'%(?P<name>[\w.-]+) = .*custom_call_target="(?P<target>[^"]+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_REPLICA_GROUPS = re.compile(r"replica_groups=(?:\{\{(?P<first>[0-9,]*)\}|\[[0-9]+,(?P<iota>[0-9]+)\]<=)")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string: "f32[8,128]{1,0}" or a tuple "(bf16[2,4], s32[])"."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        total += _DTYPE_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{collective: {"count", "bytes"}} for every kind in COLLECTIVES (zeros included)."""
    out = {name: {"count": 0, "bytes": 0} for name in COLLECTIVES}
    for match in _INSTRUCTION.finditer(hlo_text):
        op, shape = match.group("op"), match.group("shape")
        base = op.removesuffix("-start").removesuffix("-done")
        if base not in out:
            continue
        if not op.endswith("-done"):
            out[base]["count"] += 1
        if not op.endswith("-start"):
            out[base]["bytes"] += shape_bytes(shape)
    return out


def largest_collectives(hlo_text: str, n: int = 3) -> list[dict]:
    """The n collectives with the largest results: kind, bytes, shape and the op that issued them
    (its op_name: which part of the model the traffic belongs to)."""
    found = []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.search(line)
        if match is None:
            continue
        op = match.group("op")
        base = op.removesuffix("-start").removesuffix("-done")
        if base in COLLECTIVES and not op.endswith("-start"):
            op_name = _OP_NAME.search(line)
            found.append({"kind": base, "bytes": shape_bytes(match.group("shape")),
                          "shape": match.group("shape").split("{")[0],
                          "op": op_name.group(1) if op_name else ""})
    return sorted(found, key=lambda c: -c["bytes"])[:n]


def op_counts(hlo_text: str, ops: tuple[str, ...] = ("while", "ragged-dot", "dot", "custom-call")) -> dict[str, int]:
    counts = collections.Counter(m.group("op") for m in _INSTRUCTION.finditer(hlo_text))
    return {op: counts.get(op, 0) for op in ops}


def kernels(hlo_text: str) -> dict[str, int]:
    """{kernel kind: custom calls}: "Mosaic TPU (Pallas)", "Mosaic GPU (Pallas)", "Triton (Pallas)" for
    this package's kernels; "Mosaic TPU (XLA ragged-dot)" for XLA's own; "cuBLAS", "cuDNN"."""
    out: collections.Counter = collections.Counter()
    for line in hlo_text.splitlines():
        match = _CUSTOM_CALL.search(line)
        if match is None:
            continue
        target, op_name = match.group("target"), _OP_NAME.search(line)
        op_name = op_name.group(1) if op_name else ""
        if target in KERNEL_BACKENDS:
            backend = KERNEL_BACKENDS[target]
            if "pallas_call" in op_name:
                out[f"{backend} {PALLAS}"] += 1
            else:
                out[f"{backend} (XLA {re.sub(r'[.0-9]+$', '', match.group('name'))})"] += 1
            continue
        for prefix, kind in _LIBRARY_PREFIXES.items():
            if target.startswith(prefix):
                out[kind] += 1
    return dict(out)


def program_ops(stablehlo_text: str) -> dict[str, int]:
    """Ops of the lowered (pre-optimization) program that show which implementation was chosen:
    `ragged_dot` (grouped GEMM on GPU/TPU), `while` (CPU's blocked grouped GEMM loops, interpret-mode
    Pallas, pipeline ticks, rolled layer scans), `ragged_all_to_all`, `pallas_call`s by backend."""
    return {"ragged_dot": len(re.findall(r"\bchlo\.ragged_dot\b|\bstablehlo\.ragged_dot\b", stablehlo_text)),
            "ragged_all_to_all": len(re.findall(r"ragged_all_to_all", stablehlo_text)),
            "while": len(re.findall(r"\bstablehlo\.while\b", stablehlo_text)),
            "tpu_custom_call": len(re.findall(r"@tpu_custom_call\b", stablehlo_text)),
            "mosaic_gpu": len(re.findall(r"@mosaic_gpu", stablehlo_text))}


# Asynchronous collectives and what the schedule puts beside them -------------------------------

ASYNC = ("all-to-all", "collective-permute", "all-reduce", "all-gather", "reduce-scatter", "ragged-all-to-all")
_CALLED = re.compile(r"(?:calls|body|to_apply|condition|true_computation|false_computation)=%([\w.-]+)"
                     r"|branch_computations=\{([^}]*)\}")


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """{computation name: its instruction lines, in schedule order} of an HLO module's text."""
    out, current = {}, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{") and "%" in line:
            current = line.split("%", 1)[1].split()[0].split("(")[0]
            out[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None and line.strip():
            out[current].append(line)
    return out


def _dims(shape: str) -> list[int]:
    match = _ARRAY.search(shape)
    return [int(d) for d in match.group(2).split(",") if d] if match else []


_DOT_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([0-9,]*)\}")
_GEMM_CONTRACTING = re.compile(r'"lhs_contracting_dimensions":\[([^\]]*)\]')  # a cuBLAS call's backend config
_DIM_LABELS = re.compile(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)")
_OPERAND_LAYOUTS = re.compile(r"operand_layout_constraints=\{(.*?\})\}")  # a Mosaic call's operand shapes
_WINDOW_SIZE = re.compile(r"window=\{size=([0-9x]+)")
_GROUPS = re.compile(r"feature_group_count=([0-9]+)")


def _is_tpu_ragged_dot(line: str) -> bool:
    return "ragged-dot" in line and 'custom_call_target="tpu_custom_call"' in line


def _ragged_dot_contracted(line: str, out_dims: list[int]) -> int | None:
    """Elements each output element sums over in XLA:TPU's ragged-dot kernel (a Mosaic custom call
    whose operand shapes are in its layout constraints): [M, K] x [G, K, N] -> [M, N] sums over K
    (forward, Dgrad); [M, K] x [M, N] -> [G, K, N] over each group's rows, M in all (Wgrad)."""
    found = _OPERAND_LAYOUTS.search(line)
    if not found:
        return None
    floats = [_dims(a.group(0)) for a in _ARRAY.finditer(found.group(1)) if a.group(1).startswith(("f", "bf"))]
    if len(out_dims) == 2:
        return next((d[1] for d in floats if len(d) == 3 and d[2] == out_dims[1]), None)
    if len(out_dims) == 3:
        rows = [d[0] for d in floats if len(d) == 2]
        return rows[0] // out_dims[0] if rows else None  # per output element: its group's share of the rows
    return None


def _contracted(line: str, op: str, lhs_dims: list[int], out_dims: list[int]) -> int | None:
    """Elements each output element sums over, for the ops that multiply matrices: a `dot`; a
    `convolution` (XLA:TPU writes dots as `dim_labels=bf_io->bf`: the lhs's feature dimension x the
    window, over the feature groups); a cuBLAS custom call (dots XLA:GPU does not fuse); XLA:TPU's
    ragged-dot kernel (the routed experts' grouped GEMM). None else."""
    if op == "convolution":
        labels = _DIM_LABELS.search(line)
        if not labels or "f" not in labels.group(1):
            return None
        window, groups = _WINDOW_SIZE.search(line), _GROUPS.search(line)
        taps = math.prod(int(d) for d in window.group(1).split("x")) if window else 1
        return lhs_dims[labels.group(1).index("f")] // (int(groups.group(1)) if groups else 1) * taps
    if op == "custom-call" and _is_tpu_ragged_dot(line):
        return _ragged_dot_contracted(line, out_dims)
    found = _DOT_CONTRACTING.search(line) if op == "dot" else \
        _GEMM_CONTRACTING.search(line) if op == "custom-call" and "__cublas" in line else None
    if found is None:
        return None if op != "dot" else 1
    return math.prod(lhs_dims[int(i.strip(' "'))] for i in found.group(1).split(",") if i.strip(' "'))


def _instruction_flops(line: str, m, shapes: dict[str, str]) -> float:
    """Matmul FLOPs of one instruction itself (2 x output elements x contracted elements), not of
    the computations it calls."""
    if not m or m.group("op") not in ("dot", "convolution", "custom-call"):
        return 0.0
    first = m.group("args").split(",")[0].split()  # empty for an op without operands (a custom call's)
    lhs_dims = _dims(shapes.get(first[-1].lstrip("%"), "")) if first else []
    out_dims = _dims(m.group("shape"))
    if lhs_dims or _is_tpu_ragged_dot(line):  # the kernel's operand shapes are in its layout constraints
        k = _contracted(line, m.group("op"), lhs_dims, out_dims)
    else:
        k = 1 if m.group("op") == "dot" else None
    return 0.0 if k is None else 2.0 * math.prod(out_dims) * k


_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"([0-9]+)"\}')


def _calls_flops(line: str, flops_of) -> float:
    """FLOPs of the computations an instruction calls: a while loop's body (and condition) times the
    trip count XLA's annotator wrote in its backend config (once when unknown), every branch of a
    conditional, a fusion's computation once."""
    trips = _TRIP_COUNT.search(line) if " while(" in line else None
    return (int(trips.group(1)) if trips else 1) * sum(flops_of(c) for c in _called(line))


def computation_flops(computations: dict[str, list[str]]) -> dict[str, float]:
    """Dot FLOPs of each computation, the computations it calls (fusions, loop bodies times their
    known trip count, branches) included."""
    memo: dict[str, float] = {}

    def flops(name: str, depth: int = 0) -> float:
        if name in memo or depth > 64:
            return memo.get(name, 0.0)
        lines = computations.get(name, [])
        shapes = {m.group("name"): m.group("shape") for m in map(_NAMED.match, lines) if m}
        total = 0.0
        for line in lines:
            total += _instruction_flops(line, _NAMED.match(line), shapes)
            total += _calls_flops(line, lambda c: flops(c, depth + 1))
        memo[name] = total
        return total

    for name in computations:
        flops(name)
    return memo


def _called(line: str) -> list[str]:
    names = []
    for single, branches in _CALLED.findall(line):
        names += [single] if single else [b.strip().lstrip("%") for b in branches.split(",") if b.strip()]
    return names


def _scope(line: str, scopes: tuple[str, ...]) -> str | None:
    op_name = _OP_NAME.search(line)
    return next((s for s in scopes if op_name and s in op_name.group(1)), None)


def group_size(line: str) -> int | None:
    """Devices in each replica group of a collective (explicit `{{0,2},...}` or iota `[4,2]<=[8]`)."""
    m = _REPLICA_GROUPS.search(line)
    if not m:
        return None
    return int(m.group("iota")) if m.group("iota") else len(m.group("first").split(","))


def wire_bytes(kind: str, result_bytes: int, group: int | None) -> float:
    """Bytes one device sends for a collective whose result is `result_bytes`, in a group of `group`
    (bandwidth-optimal algorithms): an all-to-all keeps its own 1/G and sends the rest; an all-gather
    receives (G-1)/G of its result; a reduce-scatter sends (G-1) result-sized pieces; an all-reduce
    is both, 2(G-1)/G; a permute sends it all."""
    if kind == "collective-permute" or not group:
        return float(result_bytes)
    share = (group - 1) / group
    return result_bytes * {"all-to-all": share, "ragged-all-to-all": share, "all-gather": share,
                           "reduce-scatter": group - 1, "all-reduce": 2 * share}[kind]


def async_windows(hlo_text: str, scopes: tuple[str, ...] = ()) -> list[dict]:
    """Every asynchronous collective of a scheduled module: its kind, bytes (and the bytes it sends,
    `wire_bytes`), where it was issued
    (op_name), the computation it is scheduled in, and the dot FLOPs of the instructions the
    schedule placed between its start and its done (fusions and called computations included):
    the compute that can run while it moves. With `scopes` (name scopes of the program), each
    window also says which scope issued the collective and splits its FLOPs by the scope of the
    instruction that holds them (`flops_by_scope`, None for unscoped ops)."""
    computations = _computations(hlo_text)
    flops = computation_flops(computations)
    out = []
    for computation, lines in computations.items():
        parsed = [_NAMED.match(line) for line in lines]
        shapes = {m.group("name"): m.group("shape") for m in parsed if m}
        for i, m in enumerate(parsed):
            if not m or not m.group("op").endswith("-start") or m.group("op").removesuffix("-start") not in ASYNC:
                continue
            for j in range(i + 1, len(lines)):
                done = parsed[j]
                if done and done.group("op").endswith("-done") and re.search(rf"%{re.escape(m.group('name'))}\b",
                                                                             done.group("args")):
                    break
            else:
                continue
            by_scope: dict[str | None, float] = {}
            for line, p in zip(lines[i + 1:j], parsed[i + 1:j]):
                here = _instruction_flops(line, p, shapes) + _calls_flops(line, lambda c: flops.get(c, 0.0))
                if here:
                    scope = _scope(line, scopes)
                    by_scope[scope] = by_scope.get(scope, 0.0) + here
            op_name = _OP_NAME.search(lines[i])
            kind, result_bytes = m.group("op").removesuffix("-start"), shape_bytes(done.group("shape"))
            out.append({"kind": kind, "bytes": result_bytes,
                        "wire_bytes": wire_bytes(kind, result_bytes, group_size(lines[i])),
                        "flops_between": sum(by_scope.values()), "ops_between": j - i - 1,
                        "op": op_name.group(1) if op_name else "", "computation": computation,
                        "scope": _scope(lines[i], scopes), "flops_by_scope": by_scope})
    return out
