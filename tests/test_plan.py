"""The layout planner (jobs/plan.py) against the compiler: per-device bytes of the real train
step AOT-compiled on 8 host devices (`compiled.memory_analysis()`), and its report-layout table."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from dsv3_jax.config import MeshConfig, apply_overrides, get_preset
from dsv3_jax.jobs.plan import HARDWARE, Layout, bubble_fraction, check_against_compiler, peak_in_flight, plan
from tests.conftest import cli_env, need_devices

pytestmark = pytest.mark.multidevice


@pytest.mark.parametrize("sizes", [dict(data=2), dict(data=2, expert=4), dict(fsdp=4, tensor=2)],
                         ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_planner_agrees_with_the_compiled_step(sizes):
    """State (parameters + optimizer) within 15%, temporaries (gradients + activations) within 30%."""
    need_devices(8)
    got = check_against_compiler(get_preset("tiny"), sizes)
    planned, compiled = got["state"]
    assert abs(planned - compiled) <= 0.15 * compiled, got
    planned, compiled = got["temporaries"]
    assert abs(planned - compiled) <= 0.30 * compiled, got


# DualPipe and DualPipeV (slow: 1-2 min of XLA:CPU each here; experiments/plan_vs_compiler.py has
# all three schedules of `small` compiled for 8 H100s and a v5p slice): DualPipe's stored 1/P and
# the mirrored stage received for the step, DualPipeV's two stages per rank.
@pytest.mark.parametrize("schedule", ["1f1b", pytest.param("dualpipe", marks=pytest.mark.slow),
                                      pytest.param("dualpipev", marks=pytest.mark.slow)])
def test_planner_agrees_with_the_compiled_pipelined_step(schedule):
    """On data=2,pipeline=2,expert=2 (tiny with 4 MoE layers): the stage-owned state, the weights
    outside the stack split at rest, the executor's pools of stage inputs and one stage's recomputed
    backward, the stages received for the step (DualPipe's mirrored one, DualPipeV's), the gradient
    accumulators and one stage backward's gradients. Measured (2026-12-07): state 1.00, temporaries
    1.04 (1F1B), 0.85 (DualPipe) and 0.92 (DualPipeV) of the compiler's.
    (With train.pipeline_keep_residuals=true the planner under-counts: 0.77 and 0.66, not yet fixed.)"""
    need_devices(8)
    config = apply_overrides(get_preset("tiny"), ["model.n_layers=5", "train.microbatches=4",
                                                  f"train.pipeline_schedule={schedule}"])
    got = check_against_compiler(config, dict(data=2, pipeline=2, expert=2))
    planned, compiled = got["state"]
    assert abs(planned - compiled) <= 0.15 * compiled, got
    planned, compiled = got["temporaries"]
    assert abs(planned - compiled) <= 0.30 * compiled, got


def test_data_parallel_ranks_split_the_experts_work():
    """With data=2 and no expert axis each device routes only its own tokens: no buffer of the whole
    batch's assignments in the compiled HLO (GSPMD alone sorted and computed them on every rank)
    and per-device temporaries below 0.6 of one device's (0.53; 0.64 before). XLA's FLOP count
    halves either way (it does not see the replicated sort), so it is checked but proves little;
    experiments/results/data_parallel_moe.md has the figures before and after."""
    need_devices(2)
    from dsv3_jax.parallel.mesh import make_mesh
    from dsv3_jax.parallel.sharding import DEFAULT_RULES
    from dsv3_jax.train.state import abstract_train_state
    from dsv3_jax.train.step import make_train_step

    config = get_preset("tiny")
    graphdef, optimizer, state = abstract_train_state(config)
    batch = jax.ShapeDtypeStruct((config.train.batch_size, config.train.seq_len + 1), np.int32)

    def costs(mesh):
        step = make_train_step(config, graphdef, optimizer)
        if mesh is None:
            compiled = jax.jit(step).lower(state, batch).compile()
            return compiled.cost_analysis()["flops"], compiled.memory_analysis().temp_size_in_bytes
        shardings = DEFAULT_RULES.tree(state, mesh)
        with jax.set_mesh(mesh):
            compiled = jax.jit(step, in_shardings=(shardings, DEFAULT_RULES.batch(mesh))).lower(state, batch).compile()
        assert "f32[3,4096,128]" not in compiled.as_text()  # the whole batch's assignments (2048 x K)
        return compiled.cost_analysis()["flops"], compiled.memory_analysis().temp_size_in_bytes

    (flops, temp), (flops_one, temp_one) = costs(make_mesh(MeshConfig(data=2))), costs(None)
    assert 0.45 < flops / flops_one < 0.6 and temp / temp_one < 0.6, (flops / flops_one, temp / temp_one)


def test_schedule_figures_follow_table_2():
    assert [peak_in_flight(s, 4, 16) for s in ("gpipe", "1f1b", "zb1p", "dualpipe")] == [16, 4, 4, 5]
    # Bubbles in units of a forward chunk (F = W = 1, B = 2): 1F1B (PP-1)(F+B); DualPipe (PP/2-1)(F&B+B-3W).
    assert bubble_fraction("1f1b", 4, 8) == pytest.approx(3 * 3 / (8 * 3))
    assert bubble_fraction("dualpipe", 8, 8) == pytest.approx(3 * 2 / (8 * 3))
    assert bubble_fraction("zb1p", 4, 8) < bubble_fraction("1f1b", 4, 8)


def test_pipeline_ranks_own_their_stages():
    """The stage-owned layout: every schedule's rank stores 1/P of the MoE stack; a DualPipe rank
    receives the mirrored stage P-1-r for the step (Table 2's 2x parameters), a step buffer with the
    gathered weights, and computes gradients for both (parallel/pipeline/executor.py)."""
    config = apply_overrides(get_preset("deepseek-v3-671b"), ["train.microbatches=32"])  # DualPipe: >= 2P
    hw = HARDWARE["h800"]
    flat = plan(Layout(config, {"expert": 64}, hw))
    one_f = plan(Layout(apply_overrides(config, ["train.pipeline_schedule=1f1b"]), {"expert": 64, "pipeline": 16}, hw))
    dual = plan(Layout(config, {"expert": 64, "pipeline": 16}, hw))  # the preset's schedule, the report's
    assert one_f.params < flat.params / 4 and dual.params == one_f.params and dual.optimizer == one_f.optimizer
    mirrored = dual.gathered - one_f.gathered
    assert flat.params / 32 < mirrored < flat.params / 16 and dual.grads == one_f.grads + mirrored
    # Per rank: DualPipe's rank r runs stages r and P-1-r, so the end ranks run the embedding and the
    # head; 1F1B's rank r holds P - r micro-batches in flight (Table 2's PP on the first), the last
    # rank the head's logits. One SPMD program allocates the largest of each on every rank.
    assert [r.stages for r in dual.ranks[:2]] == [(0, 15), (1, 14)] and len(dual.ranks) == 16
    assert dual.ranks[0].runs == dual.ranks[15].runs == "embedding + dense layers, head + MTP" != dual.ranks[1].runs
    held = [r.activations for r in one_f.ranks]
    assert all(a > b for a, b in zip(held[:14], held[1:15])) and held[15] > held[14]
    for p in (dual, one_f):
        assert max(r.activations for r in p.ranks) <= p.activations and max(r.total for r in p.ranks) <= p.total


def test_plan_cli_prints_the_report_layout_and_refuses_bad_input():
    args = [sys.executable, "-m", "dsv3_jax.cli", "plan", "--preset", "deepseek-v3-671b", "--mesh",
            "data=2,expert=64,pipeline=16", "--set", "train.seq_len=4096", "--set", "train.batch_size=15360",
            "--set", "train.pipeline_schedule=dualpipe", "--set", "train.microbatches=120", "--zero1", "--json"]
    out = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert rows["devices"].startswith("2,048 x NVIDIA H800") and "step time" in rows
    for bad, message in [(["--device", "a100"], "--device 'a100' must be one of: h800, h100, tpu-v5p"),
                         (["--mesh", "data=7"], "train.batch_size=15360 must divide over data x fsdp x expert"),
                         (["--hw", "bogus=1"], "--hw 'bogus=1': the key must be one of")]:
        out = subprocess.run(args + bad, env=cli_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
