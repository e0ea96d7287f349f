"""`dsv3 compile`: steps built for TPU / GPU targets from this CPU host, and the platform-driven choices.

Compile-only TPU devices come from libtpu (the `tpu` extra), GPUs from the CUDA plugin (`cuda12`);
tests of a target whose compiler is not installed are skipped with that reason. Every Pallas
kernel must lower for both (Mosaic TPU; Triton on GPU) and appear as its custom call.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import cli_env, tiny_model_config
from dsv3_jax import hlo_stats
from dsv3_jax.jobs.compile import compile_step, kernel_lowering
from dsv3_jax.jobs.plan import HARDWARE, Layout, compare_with_compiled, plan
from dsv3_jax.config import apply_overrides, get_preset
from dsv3_jax.errors import UsageError
from dsv3_jax.targets import GPUS, gpu_target_config, parse_target

HAS_TPU_COMPILER = importlib.util.find_spec("libtpu") is not None
# The plugin's own package (not jax_plugins.xla_cuda12: find_spec of a submodule raises when the
# namespace package jax_plugins is absent, which is every machine without the extra).
HAS_GPU_COMPILER = importlib.util.find_spec("jax_cuda12_plugin") is not None
needs_tpu = pytest.mark.skipif(not HAS_TPU_COMPILER, reason="needs the `tpu` extra (libtpu): uv run --extra tpu pytest")
needs_gpu = pytest.mark.skipif(not HAS_GPU_COMPILER, reason="needs the `cuda12` extra (4.4 GB): uv run --extra cuda12 pytest")
TPU, GPU = "tpu-v5p:2x2x1", "h100x8"


def _config(*overrides):
    """tiny shrunk to one dense and one MoE layer (8 experts, top-2), no MTP, fp32: the smallest step
    that still routes, dispatches over the expert axis and updates the routing bias."""
    base = get_preset("tiny")
    config = dataclasses.replace(base, model=tiny_model_config(n_layers=2, mtp_depth=0),
                                 train=dataclasses.replace(base.train, seq_len=32, batch_size=8))
    return apply_overrides(config, list(overrides))


@pytest.fixture(scope="module")
def tpu_train():
    return compile_step(_config("mesh.expert=4"), parse_target(TPU))


@pytest.fixture(scope="module")
def cpu_train():
    return compile_step(_config("mesh.expert=4"), parse_target("cpu"))


@needs_tpu
def test_train_step_for_tpu_moves_tokens_not_experts_and_uses_no_cpu_fallback(tpu_train):
    r = tpu_train
    assert r.devices == 4 and r.device_kind.startswith("TPU v5")
    # Expert parallelism (report §3.2.2): tokens travel by all-to-all; no expert weight is gathered.
    assert r.collectives["all-to-all"]["count"] > 0 and r.collectives["all-to-all"]["bytes"] > 0
    assert r.collectives["all-gather"]["count"] == 0
    # platform.py's TPU options reach the compiler: the token all-to-alls are asynchronous (start /
    # done pairs the scheduler can put compute between; without the option XLA:TPU keeps all 8
    # synchronous). Only the per-rank counts' exchange, with nothing to overlap, is made sync again.
    synchronous = [hlo_stats.shape_bytes(m.group("shape")) for m in hlo_stats._INSTRUCTION.finditer(r.hlo)
                   if m.group("op") == "all-to-all"]
    assert r.hlo.count(" all-to-all-start(") >= 6 and all(size <= 64 for size in synchronous), synchronous
    # The grouped GEMM is ragged_dot (lowered by XLA:TPU to its Mosaic kernels), not CPU's blocked
    # loops: the optimized program has no loop at all.
    assert r.program["ragged_dot"] > 0 and r.ops["while"] == 0
    assert any("ragged-dot" in kind for kind in r.kernels)
    m = r.memory
    assert 0 < m["argument"] and 0 < m["temporary"] and m["total"] < m["device"] == 95 * 2 ** 30 and r.fits


# tiny with every minor dimension >= 64: XLA:TPU tiles the last two dims of an array by (8, 128), so
# tiny's 16-wide heads would be 8x padding the planner does not model (state 0.30 of the compiled).
WIDE = ("model.kv_lora_rank=128", "model.q_lora_rank=128", "model.qk_nope_dim=64", "model.qk_rope_dim=64",
        "model.v_head_dim=128", "model.moe_ffn_dim=128", "train.seq_len=128", "train.batch_size=8")


@needs_tpu
@pytest.mark.slow  # 20-60 s of XLA:TPU; experiments/plan_vs_compiler.py covers `small` on three meshes
def test_planner_agrees_with_the_step_compiled_for_tpu():
    """The planner's per-device state within 15% and temporaries within 30% of what XLA:TPU allocates
    for the same step (its ragged-dot kernels and fusions), as tests/test_plan.py holds it against
    XLA:CPU. Measured: state 1.00, temporaries 0.85."""
    config = apply_overrides(get_preset("tiny"), ["model.n_layers=2", "model.mtp_depth=0", "mesh.expert=4", *WIDE])
    report = compile_step(config, parse_target(TPU))
    planned = plan(Layout(config, config.mesh.sizes(), HARDWARE["tpu-v5p"]))
    got = compare_with_compiled(planned, config, report.memory["argument"], report.memory["temporary"])
    for part, tolerance in (("state", 0.15), ("temporaries", 0.30)):
        planned_bytes, compiled_bytes = got[part]
        assert abs(planned_bytes - compiled_bytes) <= tolerance * compiled_bytes, (part, got)


@needs_tpu
def test_pipelined_step_compiles_for_tpu_beside_a_data_axis():
    """XLA:TPU aborted the process on every pipelined step with a batch or expert axis beside
    `pipeline`: a stage's layers unrolled by `lax.scan(unroll=True)` around the router's nested
    shard_map (spmd_partitioner's IsManualSubgroup check; model/block.py now unrolls in Python), and
    the first stage's `cond` returning its two branches in different layouts (hlo_verifier). Either
    alone aborts this step: 1F1B on data=2,pipeline=2, 2 layers per stage. (DualPipeV and DualPipe
    with an expert axis: experiments/plan_vs_compiler.py, dualpipe_overlap.py.) In a `dsv3 compile`
    process, so an abort fails this test and not the worker."""
    out = subprocess.run([sys.executable, "-m", "dsv3_jax.cli", "compile", "--target", TPU, "--what", "pipeline",
                          "--schedule", "1f1b", "--mesh", "data=2,pipeline=2", "--json", "--set", "model.n_layers=5",
                          "--set", "model.mtp_depth=0", "--set", "train.seq_len=32", "--set", "train.batch_size=8",
                          "--set", "train.microbatches=4"],
                         capture_output=True, text=True, env=cli_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["collectives"]["collective-permute"]["count"] > 0  # stages hand activations on
    assert r["program"]["ragged_dot"] > 0 and r["fits"]


def test_train_step_for_cpu_asks_for_no_accelerator_only_op(cpu_train):
    r = cpu_train
    assert r.device_kind == "cpu"
    assert r.program["ragged_dot"] == 0 and r.program["ragged_all_to_all"] == 0  # XLA:CPU: dense / missing
    assert r.program["while"] > 0  # the blocked grouped GEMM's loops over 128-row blocks
    assert r.collectives["all-to-all"]["count"] > 0 and r.collectives["all-gather"]["count"] == 0


def test_choices_follow_the_mesh_in_context_not_the_host():
    """Planted `jax.default_backend()` in any of these choices makes this fail under a TPU mesh."""
    from dsv3_jax.model.grouped_gemm import resolve_impl
    from dsv3_jax.parallel.expert import check_dispatch
    from dsv3_jax.platform import current_platform
    from dsv3_jax.quant import fp8

    kernel_platform = lambda: fp8._ops("pallas")[2].keywords["platform"]  # the GEMM kernel's variant
    assert current_platform() == "cpu" and resolve_impl("auto") == "blocked" and kernel_platform() == "cpu"
    with pytest.raises(ValueError, match="ragged needs a GPU or TPU"):
        check_dispatch("ragged")
    if not HAS_TPU_COMPILER:
        pytest.skip("the TPU half needs the `tpu` extra")
    mesh = jax.sharding.Mesh(np.asarray(parse_target(TPU).devices()), ("expert",))
    with jax.set_mesh(mesh):
        assert current_platform() == "tpu" and jax.default_backend() == "cpu"
        assert resolve_impl("auto") == "ragged_dot" and kernel_platform() == "tpu"
        check_dispatch("ragged")  # allowed: TPUs have ragged_all_to_all


@needs_tpu
def test_fp8_train_step_compiles_for_tpu_with_the_pallas_kernels():
    """--fp8 on a TPU mesh: the Pallas kernels are Mosaic calls, each run per device (a Pallas call
    cannot be partitioned by GSPMD), and no interpret-mode loop over a kernel's grid is left."""
    r = compile_step(_config("mesh.expert=4"), parse_target(TPU), fp8=True)
    assert r.kernels.get(f"Mosaic TPU {hlo_stats.PALLAS}", 0) > 0 and r.program["tpu_custom_call"] > 0
    assert r.collectives["all-to-all"]["count"] > 0 and r.collectives["all-gather"]["count"] == 0


@needs_tpu
def test_decode_step_compiles_for_tpu_with_the_latent_cache_sharded_by_batch():
    """(The pipeline compile, DualPipeV on 8 chips, is in experiments/compile_targets.py: ~1 min.)"""
    r = compile_step(_config("mesh.expert=4"), parse_target(TPU), "decode")
    assert r.collectives["all-to-all"]["count"] > 0 and r.program["ragged_dot"] > 0
    assert r.collectives["all-gather"]["count"] == 0


KERNELS = ("quantize_rows", "quantize_blocks", "block_scaled_matmul", "grouped_block_scaled_matmul")


@pytest.fixture(scope="module")
def tpu_kernels():
    return {row["kernel"]: row for row in kernel_lowering(parse_target(TPU))}


@pytest.fixture(scope="module")
def gpu_kernels():
    return {row["kernel"]: row for row in kernel_lowering(parse_target(GPU))}


def _lowers(row: dict, backend: str) -> None:
    assert row["error"] is None, row["error"]
    assert row["custom_calls"].get(f"{backend} {hlo_stats.PALLAS}", 0) >= 1, row["custom_calls"]


@needs_tpu
@pytest.mark.parametrize("kernel", KERNELS)
def test_pallas_kernel_lowers_for_tpu(tpu_kernels, kernel):
    _lowers(tpu_kernels[kernel], "Mosaic TPU")


@needs_gpu
@pytest.mark.parametrize("kernel", KERNELS)
def test_pallas_kernel_lowers_for_gpu(gpu_kernels, kernel):
    _lowers(gpu_kernels[kernel], "Triton")


@needs_gpu
def test_train_step_for_gpus_uses_the_blocked_grouped_gemm():
    # XLA:GPU lowers ragged_dot densely (an [E, M, N] product per GEMM), so GPU programs take the
    # 128-row blocked loops (model/grouped_gemm.py); TPU keeps ragged_dot (the test above).
    r = compile_step(_config("mesh.data=2", "mesh.expert=4"), parse_target(GPU))
    assert r.devices == 8 and "H100" in r.device_kind and r.memory["device"] == 80 * 2 ** 30
    assert r.program["ragged_dot"] == 0 and r.ops["while"] > 0
    assert r.collectives["all-to-all"]["count"] > 0 and r.collectives["all-gather"]["count"] == 0


@needs_gpu
@pytest.mark.slow  # ~90 s of XLA:GPU; experiments/plan_vs_compiler.py's pipelined h100x8 rows measure the same program
def test_pipelined_step_for_gpus_keeps_the_experts_split_inside_the_stages():
    """Under the pipeline's shard_map XLA:GPU's partitioner made the stages' gradient accumulators
    whole over `expert` and all-gathered the expert weights to match, unless the executor constrains
    them (train/pipelined.layer_layout; XLA:CPU and `tiny` keep the split layout by themselves, so
    it takes `small` compiled for GPUs). Planted: stage_layout=None -> bf16[4, 16, 512, 512] gathers."""
    config = apply_overrides(get_preset("small"), ["model.dtype=bfloat16", "model.n_layers=9", "train.microbatches=4",
                                                   "mesh.data=2", "mesh.pipeline=2", "mesh.expert=2"])
    r = compile_step(config, parse_target(GPU), "pipeline", schedule="1f1b")
    all_experts = [line for line in r.hlo.splitlines() if "16,512,512]" in line]  # [.., 16 experts, D, F]
    assert not all_experts, all_experts[:3]
    assert "[1,4,8,512,512]" in r.hlo  # a stage's 4 layers x this device's 8 experts


def test_targets_parse_as_users_name_them_and_anything_else_is_refused():
    t = parse_target("h100x16/2")
    assert (t.platform, t.kind, t.topology, t.extra) == ("gpu", "h100", (2, 8), "cuda12")
    t = parse_target("tpu-v5e:2x4")
    assert (t.platform, t.kind, t.topology, t.chips) == ("tpu", "v5e", (2, 4), 8)
    for bad, says in [("h100", "unknown --target"), ("tpu-v9:2x2", "unknown --target"), ("h100x9/2", "split evenly"),
                      ("tpu-v5p:2x2", "3 dimensions")]:
        with pytest.raises(UsageError, match=says):
            parse_target(bad)
    proto = gpu_target_config(GPUS["a100"])
    assert "core_count: 108" in proto and "major: 8 minor: 0" in proto and 'platform_name: "CUDA"' in proto


def test_a_mesh_larger_than_the_target_is_one_line_and_exit_2():
    out = subprocess.run([sys.executable, "-m", "dsv3_jax.cli", "compile", "--target", "cpu", "--mesh", "expert=16"],
                         capture_output=True, text=True, env=cli_env(), timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "dsv3: error: the mesh expert=16 needs 16 devices but cpu has 1"


def test_a_missing_compiler_names_the_extra(monkeypatch):
    from jax.experimental import topologies

    def missing(*args, **kwargs):
        raise RuntimeError("Unknown backend cuda")

    monkeypatch.setattr(topologies, "get_topology_desc", missing)
    with pytest.raises(UsageError, match=r"`cuda12` extra: uv run --extra cuda12 dsv3 compile"):
        parse_target("h100x8").devices()


def test_hlo_stats_count_collectives_with_their_bytes():
    text = """
  %a = f32[8,128]{1,0} all-to-all(f32[8,128]{1,0} %x), replica_groups={}
  %s = (bf16[4,16]{1,0}, bf16[16,16]{1,0}) all-gather-start(bf16[4,16]{1,0} %y)
  %d = bf16[16,16]{1,0} all-gather-done((bf16[4,16]{1,0}, bf16[16,16]{1,0}) %s)
  %r = (f32[2]{0}, s32[]) all-reduce(f32[2]{0} %z, s32[] %w)
  %k = f32[256,128]{1,0} custom-call(%x), custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/pallas_call"}
  %g = f32[64,64]{1,0} custom-call(%x), custom_call_target="__cublas$gemm"
"""
    c = hlo_stats.collectives(text)
    assert c["all-to-all"] == {"count": 1, "bytes": 8 * 128 * 4}
    assert c["all-gather"] == {"count": 1, "bytes": 16 * 16 * 2}  # the done's result, counted once
    assert c["all-reduce"] == {"count": 1, "bytes": 2 * 4 + 4}
    assert c["reduce-scatter"] == {"count": 0, "bytes": 0}
    assert hlo_stats.kernels(text) == {"Mosaic TPU (Pallas)": 1, "cuBLAS": 1}


def test_async_windows_see_the_compute_scheduled_between_start_and_done():
    text = """
%fused_dot (p0: f32[64,32], p1: f32[32,16]) -> f32[64,16] {
  %parameter_0 = f32[64,32]{1,0} parameter(0)
  %parameter_1 = f32[32,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[64,16]{1,0} dot(%parameter_0, %parameter_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[64,32], b: f32[32,16], x: f32[8,128]) -> f32[8,128] {
  %a = f32[64,32]{1,0} parameter(0)
  %b = f32[32,16]{1,0} parameter(1)
  %x = f32[8,128]{1,0} parameter(2)
  %all-to-all-start = ((f32[8,128]{1,0}), f32[8,128]{1,0}) all-to-all-start(%x), replica_groups={{0,2,4,6},{1,3,5,7}}, metadata={op_name="jit(f)/fwd/dispatch"}
  %fusion = f32[64,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(f)/bwd/dot_general"}
  %convolution = f32[64,16]{1,0} convolution(%a, %b), dim_labels=bf_io->bf, metadata={op_name="jit(f)/fwd/dot_general"}
  %gemm = (f32[64,16]{1,0}, s8[1024]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(f)/bwd/dot_general"}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %no-operands = u32[] custom-call(), custom_call_target="tpu_iteration_id"
  %loop = f32[64,16]{1,0} while(%a), condition=%no_flops, body=%fused_dot, metadata={op_name="jit(f)/bwd/while"}, backend_config={"known_induction_variable":{"tuple_index":"0"},"known_trip_count":{"n":"3"}}
  %ragged-dot-none = f32[512,64]{1,0:T(8,128)} custom-call(%s, %x2, %w3), custom_call_target="tpu_custom_call", operand_layout_constraints={s32[1]{0}, f32[512,128]{1,0}, f32[2,128,64]{2,1,0}}, metadata={op_name="jit(f)/fwd/ragged_dot_general/ragged-dot-none"}
  %all-to-all-done = f32[8,128]{1,0} all-to-all-done(%all-to-all-start)
  %all-reduce-start = f32[8,128]{1,0} all-reduce-start(%all-to-all-done), replica_groups=[4,2]<=[8]
  ROOT %all-reduce-done = f32[8,128]{1,0} all-reduce-done(%all-reduce-start)
}
"""
    windows = {w["kind"]: w for w in hlo_stats.async_windows(text, scopes=("fwd", "bwd"))}
    gemm = 2 * 64 * 16 * 32  # each of the fused dot, the TPU-style convolution and the cuBLAS call
    ragged = 2 * 512 * 64 * 128  # XLA:TPU's ragged-dot kernel: [512, 128] rows x 2 experts' [128, 64]
    # A loop's body counts its known trip count times (GPU programs run the experts' GEMMs as loops
    # over blocks of rows: model/grouped_gemm.py).
    assert windows["all-to-all"]["flops_between"] == 3 * gemm + ragged + 3 * gemm
    assert windows["all-to-all"]["bytes"] == 8 * 128 * 4
    # What leaves the device: an all-to-all over 4 keeps its own quarter; a ring all-reduce over 2
    # sends 2 (G-1)/G of its bytes.
    assert windows["all-to-all"]["wire_bytes"] == 8 * 128 * 4 * 3 / 4
    assert windows["all-reduce"]["wire_bytes"] == 8 * 128 * 4 * 2 * 1 / 2
    assert windows["all-to-all"]["op"] == "jit(f)/fwd/dispatch" and windows["all-to-all"]["scope"] == "fwd"
    assert windows["all-to-all"]["flops_by_scope"] == {"bwd": 5 * gemm, "fwd": gemm + ragged}
    assert windows["all-reduce"]["flops_between"] == 0  # nothing scheduled inside it
    assert hlo_stats.collectives(text)["all-to-all"] == {"count": 1, "bytes": 8 * 128 * 4}  # nested-tuple start


def test_overlap_summary_counts_bytes_hidden_and_transfer_time_covered():
    """By hand, on a link of 1 byte/s and 1 FLOP/s: a window hides its bytes only when its compute
    takes the whole transfer; the covered time is each window's min(compute, transfer). In the F&B
    pair only the other chunk's FLOPs count."""
    from dsv3_jax.jobs.compile import PAIR_SCOPES, overlap_summary

    unit = dataclasses.replace(HARDWARE["h100"], bf16_flops=1.0, node_link_bytes_per_s=1.0)
    fwd, bwd = PAIR_SCOPES
    windows = [  # (bytes, wire bytes, FLOPs by scope, issuing scope)
        {"kind": "all-to-all", "bytes": 8, "wire_bytes": 4, "flops_between": 6, "scope": fwd,
         "flops_by_scope": {fwd: 1, bwd: 5}},  # other chunk 5 >= 4: hidden by it
        {"kind": "all-to-all", "bytes": 8, "wire_bytes": 4, "flops_between": 3, "scope": bwd,
         "flops_by_scope": {fwd: 2, bwd: 1}},  # other chunk 2 of 4
        {"kind": "all-to-all", "bytes": 16, "wire_bytes": 8, "flops_between": 0, "scope": None,
         "flops_by_scope": {}},
        {"kind": "collective-permute", "bytes": 10, "wire_bytes": 10, "flops_between": 20, "scope": None,
         "flops_by_scope": {None: 20}},
    ]
    summary = overlap_summary(windows, unit)
    a2a = summary["by_kind"]["all-to-all"]
    assert a2a["bytes_hidden"] == 8 and a2a["fraction_hidden"] == 8 / 32
    assert a2a["fraction_covered"] == (4 + 3 + 0) / (4 + 4 + 8)
    assert summary["by_kind"]["collective-permute"]["fraction_hidden"] == 1.0
    pair = summary["pair"]
    assert pair["all_to_alls"] == 2 and pair["with_other_chunk"] == 2 and pair["other_chunk_flops"] == 7
    assert pair["by_other_chunk_fraction_hidden"] == 8 / 16
    assert pair["by_other_chunk_fraction_covered"] == (4 + 2) / 8


def test_kernel_footprint_is_read_from_the_kernel_refs():
    """On-chip bytes of the TPU GEMM (no compile): 2 buffers of each blocked operand (Mosaic's
    pipeline) + the fp32 accumulator, the weight-block scales in SMEM; by hand for bm 128, bn 256."""
    from pallas_kernels.footprint import footprint
    from pallas_kernels.fp8_gemm import block_scaled_matmul

    m, k, n = 256, 1024, 512
    f32, e4m3 = np.float32, jax.numpy.float8_e4m3fn
    args = (jax.ShapeDtypeStruct((m, k), e4m3), jax.ShapeDtypeStruct((m, k // 128), f32),
            jax.ShapeDtypeStruct((k, n), e4m3), jax.ShapeDtypeStruct((k // 128, n // 128), f32))
    (call,) = footprint(lambda *a: block_scaled_matmul(*a, platform="tpu"), *args)
    bm, bn = 128, 256
    blocked = bm * 128 + bm * (k // 128) * 4 + 128 * bn + bm * bn * 4  # a tile, its scales, b tile, output
    assert call["grid"] == (m // bm, n // bn, k // 128)
    assert call["vmem_bytes"] == 2 * blocked + bm * bn * 4 and call["smem_bytes"] == (k // 128) * (n // 128) * 4


def test_grouped_kernel_holds_one_tiles_weight_scales_in_smem():
    """The grouped TPU GEMM's SMEM: the scalar-prefetched expert ids and used-block count once, and
    only its (expert, N tile) row of weight scales, double-buffered, whatever the expert count or N."""
    from pallas_kernels.footprint import footprint
    from pallas_kernels.fp8_grouped_gemm import grouped_block_scaled_matmul

    e4m3, f32 = jax.numpy.float8_e4m3fn, np.float32
    for experts, n in ((4, 512), (8, 2048)):
        m, k = 256, 1024
        args = (jax.ShapeDtypeStruct((m, k), e4m3), jax.ShapeDtypeStruct((m, k // 128), f32),
                jax.ShapeDtypeStruct((experts, k, n), e4m3), jax.ShapeDtypeStruct((experts, k // 128, n // 128), f32),
                jax.ShapeDtypeStruct((m // 128,), np.int32))
        (call,) = footprint(lambda *a: grouped_block_scaled_matmul(*a, platform="tpu"), *args)
        assert call["smem_bytes"] == (m // 128 + 1) * 4 + 2 * (k // 128) * (256 // 128) * 4, (experts, n, call)
