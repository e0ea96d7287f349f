"""Pipeline memory per device: the compiled train step's temporaries as the number of micro-batches
grows (2P, 4P, 8P on P = 2 pipeline ranks), for DualPipe, 1F1B and GPipe on the composed mesh
(data=2, pipeline=2, expert=2), next to the same batches without a pipeline (data=2, expert=2).

The micro-batch stays 4 rows (one per batch shard), so the batch grows with the micro-batches. A
schedule's activation buffers are sized to its peak in-flight chunks (parallel/pipeline/executor.py),
so DualPipe's and 1F1B's temporaries should stay flat while GPipe's (peak = every micro-batch) and
the unpipelined step's (the whole batch at once) grow. Also per device: the train state (arguments),
where the stage-owned MoE stack halves what each rank keeps.

Command:   uv run python experiments/bench_pipeline_memory.py
Runtime:   about 7 minutes on a 2-core CPU (15 compiles, nothing runs).
Writes:    experiments/results/pipeline_memory.md
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import dataclasses  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dsv3_jax.config import MeshConfig, get_preset  # noqa: E402
from dsv3_jax.parallel.mesh import make_mesh  # noqa: E402
from dsv3_jax.parallel.pipeline.executor import tick_table  # noqa: E402
from dsv3_jax.parallel.pipeline.schedules import make_schedule, peak_activations  # noqa: E402
from dsv3_jax.parallel.sharding import DEFAULT_RULES  # noqa: E402
from dsv3_jax.train.state import abstract_train_state  # noqa: E402
from dsv3_jax.train.step import make_train_step  # noqa: E402
from dsv3_jax.validate import validate  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "pipeline_memory.md"
P, ROWS = 2, 4  # pipeline ranks; rows per micro-batch
READING = """Reading: DualPipe's and 1F1B's temporaries do not change from 2P to 8P micro-batches: their buffers
hold the schedule's peak in-flight chunks (Table 2: PP+1 = 3 for DualPipe, PP = 2 for 1F1B), sized
from the tick table. GPipe's grow with its peak, which is every micro-batch. The unpipelined step
grows with the batch because it keeps every layer's residuals for the backward, where each
pipeline stage by default keeps only its input and recomputes its forward (once per full backward,
about 4/3 of the unpipelined FLOPs; for the input and again for the weight gradient where a schedule
splits them, about 5/3; counted from the chunks, not timed). With
`train.pipeline_keep_residuals=true` a stage keeps its forward's residuals instead (no recomputed
forward: the unpipelined FLOPs); its temporaries are then those residuals for the schedule's peak
chunks, still flat in the number of micro-batches. DualPipe needs more than 1F1B
for the mirrored stage's parameters it receives each step, the F&B pair's program and one more
chunk. The state column is the train state per device: the stage-owned MoE stack is half of the
unpipelined mesh's, and the rest (embedding, dense layer, head, MTP) is split at rest over
`pipeline` too (gathered for the step, so it counts in the temporaries)."""


def measure(schedule: str | None, n_mb: int, keep_residuals: bool = False) -> dict:
    base = get_preset("tiny")
    mesh_sizes = dict(data=2, expert=2, pipeline=P if schedule else 1)
    config = dataclasses.replace(
        base, model=dataclasses.replace(base.model, n_layers=base.model.first_k_dense + 4),
        train=dataclasses.replace(base.train, batch_size=ROWS * n_mb, microbatches=n_mb,
                                  pipeline_schedule=schedule or "1f1b", pipeline_keep_residuals=keep_residuals),
        mesh=MeshConfig(**mesh_sizes))
    validate(config)
    mesh = make_mesh(config.mesh)
    graphdef, optimizer, state = abstract_train_state(config)
    batch = jax.ShapeDtypeStruct((config.train.batch_size, config.train.seq_len + 1), np.int32)
    step = make_train_step(config, graphdef, optimizer, pipeline_mesh=mesh if schedule else None)
    with jax.set_mesh(mesh):
        compiled = jax.jit(step, in_shardings=(DEFAULT_RULES.tree(state, mesh), DEFAULT_RULES.batch(mesh))).lower(
            state, batch).compile()
    memory = compiled.memory_analysis()
    row = {"temp MB": memory.temp_size_in_bytes / 1e6, "state MB": memory.argument_size_in_bytes / 1e6}
    if schedule:
        ticks = tick_table(make_schedule(schedule, P, n_mb))
        row["peak chunks (Table 2)"] = max(peak_activations(make_schedule(schedule, P, n_mb)))
        row["buffer entries stash/inbox/cot"] = f"{ticks.n_stash}/{ticks.n_inbox}/{ticks.n_cot}"
    return row


def main() -> None:
    start = time.time()
    counts = (2 * P, 4 * P, 8 * P)
    table = {name: {n: measure(schedule, n, keep) for n in counts}
             for name, schedule, keep in (("DualPipe", "dualpipe", False), ("DualPipe, keep residuals", "dualpipe", True),
                                          ("1F1B", "1f1b", False), ("GPipe", "gpipe", False),
                                          ("no pipeline (data=2, expert=2)", None, False))}
    lines = ["# Pipeline memory per device vs the number of micro-batches", "",
             f"`uv run python experiments/bench_pipeline_memory.py` ({time.strftime('%Y-%m-%d')}, 2-core CPU, 8 host "
             f"devices, `tiny` preset with 4 MoE layers, fp32, sequences of 128, micro-batches of {ROWS} rows; "
             f"runtime {time.time() - start:.0f} s). Compiled train step (`memory_analysis()`), per device.", "",
             "| schedule | micro-batches | batch rows | temp MB | state MB | peak chunks (Table 2) | "
             "buffer entries stash/inbox/cot |", "|---|---|---|---|---|---|---|"]
    for name, rows in table.items():
        for n, r in rows.items():
            lines.append(f"| {name} | {n} | {ROWS * n} | {r['temp MB']:.1f} | {r['state MB']:.2f} | "
                         f"{r.get('peak chunks (Table 2)', '-')} | {r.get('buffer entries stash/inbox/cot', '-')} |")
    lines += ["", READING]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
