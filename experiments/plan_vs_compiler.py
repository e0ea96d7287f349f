"""The planner's per-device bytes beside what XLA allocates for the same step on GPU and TPU targets.

Command:   uv run --extra tpu --extra cuda12 python experiments/plan_vs_compiler.py [filters]
           (filters: substrings of a row's label, e.g. "h100x8" or "671B"; the file is rewritten
           with the rows that ran)
Runtime:   about 20 minutes on a 2-core CPU (1-3 min per `small` compile; the 671B rows longer).
Shows:     for three meshes of `small` and a pipelined one, compiled for 8 H100s and a v5p slice
           from this CPU host, and for DeepSeek-V3's widths on the report's 2,048-GPU mesh: the
           planner's state (parameters + optimizer) and temporaries (gradients + activations + the
           gathered weights outside the MoE stack) over `compiled.memory_analysis()`'s argument
           bytes (less the token batch) and temporary bytes. The planner is `dsv3 plan`
           (dsv3_jax/jobs/plan.py); each compile runs in its own process, so a compiler abort is a
           row, not the end of the run. Writes experiments/results/plan_vs_compiler.md (+ .json).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only targets; the host runs nothing

RESULTS = Path(__file__).parent / "results"
BF16 = ["model.dtype=bfloat16"]
# small has 7 MoE layers; a pipeline of 2 ranks (4 DualPipeV stages) needs 8: 9 layers. DualPipe
# needs at least 2P micro-batches: 4.
PIPELINE = ["model.n_layers=9", "train.microbatches=4"]
# The report's layout (§3.2, §4.2) with its savings: ZeRO-1, bf16 moments, the report's
# recomputation, chunked cross-entropy, DualPipe over 16 ranks. 3 dense + 32 MoE layers (one per
# DualPipe stage) instead of 61: 58 MoE layers do not split into 32 equal stages, and the stack is
# scanned, so the per-stage program is the same.
V3 = ["train.seq_len=4096", "train.batch_size=15360", "train.microbatches=120", "train.pipeline_schedule=dualpipe",
      "train.zero1=true", "train.bf16_moments=true", "model.remat=report", "train.ce_chunk=512", "model.n_layers=35"]
V3_MESH = "data=2,pipeline=16,expert=64"

CASES = [  # (label, preset, target, mesh, overrides)
    *[(f"small {mesh} on {target}", "small", target, mesh, BF16)
      for target in ("h100x8", "tpu-v5p:2x2x2")
      for mesh in ("data=8", "data=2,expert=4", "data=2,tensor=2,expert=2")],
    *[(f"small data=2,pipeline=2,expert=2 {schedule} on {target}", "small", target, "data=2,pipeline=2,expert=2",
       BF16 + PIPELINE + [f"train.pipeline_schedule={schedule}"])
      for target in ("h100x8", "tpu-v5p:2x2x2") for schedule in ("1f1b", "dualpipe", "dualpipev")],
    ("671B widths, 35 layers, report mesh on h800x2048/256", "deepseek-v3-671b", "h800x2048/256", V3_MESH, V3),
]


READING = [
    "## Reading", "",
    "- What the first runs of this comparison found, both fixed (2026-12-07). (1) XLA:GPU lowers `ragged_dot` "
    "densely, every row against every local expert, as XLA:CPU does: `small` on data=2,expert=4 for 8 H100s held "
    "2.18 GiB of temporaries (64 MiB f32[4, 8192, 512] buffers), planned/compiled 0.45; GPU programs now take the "
    "128-row blocked loops (model/grouped_gemm.py): 1.20 GiB, 0.82 (fp32; the bf16 row above 0.97). (2) Inside the "
    "pipeline's shard_map GSPMD made the stages' gradient accumulators whole over `expert` and all-gathered the "
    "expert weights to match: 1F1B on data=2,pipeline=2,expert=2 held 0.72 GiB of temporaries, four [4, 16, 512, "
    "512] fp32 accumulators among them, planned/compiled 0.52; the 671B row held 391.78 GiB per GPU (planned/"
    "compiled 0.23). The executor now constrains the stages a rank runs and their accumulators to each layer's own "
    "layout (train/pipelined.py `layer_layout`): 0.53 GiB for `small`, 80.13 GiB (with the arguments 85.96 GiB of "
    "an H800's 80) for the 671B row. The 671B row's state was planned at 1.70x until the planner stopped counting "
    "DualPipe's mirrored stage as stored (it is received for the step: a gathered buffer).",
    "- The 671B row is this package as it compiles today (padded all-to-all buffers: bf16[262144, 7168] receive "
    "buffers of 3.5 GiB; the [T, T] scores; bf16 GEMMs), so it does not fit by 6 GiB; the planner's own report "
    "layout with FP8, fused attention and dropless dispatch (experiments/results/plan_deepseek_v3.md) is 71 GB. "
    "35 layers instead of 61: 58 MoE layers do not split into 32 equal DualPipe stages (the executor's stages are "
    "equal), and the stack is scanned, so a stage's program is the same at any depth.",
    "- The pipelined rows (2026-12-07, second pass). XLA:GPU allocates, beside the stored stages and the "
    "stored-layout gradients the executor returns, the tick loop's copy of the stages a rank runs (stacked by "
    "slot, parallel/pipeline/executor.py `to_slots`) and their fp32 gradient accumulators: `small` DualPipeV "
    "held f32[2,2,8,512,512] buffers of both (the memory-usage report of its buffer assignment), and the planner, "
    "which counted neither, was at 0.54 of its temporaries. It now counts one more share of the stack in each "
    "(jobs/plan.py): 1F1B 1.01, DualPipe 0.82, DualPipeV 0.90 on 8 H100s (0.70 / 0.59 / 0.40 in the first pass, "
    "before this session's executor and block changes and the planner fix), and 1.10 / 0.86 / 0.89 for `tiny` on 8 "
    "host devices (tests/test_plan.py). The 671B row was planned and compiled before this (its planned "
    "temporaries would add 13.1 GB; not re-compiled: 19 minutes).",
    "- XLA:TPU compiles the pipelined rows since 2026-12-07 (until then every pipelined step with a data or "
    "expert axis beside `pipeline` aborted the process: an unrolled `lax.scan` of a stage's layers around the "
    "router's nested shard_map tripped `spmd_partitioner.cc:560 IsManualSubgroup`, and the first stage's `cond` "
    "returned its branches in different layouts; model/block.py and the executor fixed both, "
    "tests/test_compile.py guards them). Its pipelined temporaries: 1F1B 0.96, DualPipe 0.72, DualPipeV 0.74 of "
    "the planner's; XLA:TPU holds more than XLA:GPU for the two DualPipe schedules (1.14 and 0.76 GiB against "
    "1.01 and 0.62), not yet read off its buffer assignment.",
    "- Third pass (2026-12-07, later). The copy the second pass found was not the slot stack alone: read off "
    "the buffer assignment of 1F1B on 8 H100s, XLA:GPU copies the f32 expert weights into the layout the tick "
    "loop's GEMMs read (3 x 32 MiB), and the backward branches hold a stage's gradients beside the "
    "accumulators. The executor now reads a rank's stored stages in place, accumulates their gradients in "
    "the stored layout by a masked add (DualPipe 1009 -> 985 MiB of temporaries on 8 H100s; a scatter-add "
    "copied the accumulator into the branch), and receives only stages stored elsewhere (DualPipe's mirrored "
    "one, DualPipeV's); the planner counts those received stages and one stage backward's gradients, no slot "
    "copy. Planned/compiled temporaries: 8 H100s 1F1B 0.82, DualPipe 0.78, DualPipeV 1.01; v5p 1F1B 0.78, "
    "DualPipe 0.63, DualPipeV 0.80; tiny on 8 host devices 1.04 / 0.85 / 0.92. The v5p DualPipe row is outside "
    "the 30%: XLA:TPU keeps bf16 copies of whole stages' expert weights (about ten bf16[1,4,8,512,512] "
    "buffers live at the peak) and writes the masked add of both accumulators out of place (2 x 2 x 32 MiB), "
    "neither of which the planner models. The 671B row (re-compiled, 35 layers): state 1.00, temporaries "
    "1.30 (the planner over-counts by 23 GB; compiled 78.09 GiB of temporaries, 80.13 before).",
    "- Tried and not adopted: `Format(Layout.AUTO)` for the train state's shardings lets XLA pick the "
    "parameters' layouts, which removed the weight copy (1F1B on 8 H100s 638 -> 538 MiB, on v5p 668 -> 628); "
    "the train loop would have to compile ahead of time and place the state (and every restored checkpoint) in "
    "the compiler's layouts. One switch branch per (kind, own or received stage), so no branch picks between "
    "two stages at run time: DualPipe on 8 H100s 985 -> 963 MiB for 40% more compile time, on v5p 1221 -> 1371 "
    "MiB.",
    "- What travels, in the compiled program (XLA:CPU, 4 host devices, a toy stage of 32 KiB of weights, "
    "2026-12-07; tests/test_pipeline_executor.py): collective-permutes of stage weights, per weight, 1F1B 0, "
    "DualPipe 2 (the mirrored stage in, its gradient back), DualPipeV 8; temporaries 53.0 / 177.3 / 183.8 KB "
    "against 53.1 / 226.2 / 194.2 KB with the stacked slot copy: DualPipe holds 3.9 stages more than 1F1B, "
    "5.4 before. (Session 4: a DualPipeV rank, which reads no stage in place, no longer carries an "
    "accumulator for its own stages through the tick loop; XLA had already dropped it: the same 53,080 / "
    "177,472 / 183,912 bytes.)", ""]


def one(index: int) -> dict:
    """Plan and compile case `index` in this process; the numbers as a dict."""
    from dsv3_jax.config import apply_overrides, get_preset
    from dsv3_jax.jobs.compile import compile_step
    from dsv3_jax.jobs.plan import HARDWARE, Layout, check_layout, compare_with_compiled, plan
    from dsv3_jax.targets import parse_target

    _, preset, target, mesh, overrides = CASES[index]
    config = apply_overrides(get_preset(preset), overrides + [f"mesh.{kv}" for kv in mesh.split(",")])
    layout = Layout(config, config.mesh.sizes(), HARDWARE["h100"])
    check_layout(layout)
    planned = plan(layout)
    report = compile_step(config, parse_target(target), "pipeline" if config.mesh.pipeline > 1 else "train")
    compared = compare_with_compiled(planned, config, report.memory["argument"], report.memory["temporary"])
    return {"state": compared["state"], "temporaries": compared["temporaries"], "compile_s": report.compile_s,
            "device_bytes": report.memory["device"], "total": report.memory["total"],
            "planned": {"params": planned.params, "grads": planned.grads, "optimizer": planned.optimizer,
                        "activations": planned.activations, "gathered": planned.gathered}}


def run_case(index: int) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--one", str(index)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode == 0:
        return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall_s": seconds}
    lines = [line for line in out.stderr.splitlines() if "Check failed" in line or line.startswith(("dsv3", "F1"))]
    tail = out.stderr.strip().splitlines() or ["(no output)"]
    return {"error": (lines[-1] if lines else tail[-1])[:300], "returncode": out.returncode, "wall_s": seconds}


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:,.2f}"


def _row(label: str, r: dict) -> str:
    if "error" in r:
        return f"| {label} | does not compile (exit {r['returncode']}, {r['wall_s']:.0f} s): `{r['error']}` | | | | | | |"
    (ps, cs), (pt, ct) = r["state"], r["temporaries"]
    return (f"| {label} | {_gib(ps)} | {_gib(cs)} | **{ps / cs:.2f}** | {_gib(pt)} | {_gib(ct)} | **{pt / ct:.2f}** | "
            f"{r['compile_s']:.0f} s |")


def main() -> None:
    only = sys.argv[1:]
    saved = RESULTS / "plan_vs_compiler.json"
    records = {r["label"]: r for r in json.loads(saved.read_text())} if saved.exists() else {}
    for index, (label, preset, target, mesh, overrides) in enumerate(CASES):
        if only and not any(f in label for f in only):
            continue
        r = run_case(index)
        print(label, json.dumps(r), flush=True)
        records[label] = {"label": label, "target": target, "mesh": mesh, "overrides": overrides, **r,
                          "date": time.strftime("%Y-%m-%d")}
        saved.write_text(json.dumps([records[c[0]] for c in CASES if c[0] in records], indent=1))
    rows = [_row(label, records[label]) for label, *_ in CASES if label in records]
    lines = ["# The planner against the compiler on GPU and TPU targets", "",
             "`uv run --extra tpu --extra cuda12 python experiments/plan_vs_compiler.py` (compiled from a 2-core "
             "CPU host, jax 0.10.2, libtpu and jax-cuda12-plugin of the lock file; each row's date is in the "
             ".json beside).", "",
             "Per device, GiB. State: parameters + optimizer state (planned) against the step's argument bytes "
             "less the token batch (compiled). Temporaries: gradients + activations + the weights gathered for "
             "the step (planned) against `memory_analysis().temp_size_in_bytes`. "
             f"`small` rows in bf16 compute ({', '.join(BF16)}); pipelined rows {', '.join(PIPELINE)}. The 671B "
             f"row: {', '.join(V3)} on {V3_MESH}. The planner is asked what this package compiles: padded "
             "all-to-all buffers, the [T, T] attention scores kept (no fused attention).", "",
             "| case | planned state | compiled state | ratio | planned temporaries | compiled temporaries | ratio "
             "| compile |", "|---|---|---|---|---|---|---|---|", *rows, "", *READING]
    (RESULTS / "plan_vs_compiler.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(one(int(sys.argv[2]))))
    else:
        main()
