"""`dsv3 compile`: the real train / pipeline / decode step, compiled for a TPU or GPU target from any host.

The step is the one `dsv3 train` runs (same config, same sharding rules, same implementation
choices), built from abstract shapes on the target's compile-only devices (`dsv3_jax/targets.py`)
under `jax.set_mesh`, so every choice that depends on the platform sees the target's
(`dsv3_jax/platform.py`), not this host's. Nothing is allocated; the compiled program's
`memory_analysis()`, optimized HLO and `cost_analysis()` are what the real devices would run:

- bytes per device: arguments, outputs, temporaries, total against the device's memory;
- collectives in the optimized HLO with their bytes (`dsv3_jax/hlo_stats.py`);
- kernels: Pallas custom calls (Mosaic TPU / Mosaic GPU / Triton) and GPU library calls, and the
  loops and `ragged-dot`s that show which grouped-GEMM path was taken;
- compile seconds and the FLOPs the backend's cost model reports (per device).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax import hlo_stats
from dsv3_jax.config import Config, MeshConfig, apply_overrides
from dsv3_jax.errors import UsageError, first_line
from dsv3_jax.infer.cache import init_caches
from dsv3_jax.jobs.plan import HARDWARE, compare_with_compiled
from dsv3_jax.parallel.mesh import make_mesh
from dsv3_jax.parallel.pipeline.executor import BACKWARD_CHUNK, FORWARD_CHUNK
from dsv3_jax.parallel.sharding import DEFAULT_RULES, rules_for, use_rules
from dsv3_jax.platform import compiler_options
from dsv3_jax.targets import Target
from dsv3_jax.train.state import abstract_train_state
from dsv3_jax.train.step import make_train_step
from dsv3_jax.validate import validate
from pallas_kernels import BLOCK
from pallas_kernels.footprint import footprint
from pallas_kernels.fp8_gemm import block_scaled_matmul
from pallas_kernels.fp8_grouped_gemm import grouped_block_scaled_matmul
from pallas_kernels.fp8_quant import quantize_blocks, quantize_rows

WHATS = ("train", "pipeline", "decode")


class CompileFailure(Exception):
    """The program does not compile for the target (one line: what failed and why)."""


@dataclasses.dataclass
class CompileReport:
    target: str
    what: str
    mesh: dict[str, int]
    fp8: bool
    devices: int  # devices the mesh uses
    device_kind: str
    memory: dict[str, int]  # per device: argument, output, alias, temporary, total, device
    collectives: dict[str, dict[str, int]]
    largest: list[dict]  # the largest collectives, with the op that issued them
    kernels: dict[str, int]
    ops: dict[str, int]  # of the optimized HLO
    program: dict[str, int]  # of the lowered program: the implementation choices (hlo_stats.program_ops)
    compile_s: float
    flops: float | None  # per device, from the backend's cost model where it has one
    schedule: str | None = None
    target_platform: str = "cpu"
    overlap: dict | None = None  # per collective kind: what the schedule can hide (`overlap_summary`)
    hlo: str = dataclasses.field(default="", repr=False)  # the optimized, scheduled HLO (not in --json)

    @property
    def fits(self) -> bool:
        return self.memory["total"] <= self.memory["device"]


def target_config(config: Config, what: str, fp8: bool, schedule: str | None = None) -> Config:
    """`config` as `what` compiles it: --fp8 runs the Pallas kernels (the accelerator path)."""
    if what not in WHATS:
        raise UsageError(f"--what {what!r} must be one of {', '.join(WHATS)}")
    overrides = ["model.fp8=true", "model.fp8_backend=pallas"] if fp8 else []
    if schedule:
        overrides.append(f"train.pipeline_schedule={schedule}")
    try:
        config = apply_overrides(config, overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if what == "pipeline" and config.mesh.pipeline == 1:
        raise UsageError("--what pipeline needs a mesh with pipeline > 1, e.g. --mesh data=2,pipeline=2,expert=2")
    if what != "pipeline" and config.mesh.pipeline > 1:
        raise UsageError(f"--what {what} runs without a pipeline: use --what pipeline for mesh.pipeline="
                         f"{config.mesh.pipeline}")
    return config


def _train_program(config: Config, mesh, pipelined: bool):
    graphdef, optimizer, state = abstract_train_state(config)
    rules = rules_for(config)
    shardings = rules.tree(state, mesh, config.train.zero1)
    tc = config.train
    batch = jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len + 1), np.int32)
    step = jax.jit(make_train_step(config, graphdef, optimizer, pipeline_mesh=mesh if pipelined else None),
                   in_shardings=(shardings, rules.batch(mesh)), out_shardings=(shardings, rules.sharding((), mesh)),
                   donate_argnums=0)
    return step, (state, batch)


def _decode_program(config: Config, mesh):
    """One cached decode step (absorbed MLA, report §2.1.1) of train.batch_size rows against a
    latent cache of model.max_seq_len slots."""
    graphdef, _, state = abstract_train_state(config)
    weights = (state.params, state.routing_bias)
    B, S = config.train.batch_size, config.model.max_seq_len
    caches = jax.eval_shape(lambda: init_caches(config.model, B, S, "absorbed", jnp.bfloat16))
    rules = rules_for(config)
    cache_sharding = lambda a: rules.sharding((None, "batch") + (None,) * (a.ndim - 2), mesh, a.shape)
    tokens = jax.ShapeDtypeStruct((B, 1), np.int32)

    def decode(weights, caches, tokens_BT, positions_BT):
        return nnx.merge(graphdef, *weights).decode(tokens_BT, positions_BT, caches, "absorbed")

    step = jax.jit(decode, in_shardings=(rules.tree(weights, mesh), jax.tree.map(cache_sharding, caches),
                                         rules.batch(mesh), rules.batch(mesh)), donate_argnums=1)
    return step, (weights, caches, tokens, tokens)


@contextlib.contextmanager
def _no_persistent_cache():
    """Compile-only devices have no client to load a cached executable with (JAX warns and
    recompiles), and their programs are not worth storing: keep them out of the cache."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)


