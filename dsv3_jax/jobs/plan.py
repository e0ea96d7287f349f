"""A layout planner: what one device holds, moves and computes in a train step, before running it.

From the config's abstract shapes (nothing allocated) and the sharding table (parallel/sharding.py)
on an abstract mesh of any size, per device:
- parameter, gradient and optimizer bytes: exact, from each leaf's shape, dtype and PartitionSpec;
  with `train.zero1` the optimizer state is split over the axes holding copies of each parameter,
  by the same rule the step's shardings use (`ShardingRules.zero1_spec`, report §3.2); pipeline
  ranks own 1/P of the MoE stack and 1/P at rest of everything else, which the step gathers (a row
  of its own: under SPMD every rank holds the gathered copy; DualPipe's mirrored stage, received
  for the step, is in that row too, and so is the pipeline executor's copy of the stages a rank
  runs, whose gradient accumulators are counted with the gradients);
- activation bytes: an inventory of the tensors the backward pass keeps per token and layer
  by activation name (`_layer_inventory`, the names of model/remat.py) and the parts the
  `model.remat` policy keeps. Pipelined with `train.pipeline_keep_residuals`, times the
  micro-batches in flight at the schedule's peak (Table 2: PP for 1F1B, PP + 1 for DualPipe);
  by default (stages recomputed in their backward) the executor's pools of stage inputs and
  cotangents, sized by its tick table, plus one stage's backward. Plus the output logits (one chunk
  of them with train.ce_chunk) and one layer's transient intermediates under rematerialisation;
- bytes moved per step by each collective (expert all-to-all, pipeline send/recv, data-parallel
  gradient reduction) and an estimated step time from the hardware table below.

`check_against_compiler` AOT-compiles the real train step on host devices and sets the planner's
per-device bytes beside `compiled.memory_analysis()` (tests/test_plan.py holds it to 15% for state
and 30% for temporaries on three meshes and a pipelined one; DualPipe and DualPipeV are slow-marked
there, and experiments/plan_vs_compiler.py compares `small` compiled for GPU and TPU targets).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from dsv3_jax.config import Config, MeshConfig, REMAT_NAMES
from dsv3_jax.errors import UsageError
from dsv3_jax.info import model_info
from dsv3_jax.model.remat import REPORT_KEPT
from dsv3_jax.parallel.expert import pair_capacity, ranks_per_token
from dsv3_jax.parallel.mesh import MESH_AXES, abstract_mesh, make_mesh
from dsv3_jax.parallel.pipeline.executor import stage_slots, stored_slots, tick_table
from dsv3_jax.parallel.pipeline.schedules import make_schedule
from dsv3_jax.parallel.sharding import rules_for, use_rules
from dsv3_jax.train.state import abstract_train_state
from dsv3_jax.train.step import make_train_step


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Peak rates of one device and its links (dense FLOP/s; bytes/s in one direction)."""

    name: str
    bf16_flops: float
    fp8_flops: float
    hbm_bytes: float
    node_link_bytes_per_s: float  # within a host (NVLink / ICI)
    network_bytes_per_s: float  # between hosts, per device (InfiniBand / DCN)
    devices_per_host: int


