"""The layout planner on the report's deployment of DeepSeek-V3 671B (§3.1-3.2, §4.2): 2,048 H800
GPUs, 8 per node, 16-way pipeline with DualPipe, 64-way expert parallelism over 8 nodes, ZeRO-1
data parallelism over the remaining 2, sequences of 4K, 15,360 sequences per step; set beside the
report's 180K H800 GPU-hours (3.7 days on 2,048 GPUs) per trillion tokens.

Command:   uv run python experiments/plan_deepseek_v3.py
Runtime:   about 10 s on a 2-core CPU (abstract shapes only: nothing is allocated or compiled).
Writes:    experiments/results/plan_deepseek_v3.md
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

from dsv3_jax.config import apply_overrides, get_preset
from dsv3_jax.jobs.plan import HARDWARE, RANK_COLUMNS, Layout, check_layout, plan, rank_rows, report_rows

RESULTS = Path(__file__).parent / "results" / "plan_deepseek_v3.md"
MESH = {"data": 2, "expert": 64, "pipeline": 16}  # 2 x 64 x 16 = 2,048
# The report does not give the micro-batch size: one 4K sequence per micro-batch and data rank.
OVERRIDES = ["train.seq_len=4096", "train.batch_size=15360", "train.pipeline_schedule=dualpipe",
             "train.microbatches=120", "train.bf16_moments=true", "train.zero1=true"]
REPORT_GPU_HOURS_PER_T = 180e3

SCENARIOS = {
    "this package as it runs (padded all-to-all, [T, T] scores kept, bf16 GEMMs)":
        dict(fp8=False, fused_attention=False, padded_dispatch=True, remat="none"),
    "GPU kernels: fused attention, dropless dispatch, bf16 GEMMs":
        dict(fp8=False, fused_attention=True, padded_dispatch=False, remat="none"),
    "GPU kernels + FP8 GEMMs and dispatch (report §3.3)":
        dict(fp8=True, fused_attention=True, padded_dispatch=False, remat="none"),
    "GPU kernels + FP8 + the report's recomputation and FP8 activation cache (§3.2.3, §3.3.4)":
        dict(fp8=True, fused_attention=True, padded_dispatch=False, remat="report"),
    "the same, with each stage's forward recomputed in its backward (train.pipeline_keep_residuals=false)":
        dict(fp8=True, fused_attention=True, padded_dispatch=False, remat="report", keep=False),
    "the same, with chunked cross-entropy (train.ce_chunk=512: one eighth of a sequence's logits at a time)":
        dict(fp8=True, fused_attention=True, padded_dispatch=False, remat="report", keep=False, ce_chunk=512),
}


def main() -> None:
    start = time.time()
    lines = ["# The planner on DeepSeek-V3's training deployment", "",
             f"`uv run python experiments/plan_deepseek_v3.py` ({time.strftime('%Y-%m-%d')}, "
             f"{platform.machine()}, abstract shapes only).", "",
             "Layout (report §3.1-3.2, §4.2): 2,048 x H800 (8 per node), mesh "
             + ", ".join(f"{k}={v}" for k, v in MESH.items())
             + " (EP64 ranks are the data ranks of everything but the experts), DualPipe, ZeRO-1, "
             "4K tokens x 15,360 sequences per step, 120 micro-batches of one sequence per data rank "
             "(an assumption: the report does not state it), bf16 Adam moments, fp32 master weights "
             "and gradients (§3.3.3). GEMMs at 50% of the peak (an assumption; `--matmul-efficiency`).", ""]
    for title, options in SCENARIOS.items():
        for efficiency in (0.5, 0.3):
            layout_options = dict(options)
            config = apply_overrides(get_preset("deepseek-v3-671b"), OVERRIDES + [
                f"model.fp8={str(layout_options.pop('fp8')).lower()}", f"model.remat={layout_options.pop('remat')}",
                f"train.pipeline_keep_residuals={str(layout_options.pop('keep', True)).lower()}",
                f"train.ce_chunk={layout_options.pop('ce_chunk', 0)}"])
            layout = Layout(config, MESH, HARDWARE["h800"], matmul_efficiency=efficiency, **layout_options)
            check_layout(layout)
            planned = plan(layout)
            rows = report_rows(layout, planned)
            if efficiency == 0.5:
                lines += [f"## {title}", "", "| quantity (per GPU unless stated) | estimate |", "|---|---|"]
                lines += [f"| {q} | {v} |" for q, v in rows[2:]]
                lines.append("")
                if title == list(SCENARIOS)[-1]:  # the layout that fits: each pipeline rank's own needs
                    lines += ["Per pipeline rank (`dsv3 plan` prints this table for any pipelined layout). Under "
                              "DualPipe rank r runs stages r and P-1-r, so ranks 0 and 15 run both the embedding "
                              "with the dense layers and the head with the MTP module (the report's §3.2.3 "
                              "placement comes out of the schedule); the program is one SPMD program, so every "
                              "rank allocates the last row.", "",
                              "| " + " | ".join(RANK_COLUMNS) + " |", "|" + "---|" * len(RANK_COLUMNS)]
                    lines += ["| " + " | ".join(row) + " |" for row in rank_rows(planned)]
                    lines.append("")
            else:
                lines += [f"At 30% of the peak instead: {dict(rows)['step time']} per step, "
                          f"{dict(rows)['device-hours per trillion tokens']} GPU-hours per trillion tokens.", ""]
    lines += ["## Beside the report", "",
              f"- Report: {REPORT_GPU_HOURS_PER_T / 1e3:.0f}K H800 GPU-hours per trillion tokens, 3.7 days on 2,048 "
              "GPUs; the model state fits in 80 GB per GPU without tensor parallelism (§3.2.3).",
              "- Step time. The FP8 scenario at 50% of the FP8 peak estimates about 2.3x fewer GPU-hours than the "
              "report; at 30% it is within about 1.4x. The report's figure includes everything the planner does "
              "not model: attention and other non-GEMM work at lower efficiency, the bf16 attention core, "
              "recomputation of norms and MLA up-projections (§3.2.3), imperfect overlap, stragglers, "
              "checkpoints. Compute and expert all-to-all come out about equal per step, the report's own "
              "\"computation-to-communication ratio of approximately 1:1\" (§3.2.1), which is what DualPipe's "
              "overlap is for; without it (1F1B), the step would be their sum.",
              "- Memory, over time: 425.8 GB per GPU when this layout was first planned (the weights outside the "
              "stack replicated over the pipeline, whole-layer recomputation only, every in-flight micro-batch's "
              "residuals kept); 70.99 GB, then 84.09 GB once the planner counted the tick loop's stacked copy of the "
              "stages and its accumulators, checked against XLA:GPU (2026-12-07); 77.54 GB with the stored stages "
              "read in place and one stage backward's gradients counted (2026-12-07, the last table).",
              "- Memory: state. ZeRO-1 (`train.zero1`: the AdamW moments split over each parameter's copies, "
              "data x expert for all but the routed experts, tests/test_parallel.py) leaves 2.2 GB of optimizer "
              "state. Each rank stores one stage of 4 MoE layers and a 1/16 share at rest of the weights outside the "
              "MoE stack (embedding, three dense layers, head, MTP): 8.4 GB of parameters.",
              "- Memory: what the step adds. The outside weights are gathered whole on every rank (one SPMD program: "
              "every rank allocates the same buffers; the report instead places them on the first and last ranks), "
              "and DualPipe's mirrored stage P-1-r is received for the step (Table 2's 2x parameters, 6.5 GB): 21.2 GB "
              "gathered. A rank's own stage is read where it is stored (parallel/pipeline/executor.py `stored_slots`; "
              "until 2026-12-07 the tick loop ran every stage from a stacked copy). The fp32 gradients: the stored "
              "stage's and the mirrored stage's accumulators, the outside weights' whole until reduced, and one stage "
              "backward's output before it is added (6.5 GB): 36.1 GB.",
              "- Memory: activations. The report's savings, recomputing RMSNorms and MLA up-projections "
              "(`model.remat=report`, §3.2.3) and FP8-cached activations (`model.fp8_activation_cache`, §3.3.4), cut "
              "the activations at DualPipe's peak (PP + 1 = 17 micro-batches of 4K tokens) from 279 to 102 GB. This "
              "package's default pipeline executor (`train.pipeline_keep_residuals=false`) keeps only each "
              "in-flight micro-batch's stage input and cotangent, in pools its tick table sizes (27 entries of 4K x "
              "7,168), and recomputes a stage's forward in its backward: 21.5 GB (12.7 GB of them the fp32 logits), "
              "89.3 GB in all, for 5/3 of the FLOPs. Chunked cross-entropy (`train.ce_chunk=512`, the 671B preset's "
              "default since 2026-12-07: the loss 512 positions of logits at a time, recomputed in the backward; same "
              "loss and gradients, tests/test_loss.py) leaves 9.7 GB: **77.5 GB per GPU**, 2.5 GB under the H800's 80 "
              "(the last table; ranks 0 and 15, which run the embedding, dense layers, head and MTP, 77.1 GB, the others "
              "73.9-74.2 GB).",
              "- Memory: checked against the compiler (experiments/results/plan_vs_compiler.md): `small` pipelined on "
              "8 H100s and a v5p slice, tiny on 8 host devices (tests/test_plan.py), and the 671B widths on this mesh "
              "(35 layers). What the planner does not model: XLA's own layout copies (on 8 H100s XLA:GPU copies the "
              "f32 expert weights into the layout the tick loop's GEMMs read, and the accumulators into the backward "
              "branches; `jax.experimental.layout.Format(Layout.AUTO)` for the train state removed about 100 MiB of "
              "`small` 1F1B's 638 MiB of temporaries in a trial, not adopted), fp32 master weights with a bf16 working "
              "copy (§3.3.3), reduce-scattered gradients, and the report's likely shorter micro-batches. The "
              "planner's inventory is this package's, not DeepSeek's.",
              "- The first scenario shows what this package would need on that cluster as it runs today: its "
              "all-to-all buffers are sized for P x capacity x J expert slots and computed whether full or "
              "not, about 8x the real assignments at EP64 (parallel/expert.py; a dropless ragged kernel on GPU "
              "is the fix), and its attention keeps the [T, T] scores.", "",
              f"Runtime: {time.time() - start:.0f} s."]
    RESULTS.write_text("\n".join(lines) + "\n")
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