def _memory(compiled, device_bytes: int) -> dict[str, int]:
    m = compiled.memory_analysis()
    argument, output, alias, temp = (int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                                     int(m.alias_size_in_bytes), int(m.temp_size_in_bytes))
    # Donated outputs alias their arguments: counted once.
    return {"argument": argument, "output": output, "alias": alias, "temporary": temp,
            "total": argument + output - alias + temp, "device": device_bytes}


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend has a cost model
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    flops = cost.get("flops") if isinstance(cost, dict) else None
    return float(flops) if flops and flops > 0 else None


PAIR_SCOPES = (FORWARD_CHUNK, BACKWARD_CHUNK)  # the name scopes of an F&B pair's two chunks
# Peaks and links for the overlap estimate (jobs/plan.py's table), by target kind.
_OVERLAP_HARDWARE = {"h100": "h100", "h800": "h800", "h200": "h100", "v5p": "tpu-v5p"}


def other_chunk_flops(window: dict) -> float:
    """FLOPs in an `async_windows` window from ops of another named scope than the one that issued
    the collective (in an F&B pair: the other micro-batch's chunk); 0 for an unscoped collective."""
    if window.get("scope") is None:
        return 0.0
    return sum(f for scope, f in window["flops_by_scope"].items() if scope not in (None, window["scope"]))


def window_seconds(window: dict, flops: float, hardware) -> tuple[float, float]:
    """An `async_windows` window's transfer time (the bytes the device sends over its intra-host link)
    and the time of `flops` at the device's bf16 peak."""
    return window["wire_bytes"] / hardware.node_link_bytes_per_s, flops / hardware.bf16_flops