# Public figures. H800: NVLink 160 GB/s and IB 50 GB/s per GPU as the report states (§3.2.2), H100
# SXM dense peaks (989 bf16 / 1979 fp8 TFLOP/s; the H800 has the same cores). TPU v5p: 459 bf16
# TFLOP/s, 95 GB HBM, ICI 4,800 Gbps per chip (a pod slice is all ICI); no fp8, so fp8 = bf16.
HARDWARE: dict[str, Hardware] = {
    "h800": Hardware("NVIDIA H800 SXM", 989e12, 1979e12, 80e9, 160e9, 50e9, 8),
    "h100": Hardware("NVIDIA H100 SXM", 989e12, 1979e12, 80e9, 450e9, 50e9, 8),
    "tpu-v5p": Hardware("TPU v5p", 459e12, 459e12, 95e9, 600e9, 600e9, 4),
}


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the planner is asked: a config, mesh sizes, and how the step is run."""

    config: Config
    mesh: dict[str, int]
    hardware: Hardware
    matmul_efficiency: float = 0.5  # achieved / peak FLOP/s of the step's GEMMs (an assumption)
    node_limit: int = 4  # each token sent to at most this many nodes (report §3.2.2)
    # This package's attention materialises the [T, T] scores per head (XLA, as the compiler check
    # measures); a fused kernel (FlashAttention, as a GPU deployment would use) keeps only the
    # softmax statistics, one fp32 value per head and token.
    fused_attention: bool = False
    # This package's all-to-all computes fixed buffers (P x capacity rows x J expert slots) whether
    # full or not; False counts only the K real assignments per token (a dropless kernel's).
    padded_dispatch: bool = True

    # Read from the config the step runs with, so the plan and the program cannot disagree.
    @property
    def zero1(self) -> bool:  # optimizer state split over the parameter's copies (report §3.2)
        return self.config.train.zero1

    @property
    def fp8(self) -> bool:  # FP8 GEMMs (report §3.3): compute at the fp8 peak, dispatch sent in fp8
        return self.config.model.fp8


@dataclasses.dataclass(frozen=True)
class Plan:
    params: int  # bytes per device (the largest pipeline rank)
    grads: int
    optimizer: int
    activations: int
    gathered: int  # the weights outside the MoE stack gathered for the step (split at rest over pipeline)
    collectives: dict[str, int]  # bytes sent per device per step
    flops_per_device: float  # per step
    step_s: float
    tokens_per_s: float
    parts_s: dict[str, float]  # compute, bubble, each collective's time
    ranks: tuple = ()  # RankPlan per pipeline rank (pipelined layouts)

    @property
    def state(self) -> int:
        return self.params + self.optimizer

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.gathered


@dataclasses.dataclass(frozen=True)
class RankPlan:
    """What one pipeline rank's own stages need. The executor is one SPMD program, so every rank
    allocates the largest rank's buffers (`Plan`'s figures, which the compiler check measures); this
    is each rank's share of that, and what a per-rank program would hold."""
    rank: int
    stages: tuple[int, ...]  # the stages it runs (DualPipe: r and P-1-r; DualPipeV: r and 2P-1-r)
    runs: str  # the pieces outside the stack it runs: the embedding and dense layers, the head and MTP
    params: int
    grads: int
    optimizer: int
    activations: int  # its pools' entries at its peak + one of its stages' backward (+ the head's logits)
    gathered: int  # weights received for the step (as Plan.gathered: one SPMD program, equal stages)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.gathered


def _leaf_bytes(variable, mesh, rules, zero1: bool = False) -> int:
    """Bytes of one device's shard of an abstract Variable (the rules leave indivisible dims whole);
    `zero1`: an optimizer-state leaf, split as `rules.tree(..., zero1=True)` splits it."""
    value = variable.get_value()
    axes = variable.get_metadata().get("logical_axes")
    if not axes:
        return value.size * np.dtype(value.dtype).itemsize
    spec = rules.spec(tuple(axes), value.shape, mesh)
    spec = rules.zero1_spec(spec, value.shape, mesh) if zero1 else spec
    shape = jax.sharding.NamedSharding(mesh, spec).shard_shape(value.shape)
    return math.prod(shape) * np.dtype(value.dtype).itemsize


_PARTS = ("embed", "dense_layers", "moe_layers", "final_norm", "head", "mtp")


def _key_name(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))


def _bytes_by_part(tree, mesh, rules, zero1: bool = False) -> dict[str, int]:
    """{top-level module: bytes per device} of the Variables in `tree` (the params, or the optimizer
    state, whose moments mirror them; its step counters are not Variables and are left out)."""
    out: dict[str, int] = {}
    is_variable = lambda x: hasattr(x, "get_metadata")  # noqa: E731
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_variable):
        if is_variable(leaf):
            part = next(_key_name(k) for k in path if _key_name(k) in _PARTS)
            out[part] = out.get(part, 0) + _leaf_bytes(leaf, mesh, rules, zero1)
    return out


