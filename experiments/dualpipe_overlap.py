"""DualPipe's computation-communication overlap (report §3.2.1, Figure 4), read from the scheduled program.

Command:   uv run --extra tpu --extra cuda12 python experiments/dualpipe_overlap.py [--targets h100x8 tpu-v5p:2x2x2]
Runtime:   about 10 minutes on a 2-core CPU (each compile 1-3 min; each in its own process, so a
           compiler that aborts costs its row, not the run).
Shows:     `small` with 8 MoE layers (n_layers 9), in bf16, on 8 devices, data=2,pipeline=2,expert=2, compiled
           for an 8 x H100 host and a v5p slice from this CPU host, with DualPipeV, 1F1B, and expert
           parallelism without a pipeline (data=4,expert=2: one micro-batch, nothing to pair with).
           For every asynchronous all-to-all of the optimized program: its bytes and the GEMM FLOPs
           XLA's latency-hiding scheduler placed between its start and its done, split by chunk
           (in an F&B pair: the all-to-all's own chunk or the other micro-batch's), and the bytes
           whose window holds at least their own transfer time of compute at the target's bf16 peak
           and intra-host link, and the share of transfer time compute covers (estimates from the
           schedule, not timings; a transfer is the bytes that leave the device, `wire_bytes`).
           Writes experiments/results/dualpipe_overlap.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only targets; the host runs nothing

from variants import RESULTS

# 8 MoE layers (4 stages of 2 on DualPipeV's V), computing in bf16 as the report's training does (its
# GEMMs in FP8, §3.3): the estimate times GEMMs at the bf16 peak, and the dispatch moves bf16 rows.
SMALL = ["model.n_layers=9", "train.batch_size=32", "model.dtype=bfloat16"]
CASES = {  # name -> (what, mesh, schedule)
    "dualpipev": ("pipeline", "data=2,pipeline=2,expert=2", "dualpipev"),
    "1f1b": ("pipeline", "data=2,pipeline=2,expert=2", "1f1b"),
    "ep, no pipeline": ("train", "data=4,expert=2", None),
    # Twice the expert parallelism inside each stage, no data axis (until 2026-12-07 the only pipelined
    # rows XLA:TPU compiled: model/block.py's note on unrolled stacks).
    "dualpipev, expert=4": ("pipeline", "pipeline=2,expert=4", "dualpipev"),
    "1f1b, expert=4": ("pipeline", "pipeline=2,expert=4", "1f1b"),
}


# The same compiles with other compiler options or widths: what was tried to get more of the other
# chunk into the pair's windows, none adopted (`--variants`; the md's last section).
REPORT_WIDTHS = ["model.d_model=7168", "model.moe_ffn_dim=2048", "model.ffn_dim=18432", "model.n_heads=16",
                 "model.q_lora_rank=1536", "model.kv_lora_rank=512", "model.qk_nope_dim=128",
                 "model.qk_rope_dim=64", "model.v_head_dim=128"]  # §4.2's widths at small's depth, 16 experts
_GPU_LIMIT_4 = {"XLA_FLAGS": "--xla_gpu_experimental_parallel_collective_overlap_limit=4"}
VARIANTS = {  # name -> (target, case, config overrides, environment)
    "dualpipev, 4 collectives in flight": ("h100x8", "dualpipev", [], _GPU_LIMIT_4),
    "1f1b, 4 collectives in flight": ("h100x8", "1f1b", [], _GPU_LIMIT_4),
    "dualpipev, speed-of-light latency estimator": (
        "h100x8", "dualpipev", [], {"XLA_FLAGS": "--xla_gpu_enable_analytical_sol_latency_estimator=true"}),
    "dualpipev, the report's widths": ("h100x8", "dualpipev", REPORT_WIDTHS, {}),
    "1f1b, the report's widths": ("h100x8", "1f1b", REPORT_WIDTHS, {}),
    "dualpipev, scheduler memory-pressure tracking off": (
        "tpu-v5p:2x2x2", "dualpipev", [],
        {"LIBTPU_INIT_ARGS": "--xla_tpu_enable_scheduler_memory_pressure_tracking=false"}),
    "dualpipev, multi-output fusion off": (
        "tpu-v5p:2x2x2", "dualpipev", [], {"LIBTPU_INIT_ARGS": "--xla_jf_enable_multi_output_fusion=false"}),
}


HEADER = ("`small` with 8 MoE layers in bf16 (`--set model.n_layers=9 --set train.batch_size=32 --set "
          "model.dtype=bfloat16`), 8 devices; pipelined cases data=2,pipeline=2,expert=2 (8 micro-batches), EP "
          "without pipeline data=4,expert=2. Command: `uv run --extra tpu --extra cuda12 python "
          "experiments/dualpipe_overlap.py`.\n\n"
          "An all-to-all's *window* is what XLA's scheduler placed between its start and its done. Its "
          "*transfer* is the bytes that leave the device ((G-1)/G of the buffer for a group of G: "
          "`hlo_stats.wire_bytes`) over the target's intra-host link; its *compute* the dot FLOPs inside, at "
          "the target's bf16 peak. *Bytes hidden*: the bytes of windows whose compute takes at least their "
          "transfer's time (all or nothing per window). *Transfer time covered*: each window counts "
          "min(compute, transfer), over all the windows' transfer time. Both are estimates from the schedule, "
          "not timings. *Other chunk*: windows of an F&B pair's all-to-alls that hold the other "
          "micro-batch's GEMMs (report §3.2.1, Figure 4), from the pair's name scopes in the ops' metadata; "
          "*hiding* and *covering* there count only those GEMMs.")

READING = (
    "How to read it. The F&B pair runs in Figure 4's order (parallel/pipeline/executor.py "
    "`lockstep_pair`, since 2026-12-07's fifth session): each MoE block in four phases (attention, "
    "dispatch, experts, combine: model/block.py `Block.PHASES`), and round k of the pair runs the "
    "forward chunk's phase k beside the backward chunk's mirror phase (the forward's dispatch beside the "
    "backward's experts, its combine beside the backward's attention, ...), rounds closed by an "
    "optimization barrier. An all-to-all then shares its round only with the other micro-batch's "
    "attention or MLP. `tests/test_overlap.py` holds a compiled TPU pair to it, and fails when the "
    "forward is made to wait on the backward.\n\n"
    "Before the rounds (the pair's chunks independent, their order XLA's), XLA:TPU put no GEMM of the "
    "other micro-batch in any of the pair's 28 windows: it ran the backward's all-to-alls, then the "
    "forward's. With them, on tpu-v5p:2x2x2, 5 of the 28 windows hold the other chunk's GEMMs and hide "
    "19.9% of the pair's bytes behind them; DualPipeV hides 32.0% of its all-to-all bytes in all (29.6% "
    "before) against 1F1B's 17.9%. With expert=4: 10 of 24 windows, hiding 25.1% of the pair's bytes "
    "(2 of 22 and 0.0% before), 22.1% in all (13.2%) against 1F1B's 12.2%, and 609 MiB of temporaries "
    "instead of 709. The windows without the other chunk are mostly the backward's recomputed forward, "
    "which runs before the rounds (the stage keeps only its input: `train.pipeline_keep_residuals` "
    "would remove the recompute, but its residuals are the whole stage's and the pair then runs "
    "unordered).\n\n"
    "On h100x8 the rounds double the windows holding the other chunk's GEMMs (10 of 33 against 5; "
    "with expert=4, 10 against 3), covering 10.8% of the pair's transfer time (8.7% before; expert=4 "
    "6.0% against 2.0%). In all DualPipeV's compute covers 21.6% of its all-to-all transfer time (23.6% "
    "before) against 1F1B's 16.7%; bytes hidden whole stay small (0.5% against 0.3%). XLA:GPU's "
    "latency-hiding scheduler prices every asynchronous collective at one fixed latency and every "
    "cuBLAS GEMM at a fifth of it (xla/service/gpu/gpu_latency_hiding_scheduler.cc), so it places a "
    "handful of GEMMs in each window whatever the window's bytes (the variants below). Its "
    "speed-of-light estimator, which would price a window by its bytes, does not take modules with "
    "all-to-alls: asked for, it changes nothing. The profile-guided one "
    "(`--xla_gpu_pgle_profile_file_or_directory_path`) needs a profile taken on a GPU. EP without a "
    "pipeline covers the most on GPU (38.5%): its one micro-batch is 4 rows per device, and its windows "
    "hold that micro-batch's own larger GEMMs. At `small`'s widths (d_model 512, expert FFN 512) a "
    "layer's routed GEMMs for one 256-token micro-batch take about as long as its transfers; the "
    "report's 1:1 ratio is at 7168 / 2048 over 50 GB/s InfiniBand.\n\n"
    "The variants below were compiled before the rounds (2026-12-07, fourth session): what was tried "
    "to get the other chunk into the windows with compiler options alone. XLA's scheduling annotations "
    "(`_scheduling_group_id`) were the other candidate: on a toy ([scheduling_annotations.md]"
    "(scheduling_annotations.md)) XLA:GPU's compile crashes and XLA:TPU refuses groups with gaps.\n\n"
    "Dates. The dualpipev rows were compiled on 2026-12-07 (fifth session) with the rounds, the others in "
    "the fourth session; all in bf16 with the transfer counted as the bytes that leave the device. The "
    "dualpipev rows' compile seconds were measured with other compiles beside them. Rows before the "
    "fourth session computed in f32 and counted whole buffers (DualPipeV 0.0%, 1F1B 0.0% bytes hidden on "
    "h100x8); the first GPU rows of all (DualPipeV 11.6%) counted a dense lowering of `ragged_dot`.")


def run_case(target_name: str, case: str, overrides: tuple[str, ...] = ()) -> dict:
    """One compile (in this process): the summary and the all-to-all windows."""
    from dsv3_jax import hlo_stats
    from dsv3_jax.jobs.compile import (PAIR_SCOPES, _OVERLAP_HARDWARE, compile_step, other_chunk_flops,
                                       overlap_summary, window_seconds)
    from dsv3_jax.config import apply_overrides, get_preset
    from dsv3_jax.jobs.plan import HARDWARE
    from dsv3_jax.targets import parse_target

    what, mesh, schedule = CASES[case]
    mesh_overrides = [f"mesh.{kv}" for kv in mesh.split(",")]
    config = apply_overrides(get_preset("small"), SMALL + mesh_overrides + list(overrides))
    target = parse_target(target_name)
    report = compile_step(config, target, what, schedule=schedule)
    windows = hlo_stats.async_windows(report.hlo, PAIR_SCOPES)
    hardware = HARDWARE[_OVERLAP_HARDWARE[target.kind]]
    rows = []
    for w in (w for w in windows if w["kind"] == "all-to-all"):
        other = other_chunk_flops(w)
        transfer_s, compute_s = window_seconds(w, w["flops_between"], hardware)
        rows.append({"computation": w["computation"], "scope": w["scope"], "bytes": w["bytes"],
                     "ops_between": w["ops_between"], "own_flops": w["flops_between"] - other, "other_flops": other,
                     "transfer_s": transfer_s, "compute_s": compute_s})
    return {"target": target_name, "case": case, "compile_s": report.compile_s,
            "summary": overlap_summary(windows, hardware),
            "windows": rows, "temporary": report.memory["temporary"]}


def _worker(target_name: str, case: str, variant: str | None = None) -> dict:
    """`run_case` in its own process (a compiler that aborts costs its row), with a variant's flags."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, __file__, "--case", target_name, case]
    if variant is not None:
        *_, flags = VARIANTS[variant]
        for name, value in flags.items():  # XLA_FLAGS / LIBTPU_INIT_ARGS: added to the caller's
            env[name] = f"{env.get(name, '')} {value}".strip()
        command += ["--variant", variant]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = [line for line in (proc.stderr or "").splitlines() if line.strip()][-3:]
        return {"target": target_name, "case": case, "error": f"exit {proc.returncode}: " + " / ".join(tail)[-400:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary_row(r: dict) -> str:
    if "error" in r:
        check = re.search(r"Check failed: [^/|]*", r["error"])
        return f"| {r.get('variant') or r['case']} | does not compile: {check.group(0).strip() if check else r['error']} | | | | | | | |"
    a2a = r["summary"]["by_kind"]["all-to-all"]
    pair = r["summary"]["pair"]
    other = (f"{pair['with_other_chunk']} of {pair['all_to_alls']} ({pair['bytes_with_other_chunk'] / max(pair['bytes'], 1):.0%}"
             f" of their bytes), {pair['other_chunk_flops'] / 1e9:.1f} GFLOP; hiding "
             f"{pair['by_other_chunk_fraction_hidden']:.1%}, covering {pair['by_other_chunk_fraction_covered']:.1%}"
             ) if pair["all_to_alls"] else "no pairs"
    return (f"| {r.get('variant') or r['case']} | {a2a['windows']} | {a2a['bytes'] / 2 ** 20:.1f} MiB | {a2a['with_compute']} | "
            f"{a2a['fraction_hidden']:.1%} | {a2a['fraction_covered']:.1%} | {other} | {r['temporary'] / 2 ** 20:.0f} MiB | "
            f"{r['compile_s']:.0f} s |")


def _window_rows(r: dict) -> list[str]:
    """The pair branch's all-to-alls (DualPipeV), else the windows with any compute inside."""
    rows = [w for w in r["windows"] if w["scope"]] or [w for w in r["windows"] if w["own_flops"] or w["other_flops"]]
    out = ["| computation | issued by | bytes | ops inside | own chunk GFLOP | other chunk GFLOP | transfer / compute (us) |",
           "|---|---|---|---|---|---|---|"]
    for w in rows:
        issued = {None: "-", "pair_forward_chunk": "forward", "pair_backward_chunk": "backward"}.get(w["scope"], w["scope"])
        out.append(f"| {w['computation']} | {issued} | {w['bytes']:,} | {w['ops_between']} | {w['own_flops'] / 1e9:.2f} | "
                   f"{w['other_flops'] / 1e9:.2f} | {w['transfer_s'] * 1e6:.1f} / {w['compute_s'] * 1e6:.1f} |")
    return out


def _variant_lines(compile_missing: bool, recompile: bool) -> list[str]:
    """The variants' table (compiling those missing when asked), from their own store."""
    store = RESULTS / "dualpipe_overlap_variants.json"
    stored = {r["variant"]: r for r in json.loads(store.read_text())} if store.exists() else {}
    for name, (target_name, case, _, _) in VARIANTS.items():
        if compile_missing and (recompile or name not in stored or "error" in stored[name]):
            print(f"variant: {name} ...", flush=True)
            stored[name] = dict(_worker(target_name, case, name), variant=name)
            print("  ", _summary_row(stored[name]), flush=True)
            store.write_text(json.dumps(list(stored.values()), indent=1))
    if not stored:
        return []
    lines = ["## Variants tried, not adopted", "",
             "The same compiles with one compiler option changed, or at the report's widths "
             "(`--variants`; flags and overrides in `VARIANTS` of the script).", "",
             "| target | variant | all-to-alls | bytes | with compute inside | bytes hidden | transfer time covered | "
             "windows with the other chunk's GEMMs | temporaries | compile |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {VARIANTS[name][0]} " + _summary_row(stored[name]) for name in VARIANTS if name in stored]
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", nargs="+", default=["h100x8", "tpu-v5p:2x2x2"])
    parser.add_argument("--recompile", action="store_true", help="compile every case (of --cases) again")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="the cases to compile")
    parser.add_argument("--variants", action="store_true", help="also compile the variants not compiled yet")
    parser.add_argument("--case", nargs=2, metavar=("TARGET", "CASE"), help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        overrides = VARIANTS[args.variant][2] if args.variant else []
        print(json.dumps(dict(run_case(*args.case, tuple(overrides)), variant=args.variant)))
        return
    # Earlier compiles are reused (a row that failed is tried again) unless --recompile; the rows of
    # targets not named this time are kept.
    store = RESULTS / "dualpipe_overlap.json"
    stored = {(r["target"], r["case"]): r for r in json.loads(store.read_text())} if store.exists() else {}
    targets = list(dict.fromkeys([t for t, _ in stored] + args.targets))
    for target_name in args.targets:
        for case in args.cases:
            earlier = stored.get((target_name, case))
            if args.recompile or earlier is None or "error" in earlier:
                print(f"{target_name} {case} ...", flush=True)
                stored[(target_name, case)] = _worker(target_name, case)
            print("  ", _summary_row(stored[(target_name, case)]), flush=True)
            store.write_text(json.dumps(list(stored.values()), indent=1))
    results = [stored[(t, c)] for t in targets for c in CASES if (t, c) in stored]
    lines = ["# DualPipe's overlap in the compiled program", "", HEADER, "", READING, ""]
    for target_name in targets:
        mine = [r for r in results if r["target"] == target_name]
        from dsv3_jax.jobs.compile import options_text
        from dsv3_jax.targets import parse_target

        lines += [f"## {target_name}", "", f"compiler options set by the package: "
                                           f"{options_text(parse_target(target_name).platform)}", "",
                  "| case | all-to-alls | bytes | with compute inside | bytes hidden | transfer time covered | "
                  "windows with the other chunk's GEMMs | temporaries | compile |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [_summary_row(r) for r in mine]
        for r in mine:
            if "error" not in r:
                lines += ["", f"### {target_name}, {r['case']}: all-to-all windows"
                          + (" of the F&B pair" if any(w["scope"] for w in r["windows"]) else " with compute inside"), ""]
                lines += _window_rows(r)
        lines.append("")
    lines += _variant_lines(args.variants, args.recompile)
    (RESULTS / "dualpipe_overlap.md").write_text("\n".join(lines) + "\n")
    print("wrote", RESULTS / "dualpipe_overlap.md")


if __name__ == "__main__":
    main()