def overlap_summary(windows: list[dict], hardware=None) -> dict:
    """What the schedule can hide, from `hlo_stats.async_windows` of a scheduled program.

    by_kind: per collective kind, its asynchronous windows, their bytes, the windows with compute
    scheduled inside, the bytes "hidden": those of windows whose compute takes at least the
    transfer's own time (dot FLOPs at the device's bf16 peak against the bytes the device sends,
    `wire_bytes`, over its intra-host link), and the fraction of all transfer time that compute
    covers (each window's min(compute, transfer)). An estimate from the schedule, not a timing: real
    kernels run below peak and links share bandwidth. Without `hardware` (no figures for the target)
    only the counts.
    pair: DualPipe's F&B pairs (report §3.2.1, Figure 4): the all-to-alls each chunk of a pair
    issues, and those with the OTHER chunk's GEMMs inside their window (the overlap DualPipe is
    for), with the bytes and the transfer time that compute hides; zeros for a schedule without pairs."""
    def add(row, w, flops, prefix=""):
        transfer_s, compute_s = window_seconds(w, flops, hardware) if hardware is not None else (0.0, 0.0)
        row[prefix + "bytes_hidden"] += w["bytes"] if hardware is not None and flops and compute_s >= transfer_s else 0
        row[prefix + "transfer_s"] += transfer_s
        row[prefix + "covered_s"] += min(transfer_s, compute_s)

    def fractions(row, prefix=""):
        if hardware is None:
            row[prefix + "fraction_hidden"] = row[prefix + "fraction_covered"] = None
            return
        row[prefix + "fraction_hidden"] = row[prefix + "bytes_hidden"] / max(row["bytes"], 1)
        row[prefix + "fraction_covered"] = row[prefix + "covered_s"] / max(row[prefix + "transfer_s"], 1e-30)

    by_kind: dict[str, dict] = {}
    for w in windows:
        row = by_kind.setdefault(w["kind"], {"windows": 0, "bytes": 0, "with_compute": 0, "bytes_hidden": 0,
                                             "transfer_s": 0.0, "covered_s": 0.0})
        row["windows"] += 1
        row["bytes"] += w["bytes"]
        row["with_compute"] += w["flops_between"] > 0
        add(row, w, w["flops_between"])
    for row in by_kind.values():
        fractions(row)
    pair = {"all_to_alls": 0, "bytes": 0, "with_other_chunk": 0, "bytes_with_other_chunk": 0,
            "other_chunk_flops": 0.0, "by_other_chunk_bytes_hidden": 0, "by_other_chunk_transfer_s": 0.0,
            "by_other_chunk_covered_s": 0.0}
    for w in windows:
        if w["kind"] not in ("all-to-all", "ragged-all-to-all") or w.get("scope") is None:
            continue
        other = other_chunk_flops(w)
        pair["all_to_alls"] += 1
        pair["bytes"] += w["bytes"]
        pair["with_other_chunk"] += other > 0
        pair["bytes_with_other_chunk"] += w["bytes"] if other > 0 else 0
        pair["other_chunk_flops"] += other
        add(pair, w, other, "by_other_chunk_")
    fractions(pair, "by_other_chunk_")
    return {"by_kind": by_kind, "pair": pair}


def compile_step(config: Config, target: Target, what: str = "train", fp8: bool = False,
                 schedule: str | None = None, devices: list | None = None, overlap: bool = False) -> CompileReport:
    """Compile `what` of `config` for `target` (its compile-only devices, or `devices` given)."""
    config = target_config(config, what, fp8, schedule)
    devices = target.devices() if devices is None else devices
    need = config.mesh.n_devices
    if need > len(devices):
        raise UsageError(f"the mesh {_mesh_text(config)} needs {need} devices but {target.name} has {len(devices)}")
    validate(config, devices)
    mesh = make_mesh(config.mesh, devices)
    start = time.perf_counter()
    with jax.set_mesh(mesh), use_rules(rules_for(config)), _no_persistent_cache():
        try:
            step, args = _decode_program(config, mesh) if what == "decode" else \
                _train_program(config, mesh, pipelined=what == "pipeline")
            lowered = step.lower(*args)
            compiled = lowered.compile(compiler_options=compiler_options(target.platform))
        except UsageError:
            raise
        except Exception as e:  # tracing, lowering (a Pallas block rule) or XLA: one line
            raise CompileFailure(_why(e, target, fp8)) from None
    compile_s = time.perf_counter() - start
    text = compiled.as_text()
    return CompileReport(
        target=target.name, what=what, mesh={a: n for a, n in config.mesh.sizes().items() if n > 1} or {"data": 1},
        fp8=fp8, devices=need, device_kind=devices[0].device_kind,
        memory=_memory(compiled, target.memory_per_device(len(devices))), collectives=hlo_stats.collectives(text),
        largest=hlo_stats.largest_collectives(text),
        kernels=hlo_stats.kernels(text), ops=hlo_stats.op_counts(text),
        program=hlo_stats.program_ops(lowered.as_text()), compile_s=compile_s, flops=_flops(compiled),
        schedule=config.train.pipeline_schedule if what == "pipeline" else None, target_platform=target.platform,
        overlap=_overlap(text, target) if overlap else None, hlo=text)


def _overlap(hlo_text: str, target: Target) -> dict:
    windows = hlo_stats.async_windows(hlo_text, PAIR_SCOPES)
    key = _OVERLAP_HARDWARE.get(target.kind)
    return overlap_summary(windows, HARDWARE[key] if key else None)


def _mesh_text(config: Config) -> str:
    return ",".join(f"{a}={n}" for a, n in config.mesh.sizes().items() if n > 1) or "data=1"


def _why(error: Exception, target: Target, fp8: bool) -> str:
    """One line: which Pallas kernel failed to lower for the target (when --fp8), or the compiler's error."""
    gist = first_line(error)
    if fp8:
        for kernel in kernel_lowering(target):
            if kernel["error"]:
                return f"the FP8 step does not compile for {target.name}: Pallas kernel {kernel['kernel']} " \
                       f"does not lower: {kernel['error']}"
    return f"does not compile for {target.name}: {gist}"