def _outside_stack(parts: dict[str, int]) -> int:
    return sum(v for k, v in parts.items() if k != "moe_layers")


def _stack_share(stack_parts: dict[str, int], pipeline: int, n_moe_layers: int) -> int:
    """One pipeline rank's stored share of the MoE stack (`stack_parts`: bytes of one pipeline rank's
    mesh): its stage-owned 1/P, ceil(L / P) layers when P does not divide them. Every schedule
    stores 1/P (parallel/pipeline/executor.py); DualPipe's mirrored stage P-1-r is received for the
    step, not stored (`plan` counts it with the gathered weights)."""
    stack = stack_parts.get("moe_layers", 0)
    if pipeline == 1:
        return stack
    if n_moe_layers:
        stack = stack * math.ceil(n_moe_layers / pipeline) * pipeline / n_moe_layers
    return round(stack / pipeline)


def _pipeline_rank_bytes(stack_parts: dict[str, int], rest_parts: dict[str, int], pipeline: int,
                         n_moe_layers: int) -> int:
    """The largest rank's stored bytes: its share of the MoE stack and its share at rest of everything
    else (`rest_parts`, per device on the whole mesh: the rules split those over `pipeline` too)."""
    return _stack_share(stack_parts, pipeline, n_moe_layers) + _outside_stack(rest_parts)


