"""The `small` preset's train, pipeline and decode steps compiled for TPU and GPU targets from a CPU host.

Command:   uv run --extra tpu --extra cuda12 python experiments/compile_targets.py [--kernels] [filters]
           (--kernels: only the Pallas kernel section, rewritten in place; about a minute)
Runtime:   about 15 minutes on a 2-core CPU (each compile is 10 s to 3 min; --fp8 rows stop at the
           first Pallas kernel that does not lower, in seconds).
Shows:     what `dsv3 compile` reports for the layouts users run: per-device bytes against the
           device's memory, the collectives of the optimized program (expert all-to-all present,
           no expert weight gathered), the kernels it calls, compile time, and for every Pallas
           FP8 kernel whether it lowers for the target (and the rule it breaks when it does not).
           Writes experiments/results/compile_targets.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only targets; the host runs nothing

import jax

from dsv3_jax.jobs.compile import REPORT_KERNEL_SHAPES, kernel_lines, kernel_lowering
from dsv3_jax.targets import parse_target
from variants import RESULTS

BF16 = ["model.dtype=bfloat16"]
# small has 7 MoE layers; DualPipeV on pipeline=2 runs 4 stages, so the pipeline rows use 9 layers
# (8 MoE: 2 per stage) and 4 micro-batches of 4 sequences (batch 16 over data x expert = 4 ranks).
PIPELINE = ["model.n_layers=9", "train.microbatches=4"]
RUNS = [  # (target, what, mesh, extra overrides, schedule)
    ("tpu-v5p:2x2x1", "train", "expert=4", [], None),
    ("tpu-v5p:2x2x2", "pipeline", "data=2,pipeline=2,expert=2", PIPELINE, "dualpipev"),
    ("tpu-v5p:2x2x1", "decode", "expert=4", [], None),
    ("h100x8", "train", "data=2,expert=4", [], None),
    ("h100x8", "pipeline", "data=2,pipeline=2,expert=2", PIPELINE, "dualpipev"),
    ("h100x8", "decode", "data=2,expert=4", [], None),
]
KERNEL_TARGETS = ("tpu-v5p:2x2x1", "h100x8")


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f}"


def compile_row(target_name: str, what: str, mesh: str, extra: list[str], schedule: str | None, fp8: bool) -> dict:
    """One `dsv3 compile --json` in its own process, so that a compiler crash (an XLA CHECK failure
    aborts the process) is a row of the table, not the end of the run."""
    command = [sys.executable, "-m", "dsv3_jax.cli", "compile", "--target", target_name, "--preset", "small",
               "--mesh", mesh, "--what", what, "--json"] + [a for o in BF16 + extra for a in ("--set", o)]
    command += (["--schedule", schedule] if schedule else []) + (["--fp8"] if fp8 else [])
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    seconds = time.perf_counter() - start
    if out.returncode == 0:
        return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall_s": seconds}
    lines = [line for line in out.stderr.splitlines() if line.startswith(("dsv3:", "F1", "Check failed"))
             or "Check failed" in line]
    return {"error": (lines[-1] if lines else out.stderr.strip().splitlines()[-1])[:300], "returncode": out.returncode,
            "wall_s": seconds}


KERNEL_HEADING = "## Pallas FP8 kernels, each compiled alone"


def kernel_section(only: list[str]) -> list[str]:
    """Every Pallas kernel compiled alone for each target at the report's shapes, with the blocks it
    keeps on chip and their bytes (read from the kernel's refs: pallas_kernels/footprint.py)."""
    lines = [f"{KERNEL_HEADING} (`interpret=False`, the report's shapes: M 4096, K 7168, N 2048 / 18432, "
             "8 local experts)", "",
             "On TPU the VMEM column is what Mosaic's grid pipeline holds: two buffers of every blocked operand "
             "plus the fp32 accumulator (each compile passing means Mosaic accepted it within the target's scoped "
             "VMEM limit); SMEM holds the "
             "weight-block scales and the grouped kernel's expert ids. On GPU (Triton) a block is the window "
             "one program walks in global memory (a K loop of 128-wide tiles, 3 stages in flight), so it is "
             "not a shared-memory size.", ""]
    for target_name in KERNEL_TARGETS:
        if only and not any(f in target_name for f in only):
            continue
        lines += [f"### {target_name}", "", *kernel_lines(kernel_lowering(parse_target(target_name),
                                                                          shapes=REPORT_KERNEL_SHAPES)), ""]
    return lines


def rewrite_kernel_section(only: list[str]) -> None:
    path = RESULTS / "compile_targets.md"
    text = path.read_text()
    start = text.index(KERNEL_HEADING)
    end = text.index("\n## ", start + 1)
    path.write_text(text[:start] + "\n".join(kernel_section(only)).rstrip() + "\n" + text[end:])
    print(f"rewrote the kernel section of {path}")


def main() -> None:
    if "--kernels" in sys.argv:
        return rewrite_kernel_section([a for a in sys.argv[1:] if a != "--kernels"])
    only = sys.argv[1:]  # optional filters, e.g. "h100x8"
    rows, details, records = [], [], []
    for target_name, what, mesh, extra, schedule in RUNS:
        if only and not any(f in target_name or f == what for f in only):
            continue
        for fp8 in (False, True):
            label = f"{target_name} | {what}{' (' + schedule + ')' if schedule else ''} | {mesh} | {'fp8' if fp8 else 'bf16'}"
            r = compile_row(target_name, what, mesh, extra, schedule, fp8)
            records.append({"target": target_name, "what": what, "mesh": mesh, "fp8": fp8, **r})
            if "error" in r:
                rows.append(f"| {label} | does not compile (exit {r['returncode']}, {r['wall_s']:.0f} s): "
                            f"{r['error']} | | | | |")
                print(label, "FAILED", r["error"], flush=True)
                continue
            m, c = r["memory"], r["collectives"]
            coll = ", ".join(f"{k} {v['count']} ({v['bytes'] / 2 ** 20:.1f} MiB)" for k, v in c.items() if v["count"])
            kern = ", ".join(f"{k}: {n}" for k, n in r["kernels"].items()) or "none"
            rows.append(f"| {label} | {_gib(m['argument'])} / {_gib(m['temporary'])} / **{_gib(m['total'])}** of "
                        f"{_gib(m['device'])} | {coll} | {kern} | ragged_dot {r['program']['ragged_dot']}, "
                        f"while {r['ops']['while']} | {r['compile_s']:.0f} s |")
            details += [f"- {label}: largest collectives: " + "; ".join(
                f"{x['kind']} {x['shape']} from `{x['op'][-80:]}`" for x in r["largest"])]
            print(label, f"{r['compile_s']:.0f} s", flush=True)
    kernel_rows = kernel_section(only)
    lines = [
        "# The `small` preset compiled for TPU and GPU targets from a CPU host",
        "",
        f"`uv run --extra tpu --extra cuda12 python experiments/compile_targets.py` ({time.strftime('%Y-%m-%d')}, "
        f"jax {jax.__version__}, {os.cpu_count()}-core CPU host, no accelerator attached). `small` in bf16 "
        "(108M parameters, 16 routed experts top-4, MTP 1), train.batch_size 16 x seq_len 256; each row is "
        "`dsv3 compile --preset small --set model.dtype=bfloat16 --target T --mesh M --what W [--fp8]`.",
        "",
        "| target \\| step \\| mesh \\| GEMMs | per device GiB: arguments / temporaries / **total** of HBM | "
        "collectives in the optimized HLO (count, bytes per device) | kernels (custom calls) | grouped GEMM "
        "(lowered ragged_dot; loops left) | compile |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "Counts are HLO instructions: a collective inside a loop body (the pipeline's tick loop) counts once.",
        "\"Mosaic TPU (XLA ragged-dot-*)\" are XLA:TPU's own kernels for `ragged_dot` (the grouped GEMM of the",
        "routed experts); on GPU XLA rewrites `ragged_dot` into dense dots and fusions.",
        "",
        *kernel_rows,
        "",
        "## The largest collectives of each compile (the op that issued them)",
        "",
        *details,
    ]
    suffix = ("_" + "_".join(only)) if only else ""
    (RESULTS / f"compile_targets{suffix}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"compile_targets{suffix}.json").write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {RESULTS / f'compile_targets{suffix}.md'}")


if __name__ == "__main__":
    main()