# Each Pallas kernel alone at a shape of the recipe (report §3.3: 1x128 tiles, 128x128 blocks):
# name -> (function(platform) -> jitted callable, abstract arguments).
def _kernel_cases(m: int = 256, k: int = 1024, n: int = 256, experts: int = 4) -> dict[str, tuple[Any, tuple]]:
    f32, e4m3 = jnp.float32, jnp.float8_e4m3fn
    spec = jax.ShapeDtypeStruct
    return {
        "quantize_rows": (lambda p: lambda x: quantize_rows(x, platform=p), (spec((m, k), f32),)),
        "quantize_blocks": (lambda p: lambda w: quantize_blocks(w, platform=p), (spec((k, n), f32),)),
        "block_scaled_matmul": (lambda p: lambda *a: block_scaled_matmul(*a, platform=p),
                                (spec((m, k), e4m3), spec((m, k // BLOCK), f32), spec((k, n), e4m3),
                                 spec((k // BLOCK, n // BLOCK), f32))),
        "grouped_block_scaled_matmul": (lambda p: lambda *a: grouped_block_scaled_matmul(*a, platform=p),
                                        (spec((m, k), e4m3), spec((m, k // BLOCK), f32), spec((experts, k, n), e4m3),
                                         spec((experts, k // BLOCK, n // BLOCK), f32), spec((m // BLOCK,), jnp.int32))),
    }


# The report's shapes (issue 30, DeepGEMM's table): M 4096 tokens, K 7168 (d_model), N 2048 (an
# expert's FFN width) and 18432 (the dense FFN); the grouped GEMM over 8 local experts.
REPORT_KERNEL_SHAPES = ((4096, 7168, 2048, 8), (4096, 7168, 18432, 8))
UNIT_KERNEL_SHAPES = ((256, 1024, 256, 4),)


def kernel_lowering(target: Target, devices: list | None = None,
                    shapes: tuple[tuple[int, int, int, int], ...] = UNIT_KERNEL_SHAPES) -> list[dict]:
    """Every Pallas kernel compiled alone for one device of the target (`interpret=False`) at each
    (M, K, N, experts) of `shapes`: [{"kernel", "shape", "custom_calls": {kind: n}, "error": None or
    the first line of why it does not lower, "footprint": on-chip blocks and bytes}]."""

    devices = target.devices() if devices is None else devices
    mesh = make_mesh(MeshConfig(), devices[:1])
    one_device = DEFAULT_RULES.sharding((), mesh)  # replicated: the same under any table
    rows, seen = [], set()
    for m, k, n, experts in shapes:
        for name, (make, args) in _kernel_cases(m, k, n, experts).items():
            key = (name, tuple(a.shape for a in args))
            if key in seen:  # quantize_rows does not depend on N
                continue
            seen.add(key)
            row = {"kernel": name, "platform": target.platform, "shape": [list(a.shape) for a in args],
                   "custom_calls": {}, "error": None, "footprint": None}
            try:
                with jax.set_mesh(mesh), _no_persistent_cache():  # Mosaic TPU lowering asks the mesh in context for the device kind
                    fn = jax.jit(make(target.platform), in_shardings=(one_device,) * len(args))
                    row["footprint"] = footprint(fn, *args)
                    row["custom_calls"] = hlo_stats.kernels(fn.lower(*args).compile().as_text())
            except Exception as e:
                row["error"] = first_line(e, 300)
            rows.append(row)
    return rows


def kernel_lines(rows: list[dict]) -> list[str]:
    """`dsv3 compile --kernels`: one table row per kernel and shape."""
    lines = ["| Pallas kernel | operands | lowers to | grid | blocks | VMEM (double-buffered) | SMEM |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        calls = ", ".join(f"{kind}: {n}" for kind, n in row["custom_calls"].items()) or "-"
        lowered = f"does not lower: {row['error']}" if row["error"] else calls
        shapes = " ".join("x".join(map(str, s)) for s in row["shape"])
        for call in row["footprint"] or [{}]:
            blocks = ", ".join(f"{'x'.join(map(str, s))} {d}{' (' + sp + ')' if sp != 'blocked' else ''}"
                               for s, d, sp in call.get("blocks", []))
            grid = "x".join(map(str, call.get("grid", ()))) or "-"
            if row["platform"] == "gpu":  # Triton: blocks are windows in global memory, not on-chip buffers
                onchip = "- | -"
            else:
                onchip = f"{call.get('vmem_bytes', 0) / 2 ** 10:,.0f} KiB | {call.get('smem_bytes', 0):,} B"
            lines.append(f"| `{row['kernel']}` | {shapes} | {lowered} | {grid} | {blocks or '-'} | {onchip} |")
    return lines


def planned_vs_compiled(planned, report: CompileReport, config: Config) -> list[tuple[str, str]]:
    """`dsv3 plan --compile`: the planner's per-device state and temporaries beside the compiler's."""
    compared = compare_with_compiled(planned, config, report.memory["argument"], report.memory["temporary"])
    (planned_state, compiled_state), (planned_temps, compiled_temps) = compared["state"], compared["temporaries"]
    on = f"{report.target} ({report.what})"
    return [(f"compiled on {on}: state (arguments less the batch)", _gib(compiled_state)),
            ("planned state / compiled", f"{planned_state / max(compiled_state, 1):.2f}"),
            (f"compiled on {on}: temporaries", _gib(compiled_temps)),
            ("planned gradients + activations + gathered / compiled temporaries",
             f"{planned_temps / max(compiled_temps, 1):.2f}"),
            (f"compiled on {on}: total per device", f"{_gib(report.memory['total'])} of {_gib(report.memory['device'])}")]


def options_text(platform: str) -> str:
    """The compiler options `platform.py` sets for `platform`, as flags."""
    options = compiler_options(platform)
    return ", ".join(f"--{k}={str(v).lower()}" for k, v in options.items()) or "none needed (XLA's defaults)"


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def report_lines(report: CompileReport) -> list[str]:
    """The human-readable report (markdown)."""
    m = report.memory
    fit = "fits" if report.fits else f"does NOT fit by {_gib(m['total'] - m['device'])}"
    mesh = ",".join(f"{a}={n}" for a, n in report.mesh.items())
    lines = [f"## {report.what}{' (fp8)' if report.fp8 else ''} on {report.target} ({report.devices} x "
             f"{report.device_kind}), mesh {mesh}" + (f", schedule {report.schedule}" if report.schedule else ""), "",
             f"compiler options: {options_text(report.target_platform)}", "",
             f"compiled in {report.compile_s:.1f} s" + (f"; {report.flops / 1e12:.3f} TFLOP per device (cost model)"
                                                         if report.flops else ""), "",
             "| per device | bytes |", "|---|---|"]
    lines += [f"| {k} | {_gib(m[k])} |" for k in ("argument", "output", "alias", "temporary")]
    lines += [f"| **total** | **{_gib(m['total'])}** of {_gib(m['device'])}: {fit} |", "",
              "| collective | count | bytes per device |", "|---|---|---|"]
    lines += [f"| {name} | {c['count']} | {c['bytes']:,} |" for name, c in report.collectives.items()]
    lines += [f"- largest: {c['kind']} {c['shape']} from `{c['op'][-90:]}`" for c in report.largest]
    kernels = ", ".join(f"{kind}: {n}" for kind, n in report.kernels.items()) or "none"
    ops = ", ".join(f"{op}: {n}" for op, n in report.ops.items())
    program = ", ".join(f"{op}: {n}" for op, n in report.program.items())
    lines += ["", f"kernels (custom calls): {kernels}", f"optimized HLO ops: {ops}", f"lowered program ops: {program}"]
    if report.overlap:
        lines += ["", "| asynchronous collective | windows | with compute inside | bytes | bytes hidden | "
                      "transfer time covered (estimates) |", "|---|---|---|---|---|---|"]
        lines += [f"| {kind} | {r['windows']} | {r['with_compute']} | {r['bytes']:,} | "
                  + (f"{r['fraction_hidden']:.1%} | {r['fraction_covered']:.1%} |" if r["fraction_hidden"] is not None
                     else "- | - |")
                  for kind, r in report.overlap["by_kind"].items()]
        p = report.overlap["pair"]
        if p["all_to_alls"]:
            lines += ["", f"F&B pairs: {p['with_other_chunk']} of their {p['all_to_alls']} all-to-alls have the other "
                          f"chunk's GEMMs inside ({p['bytes_with_other_chunk']:,} of {p['bytes']:,} bytes; "
                          f"{p['other_chunk_flops'] / 1e9:.1f} GFLOP); hidden by it: {p['by_other_chunk_bytes_hidden']:,} bytes"
                          + (f", {p['by_other_chunk_fraction_covered']:.1%} of their transfer time covered"
                             if p["by_other_chunk_fraction_covered"] is not None else "")]
    return lines


def as_json(report: CompileReport) -> dict:
    out = {**dataclasses.asdict(report), "fits": report.fits}
    del out["hlo"]
    return out