def expert_rows_per_token(cfg, tokens: int, ep: int, capacity_factor: float) -> float:
    """Rows the routed experts compute per local token: its K assignments without expert
    parallelism; with it, the all-to-all's fixed buffers (P destinations x capacity rows x J expert
    slots, parallel/expert.py), computed whether full or not."""

    if ep == 1:
        return cfg.top_k
    fan_out = ranks_per_token(cfg.top_k, ep, cfg.n_group, cfg.topk_group)
    capacity = pair_capacity(tokens, fan_out, ep, capacity_factor)
    slots = min(cfg.top_k, cfg.n_routed_experts // ep)
    return ep * capacity * slots / tokens


def _layer_inventory(cfg, tensor: int, moe: bool, expert_rows: float) -> dict[str, float]:
    """Bytes kept per token by one block's backward pass with nothing rematerialised, by the
    activation names of model/remat.py ("input" is the block's input, "other" what no name covers);
    the ones split over heads / hidden dims divided by the tensor axis. The attention scores are
    the caller's (they scale with `seq_len`). With FP8 activation caching (§3.3.4) the routed
    experts keep their input rows and SwiGLU inputs as e4m3 tiles with a fp32 scale per 128."""
    act = np.dtype(cfg.dtype).itemsize
    heads = cfg.n_heads / tensor
    D, Q, C, R = cfg.d_model, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_dim
    parts = {
        "input": D,
        "norm": 2 * D + Q + C,  # the block's two RMSNorms, the q and kv latents' (eq. 6, 1)
        "mla_down": Q + C + R,  # c_Q, [c_KV | k_R]
        # q (eq. 7-8) and its RoPE; k_C, v_C (eq. 2, 5); the keys with k_R broadcast to every head
        "mla_up": heads * (2 * cfg.qk_head_dim + cfg.qk_nope_dim + cfg.v_head_dim + cfg.qk_head_dim),
        "attention": heads * cfg.v_head_dim,
        "residual": D,
        "other": D + R,  # the attention block's output, RoPE'd k_R
    }
    parts = {name: values * act for name, values in parts.items()}
    if moe:
        F_routed, F_shared = cfg.moe_ffn_dim / tensor, cfg.n_shared_experts * cfg.moe_ffn_dim / tensor
        # The routed experts' gate and up products are fp32 (model/blocked_swiglu.py, ragged_dot's
        # fp32 results), the shared experts' in the compute dtype.
        fp8_cached = cfg.fp8 and cfg.fp8_activation_cache
        routed = (1 + 4 / 128) if fp8_cached else 4
        parts.update(swiglu_in=2 * expert_rows * F_routed * routed + 2 * F_shared * act,
                     swiglu_out=(expert_rows * F_routed + F_shared) * act,
                     expert_in=expert_rows * D * ((1 + 4 / 128) if fp8_cached else act))
        parts["other"] += (2 * D + 3 * cfg.n_routed_experts) * act  # shared and routed outputs; router scores
    else:
        F = cfg.ffn_dim / tensor
        parts.update(swiglu_in=2 * F * act, swiglu_out=F * act)
        parts["other"] += D * act
    return parts


def kept_names(remat: str) -> tuple[str, ...]:
    """The inventory parts a `model.remat` policy keeps between the forward and backward passes."""
    chosen = {"none": REMAT_NAMES + ("other",), "full": (), "report": REPORT_KEPT}.get(remat)
    return ("input",) + tuple(remat.split(",") if chosen is None else chosen)


def activation_bytes(config: Config, tokens: int, sizes: dict[str, int], layers: dict[str, int],
                     in_flight: int, fused_attention: bool = False, padded_dispatch: bool = True) -> int:
    """Bytes kept for the backward pass on one device: `tokens` per micro-batch, `in_flight`
    micro-batches at the schedule's peak, `layers` = {"dense": n, "moe": n} on this device.
    Under a `model.remat` policy each layer keeps its input and the policy's parts, and one layer's
    recomputed intermediates live during its backward."""
    cfg, tc = config.model, config.train
    tensor = sizes["tensor"]
    rows = (expert_rows_per_token(cfg, tokens, sizes["expert"], cfg.expert_capacity_factor) if padded_dispatch
            else cfg.top_k)
    # fp32 scores and probabilities per token (or only the softmax statistics, fused)
    scores = (cfg.n_heads / tensor) * 4 * (1 if fused_attention else 2 * tc.seq_len)
    inventory = {kind: _layer_inventory(cfg, tensor, kind == "moe", rows) for kind in ("dense", "moe")}
    every = {kind: sum(parts.values()) + scores for kind, parts in inventory.items()}
    if cfg.remat == "none":
        return round(sum(every[kind] * n for kind, n in layers.items()) * tokens * in_flight)
    kept = kept_names(cfg.remat)
    # the softmax statistics (fp32, one per head) are kept with the attention output
    stats = (cfg.n_heads / tensor) * 4 if "attention" in kept else 0
    per_layer = {kind: sum(v for name, v in parts.items() if name in kept) + stats
                 for kind, parts in inventory.items()}
    return round(sum(per_layer[kind] * n for kind, n in layers.items()) * tokens * in_flight
                 + max(every.values()) * tokens)


def logits_bytes(config: Config, tokens: int, tensor: int) -> int:
    """The output heads' fp32 logits, their softmax and their gradient (main head + D MTP heads).
    With train.ce_chunk (train/loss.py chunked_cross_entropy) one chunk of one head's at a time, and
    the heads' inputs, which the backward recomputes the chunks' logits from."""
    cfg, tc = config.model, config.train
    heads, vocab = 1 + cfg.mtp_depth, cfg.vocab_size // tensor
    if not tc.ce_chunk:
        return 3 * tokens * heads * vocab * 4
    head_inputs = heads * tokens * cfg.d_model * np.dtype(cfg.dtype).itemsize
    return round(3 * tokens * tc.ce_chunk / tc.seq_len * vocab * 4) + head_inputs


def peak_in_flight(schedule: str, pipeline: int, microbatches: int) -> int:
    """Micro-batches whose activations a rank holds at its peak (Table 2: PP for 1F1B and ZB1P,
    PP + 1 for DualPipe; GPipe holds all of them)."""
    if pipeline == 1:
        return 1
    if schedule == "gpipe":
        return microbatches
    return min(pipeline + (1 if schedule in ("dualpipe", "dualpipev") else 0), microbatches)


def bubble_fraction(schedule: str, pipeline: int, microbatches: int) -> float:
    """Idle / busy time of a rank, from Table 2's bubbles with F = W = 1 forward chunk, a full
    backward B = 2 and F&B = F + B (no overlap counted), over microbatches x (F + B) of work."""
    if pipeline == 1:
        return 0.0
    f, b, w = 1.0, 2.0, 1.0
    bubble = {"gpipe": (pipeline - 1) * (f + b), "1f1b": (pipeline - 1) * (f + b),
              "zb1p": (pipeline - 1) * (f + b - 2 * w),
              "dualpipe": (pipeline / 2 - 1) * ((f + b) + b - 3 * w),
              "dualpipev": (pipeline / 2 - 1) * ((f + b) + b - 3 * w)}[schedule]
    return bubble / (microbatches * (f + b))


def plan(layout: Layout) -> Plan:
    config, sizes, hw = layout.config, {a: layout.mesh.get(a, 1) for a in MESH_AXES}, layout.hardware
    cfg, tc = config.model, config.train
    mesh = abstract_mesh(sizes)
    _, _, state = abstract_train_state(config)
    schedule, pp = tc.pipeline_schedule, sizes["pipeline"]

    # The stack's bytes inside one pipeline rank (its stage-owned split and uneven stages are
    # `_stack_share`'s), everything else's on the whole mesh (split at rest over `pipeline` as over
    # fsdp, parallel/sharding.py).
    in_stage = abstract_mesh({**sizes, "pipeline": 1})
    rules = rules_for(layout.config)
    params_in_stage, params_at_rest = _bytes_by_part(state.params, in_stage, rules), _bytes_by_part(state.params, mesh, rules)
    params = _pipeline_rank_bytes(params_in_stage, params_at_rest, pp, cfg.n_moe_layers)
    optimizer = _pipeline_rank_bytes(_bytes_by_part(state.opt_state, in_stage, rules, tc.zero1),
                                     _bytes_by_part(state.opt_state, mesh, rules, tc.zero1), pp, cfg.n_moe_layers)
    # The step gathers the weights outside the stack, and receives the stages a rank runs but does not
    # store (DualPipe's mirrored stage P-1-r beside its own: Table 2's 2x parameters; DualPipeV's V)
    # into a step buffer (parallel/pipeline/executor.py `stored_slots`; its own stages are read in
    # place). Their gradients are whole until reduced or sent back (under SPMD every rank allocates
    # both, whichever stage uses them).
    # The tick loop accumulates a stage's gradients after its backward has produced them whole: one
    # stage's more (compiled for 8 H100s and a v5p slice, experiments/results/plan_vs_compiler.md).
    pipeline_schedule = make_schedule(schedule, pp, tc.microbatches) if pp > 1 else None
    received = backward_output = 0
    if pp > 1:
        stored_per_rank = pipeline_schedule.n_stages // pp
        per_stage = _stack_share(params_in_stage, pp, cfg.n_moe_layers) / stored_per_rank
        received = round(per_stage * stored_slots(pipeline_schedule).count(None))
        backward_output = round(per_stage)
    gathered = _outside_stack(params_in_stage) - _outside_stack(params_at_rest) + received
    grads = params + gathered + backward_output  # same dtype and layout as the parameters, the rest whole

    # Tokens per device per micro-batch: rows split over data x fsdp x expert (the "batch" axes).
    batch_ways = rules.shards("batch", sizes)
    microbatches = tc.microbatches if pp > 1 else 1
    rows = tc.batch_size / batch_ways / microbatches
    tokens = rows * tc.seq_len
    n_stages = 2 * pp if schedule == "dualpipev" and pp > 1 else pp
    n_moe_local = math.ceil(cfg.n_moe_layers / n_stages)
    layers = {"dense": cfg.first_k_dense, "moe": n_moe_local + cfg.mtp_depth}  # the first / last stage's
    recompute = pp > 1 and not tc.pipeline_keep_residuals
    entry_bytes = round(tokens) * cfg.d_model * np.dtype(cfg.dtype).itemsize  # one stage input of a micro-batch

    def kept(layers: dict[str, int], in_flight: int) -> int:
        return activation_bytes(config, round(tokens), sizes, layers, in_flight, layout.fused_attention,
                                layout.padded_dispatch)

    ticks = tick_table(pipeline_schedule) if pp > 1 else None
    if recompute:
        # The executor's default (train.pipeline_keep_residuals=false, parallel/pipeline/executor.py):
        # a rank stores only stage inputs and cotangents, in pools the tick table sizes, and runs one
        # stage's backward at a time, its forward recomputed under the remat policy.
        activations = (ticks.n_stash + ticks.n_inbox + ticks.n_cot) * entry_bytes + kept(layers, 1)
    else:  # every in-flight micro-batch's residuals kept (Table 2's count)
        activations = kept(layers, peak_in_flight(schedule, pp, microbatches))
    activations += logits_bytes(config, round(tokens), sizes["tensor"])

    ranks = ()
    if pp > 1:  # each rank's own stages: pools from its own tick-table entries, the pieces it runs
        last = n_stages - 1
        per_rank = []
        for r, slots in enumerate(stage_slots(pipeline_schedule)):
            stages = tuple(sorted({stage for _, stage in slots}))
            first_here, last_here = 0 in stages, last in stages
            own = {"dense": cfg.first_k_dense if first_here else 0,
                   "moe": n_moe_local + (cfg.mtp_depth if last_here else 0)}
            stash, inbox, cot = ticks.by_rank[r]
            held = (stash + inbox + cot) * entry_bytes + kept(own, 1) if recompute else kept(own, stash)
            held += logits_bytes(config, round(tokens), sizes["tensor"]) if last_here else 0
            runs = ", ".join(p for p, here in (("embedding + dense layers", first_here), ("head + MTP", last_here))
                             if here) or "-"
            per_rank.append(RankPlan(r, stages, runs, params, grads, optimizer, held, gathered))
        ranks = tuple(per_rank)

    # Collectives, bytes sent per device per step.
    act = 1 if layout.fp8 else np.dtype(cfg.dtype).itemsize
    ep = sizes["expert"]
    step_tokens = tokens * microbatches  # this device's tokens per step
    a2a = 0.0
    if ep > 1 and cfg.n_routed_experts:
        leaving = (ep - 1) / ep
        # dispatch (fp8 with FP8 training, report §3.3.4) + combine (bf16), forward and backward.
        per_token = cfg.top_k * cfg.d_model * leaving * (act + 2) * 2
        a2a = per_token * step_tokens * (n_moe_local + cfg.mtp_depth)
    pipeline_bytes = 0.0
    if pp > 1:  # a stage boundary: the activation forward, its gradient back, per micro-batch
        pipeline_bytes = 2 * step_tokens * cfg.d_model * 2
    dp = sizes["data"] * sizes["fsdp"]
    # Gradient reduction (reduce-scatter) + parameter all-gather: 2 (dp - 1) / dp of the bytes.
    dp_bytes = 2 * grads * (dp - 1) / dp if dp > 1 else 0.0
    collectives = {"expert all-to-all": round(a2a), "pipeline send/recv": round(pipeline_bytes),
                   "data-parallel reduce": round(dp_bytes)}

    # Time: 3x the forward FLOPs (forward + backward for inputs and for weights) over all devices.
    n_devices = math.prod(sizes.values())
    flops_per_token = 3 * model_info(cfg, seq_len=tc.seq_len)["flops_per_token"]
    global_tokens = tc.batch_size * tc.seq_len
    flops = flops_per_token * global_tokens / n_devices
    if recompute:  # the forward again in each backward: 4/3, or 5/3 where input and weight backward split
        flops *= 5 / 3 if schedule in ("zb1p", "dualpipe", "dualpipev") else 4 / 3
    peak = hw.fp8_flops if layout.fp8 else hw.bf16_flops
    compute_s = flops / (peak * layout.matmul_efficiency)
    nodes_in_ep = max(1, ep // hw.devices_per_host)
    if nodes_in_ep > 1:  # IB carries each token once per remote node (at most node_limit nodes)
        remote_nodes = min(layout.node_limit, nodes_in_ep) * (nodes_in_ep - 1) / nodes_in_ep
        ib = a2a / (cfg.top_k * (ep - 1) / ep) * remote_nodes
        a2a_s = max(ib / hw.network_bytes_per_s, a2a / hw.node_link_bytes_per_s)
    else:
        a2a_s = a2a / hw.node_link_bytes_per_s
    pipeline_s = pipeline_bytes / hw.network_bytes_per_s
    dp_s = dp_bytes / hw.network_bytes_per_s
    bubble_s = compute_s * bubble_fraction(schedule, pp, microbatches)
    # DualPipe hides all-to-all and pipeline traffic behind the paired chunk's compute (§3.2.1);
    # other schedules expose them. The data-parallel reduction is counted as exposed.
    hidden = schedule == "dualpipe" and pp > 1
    comm = a2a_s + pipeline_s
    step_s = (max(compute_s, comm) if hidden else compute_s + comm) + bubble_s + dp_s
    return Plan(params=params, grads=grads, optimizer=optimizer, activations=activations, gathered=gathered,
                collectives=collectives, ranks=ranks,
                flops_per_device=flops, step_s=step_s, tokens_per_s=global_tokens / step_s,
                parts_s={"compute": compute_s, "bubble": bubble_s, "expert all-to-all": a2a_s,
                         "pipeline send/recv": pipeline_s, "data-parallel reduce": dp_s})


def compare_with_compiled(planned: Plan, config: Config, argument_bytes: int, temporary_bytes: int
                          ) -> dict[str, tuple[int, int]]:
    """{"state": (planned, compiled), "temporaries": (planned, compiled)} bytes per device, from a
    compiled step's `memory_analysis()` (state: its arguments less the token batch; temporaries:
    gradients, activations and the weights gathered for the step)."""
    tc = config.train
    batch_bytes = tc.batch_size * (tc.seq_len + 1) * 4 // rules_for(config).shards("batch", config.mesh.sizes())
    return {"state": (planned.state, argument_bytes - batch_bytes),
            "temporaries": (planned.grads + planned.activations + planned.gathered, temporary_bytes)}


def check_against_compiler(config: Config, sizes: dict[str, int]) -> dict[str, tuple[int, int]]:
    """`compare_with_compiled` for the real train step AOT-compiled on this machine's devices."""
    import dataclasses as dc

    config = dc.replace(config, mesh=MeshConfig(**sizes))
    graphdef, optimizer, state = abstract_train_state(config)
    mesh = make_mesh(config.mesh)
    rules = rules_for(config)
    shardings, batch_sharding = rules.tree(state, mesh, config.train.zero1), rules.batch(mesh)
    tc = config.train
    batch = jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len + 1), np.int32)
    pipeline_mesh = mesh if config.mesh.pipeline > 1 else None
    step = jax.jit(make_train_step(config, graphdef, optimizer, pipeline_mesh=pipeline_mesh),
                   in_shardings=(shardings, batch_sharding), out_shardings=(shardings, rules.sharding((), mesh)),
                   donate_argnums=0)
    with jax.set_mesh(mesh), use_rules(rules):
        memory = step.lower(state, batch).compile().memory_analysis()
    planned = plan(Layout(config, sizes, HARDWARE["h100"]))
    return compare_with_compiled(planned, config, memory.argument_size_in_bytes, memory.temp_size_in_bytes)


def check_layout(layout: Layout) -> None:
    """UsageError naming the first thing the mesh cannot split evenly."""

    cfg, tc, sizes = layout.config.model, layout.config.train, layout.mesh
    batch_ways = rules_for(layout.config).shards("batch", {a: sizes.get(a, 1) for a in MESH_AXES})
    pp = sizes.get("pipeline", 1)
    checks = [
        (tc.batch_size % (batch_ways * (tc.microbatches if pp > 1 else 1)) == 0,
         f"train.batch_size={tc.batch_size} must divide over data x fsdp x expert = {batch_ways} ranks"
         + (f" x train.microbatches={tc.microbatches}" if pp > 1 else "")),
        (cfg.n_routed_experts % sizes.get("expert", 1) == 0,
         f"model.n_routed_experts={cfg.n_routed_experts} must divide over mesh.expert={sizes.get('expert', 1)}"),
        (cfg.n_heads % sizes.get("tensor", 1) == 0,
         f"model.n_heads={cfg.n_heads} must divide over mesh.tensor={sizes.get('tensor', 1)}"),
        (not (pp > 1 and tc.pipeline_schedule == "dualpipe" and pp % 2),
         f"DualPipe needs an even mesh.pipeline, got {pp}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if pp > 1:
        try:  # the schedule's own checks (the planner sizes the executor's pools from its tick table)
            make_schedule(tc.pipeline_schedule, pp, tc.microbatches)
        except ValueError as e:
            raise UsageError(f"{e} (train.pipeline_schedule, train.microbatches)") from None


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.2f} MB"


RANK_COLUMNS = ("rank", "stages", "runs", "parameters", "gradients", "optimizer", "activations at its peak",
                "weights received for the step", "total")


def rank_rows(result: Plan) -> list[tuple[str, ...]]:
    """One row per pipeline rank (RANK_COLUMNS), then the program's allocation on every rank."""
    rows = [(str(r.rank), ", ".join(map(str, r.stages)), r.runs, _gb(r.params), _gb(r.grads), _gb(r.optimizer),
             _gb(r.activations), _gb(r.gathered), _gb(r.total)) for r in result.ranks]
    if rows:
        rows.append(("every rank (one SPMD program: the largest of each buffer)", "", "", _gb(result.params),
                     _gb(result.grads), _gb(result.optimizer), _gb(result.activations), _gb(result.gathered),
                     _gb(result.total)))
    return rows


def report_rows(layout: Layout, result: Plan) -> list[tuple[str, str]]:
    """(quantity, value) rows of a plan, per device unless stated."""
    hw, n_devices = layout.hardware, math.prod(layout.mesh.get(a, 1) for a in MESH_AXES)
    rows = [("devices", f"{n_devices:,} x {hw.name} ({hw.devices_per_host} per host)"),
            ("mesh", ", ".join(f"{a}={layout.mesh.get(a, 1)}" for a in MESH_AXES)),
            ("parameters", _gb(result.params)), ("gradients", _gb(result.grads)),
            ("optimizer state" + (" (ZeRO-1)" if layout.zero1 else ""), _gb(result.optimizer)),
            ("activations at the schedule's peak", _gb(result.activations)),
            ("weights gathered for the step (outside the stack; stages a rank runs but does not store, "
             "e.g. DualPipe's mirrored one)", _gb(result.gathered)),
            ("total", f"{_gb(result.total)} of {_gb(hw.hbm_bytes)} HBM")]
    rows += [(f"{name} sent per step", _gb(n)) for name, n in result.collectives.items()]
    rows += [(f"time: {name}", f"{1e3 * s:,.1f} ms") for name, s in result.parts_s.items()]
    trillion_s = 1e12 / result.tokens_per_s
    rows += [("step time", f"{result.step_s:,.2f} s"), ("tokens/s (all devices)", f"{result.tokens_per_s:,.0f}"),
             ("device-hours per trillion tokens", f"{n_devices * trillion_s / 3600 / 1e3:,.0f}K"),
             ("days per trillion tokens", f"{trillion_s / 86400:,.1f}")]
    return rows
