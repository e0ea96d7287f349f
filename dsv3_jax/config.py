"""Configuration as data: frozen dataclasses, named presets, `--set a.b=c` overrides.

Every value is checked in `__post_init__`; a bad value raises `ConfigError` whose message
names the field, the value, and what is allowed (the CLI prints it as one line, exit 2).
This module imports nothing from the package: checks that need another module's knowledge
(registered routers, pipeline stages, how the mesh shards the batch) live in `validate.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value (or override) that is not allowed. Message: one line."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _require_each(obj, section: str, names: tuple[str, ...], ok, allowed: str) -> None:
    """`ok(value)` for each named field, else one line: section.name=value must be <allowed>."""
    for name in names:
        value = getattr(obj, name)
        _require(ok(value), f"{section}.{name}={value!r} must be {allowed}")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config class's fields (`inspect`, not `typing.get_type_hints`,
    which returns nothing for the @typing.no_type_check classes below)."""
    return inspect.get_annotations(cls, eval_str=True)


def _choice_fields(cls: type) -> dict[str, tuple[str, ...]]:
    return {name: typing.get_args(annotation) for name, annotation in _field_types(cls).items()
            if typing.get_origin(annotation) is Literal}


def _require_choices(obj, section: str) -> None:
    """Every `Literal`-typed field holds one of its declared options (the one list of them)."""
    for name, allowed in _choice_fields(type(obj)).items():
        value = getattr(obj, name)
        _require(value in allowed, f"{section}.{name}={value!r} must be one of: {', '.join(allowed)}")


# The options of each choice field, declared once; the modules that implement them read these.
DType = Literal["float32", "bfloat16"]
ScoreFunc = Literal["sigmoid", "softmax"]
Fp8Backend = Literal["xla", "pallas"]  # quant/fp8.py
GroupedGemmImpl = Literal["auto", "ragged_dot", "blocked"]  # model/grouped_gemm.py
ExpertDispatch = Literal["a2a", "ragged", "ring", "gspmd"]  # parallel/expert.py
Objective = Literal["pretrain", "sft", "grpo"]  # "sft": packed examples (post/sft.py); "grpo": jobs/grpo.py
Attention = Literal["mla", "mha", "gqa", "mqa"]  # model/mla.py; the others model/gqa.py
AdvantageNorm = Literal["std", "none"]  # post/grpo.py group_advantages
PipelineSchedule = Literal["gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev"]  # parallel/pipeline/schedules.py
# model.remat (model/remat.py): one of these policies, or a comma-separated list of the activations
# the blocks name (REMAT_NAMES) to keep, everything else recomputed in the backward pass.
REMAT_POLICIES = ("none", "full", "report")
REMAT_NAMES = ("norm", "mla_down", "mla_up", "attention", "residual", "swiglu_in", "swiglu_out", "expert_in")


# A plugin's hyperparameters: (name, value) pairs, hashable (the config is a static attribute of the
# model's graph). Values are numbers, booleans or strings, typed by the plugin's `Args` fields.
PluginArgs = tuple[tuple[str, Any], ...]
ARGS_FIELDS = ("router_args", "balancer_args")

# Changes to the logical-axis table (parallel/sharding.py): (logical name, mesh axes) pairs, e.g.
# --set sharding.heads= (replicate attention heads) or --set sharding.batch=data,fsdp. Names are
# checked against the table when the config is validated (validate.py).
ShardingOverrides = tuple[tuple[str, tuple[str, ...]], ...]


@typing.no_type_check  # the fields check themselves (__post_init__), naming what is allowed
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3 architecture hyper-parameters (field names follow the report / HF config)."""

    vocab_size: int = 2048
    d_model: int = 128
    n_layers: int = 4
    first_k_dense: int = 1  # the first k layers use a dense SwiGLU FFN instead of MoE
    n_heads: int = 4
    # Attention: "mla" (report §2.1.1) or, for comparison, standard attention with per-head keys
    # and values ("mha"), grouped query heads sharing n_kv_heads K/V heads ("gqa") or one ("mqa").
    # The standard variants use head dim qk_nope_dim + qk_rope_dim (RoPE on its last qk_rope_dim
    # dims) and v_head_dim; their cache holds kv_heads x (qk_head_dim + v_head_dim) per token.
    attention: Attention = "mla"
    n_kv_heads: int = 0  # gqa only: K/V heads, a divisor of n_heads (mha: n_heads, mqa: 1)
    q_lora_rank: int = 64  # 0: plain W_Q (as DeepSeek-V2-Lite)
    kv_lora_rank: int = 32  # C: the cached latent c_KV
    qk_nope_dim: int = 16
    qk_rope_dim: int = 16  # R: decoupled RoPE dim (shared k_R is cached too)
    v_head_dim: int = 16
    ffn_dim: int = 384  # dense layers' intermediate size
    moe_ffn_dim: int = 64  # each expert's intermediate size
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    top_k: int = 2
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 2.5
    score_func: ScoreFunc = "sigmoid"
    norm_topk_prob: bool = True
    # Routing lab (model/routing.py): a registered router, and "+"-joined balancers.
    router: str = "deepseek_v3"
    balancer: str = "aux_free+sequence_loss"  # V3: sign-bias update + complementary sequence loss
    # A plugin's own hyperparameters, checked against the fields of its `Args` dataclass when the
    # config is validated: --set model.router_args.temperature=0.5, and per balancer
    # --set model.balancer_args.NAME.FIELD=VALUE (stored as "NAME.FIELD").
    router_args: PluginArgs = ()
    balancer_args: PluginArgs = ()
    # RoPE + YaRN (report §4.3: factor 40, alpha=beta_slow 1, beta=beta_fast 32). yarn_factor 1 = off.
    rope_theta: float = 10000.0
    yarn_factor: float = 1.0
    original_max_position: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 1.0
    max_seq_len: int = 256
    mtp_depth: int = 1  # D sequential MTP modules (eq. 21-25); 0 disables MTP
    dtype: DType = "float32"  # compute dtype
    param_dtype: DType = "float32"  # master weights
    init_std: float = 0.02
    norm_eps: float = 1e-6
    # What each layer keeps for its backward pass (model/remat.py): "none" (everything), "full" (its
    # input only), "report" (all but the RMSNorm, MLA up-projection and SwiGLU outputs, §3.2.3 and
    # §3.3.4), or a list of REMAT_NAMES to keep ("attention,swiglu_in"). true / false read as full / none.
    remat: str | bool = "none"
    # Training runs a layer stack of at most this many layers unrolled: a rolled lax.scan stacks every
    # layer's residuals into [L, ...] buffers, which XLA:CPU fills and reads slowly (train step:
    # tiny 185 -> 165 ms, small 2.78 -> 2.62 s; compile time unchanged at 4 layers). Deeper stacks stay
    # rolled so compile time stays flat in depth; cached decoding always runs rolled (faster there).
    unroll_layers: int = 8
    # FP8 (report §3.3): block-scaled e4m3 GEMMs for MLA projections, FFNs and experts.
    fp8: bool = False
    fp8_backend: Fp8Backend = "xla"
    # With fp8 (report §3.3.4): the FP8 Linears keep their inputs for the Wgrad as e4m3 1x128 tiles
    # and scales, and the routed experts their input rows and SwiGLU inputs; false keeps them in
    # the compute dtype. The Linear after attention keeps bf16 (the report's E5M6 has no JAX dtype).
    fp8_activation_cache: bool = True
    # Routed experts' grouped GEMM (model/grouped_gemm.py): "auto" = "ragged_dot" on TPU (XLA:TPU's
    # grouped kernels), "blocked" on CPU and GPU (both XLA backends lower ragged_dot densely over
    # all experts).
    grouped_gemm: GroupedGemmImpl = "auto"
    # Routed experts under a mesh with expert > 1 (parallel/expert.py, report §3.2.2): each rank
    # computes only its experts. "a2a": portable all-to-all, each token sent once per rank, buffers
    # of expert_capacity_factor x the balanced share (drops counted); "ragged": the same with
    # ragged_all_to_all (GPU/TPU); "ring": all-gather + reduce-scatter, dropless; "gspmd": leave it
    # to XLA's partitioner (which gathers the expert weights). Explicit ones need token choice.
    expert_dispatch: ExpertDispatch = "a2a"
    expert_capacity_factor: float = 2.0

    def __post_init__(self) -> None:
        _require_each(self, "model", ("vocab_size", "d_model", "n_layers", "n_heads", "kv_lora_rank", "qk_nope_dim",
                                      "v_head_dim", "max_seq_len", "original_max_position"),
                      lambda v: isinstance(v, int) and v > 0, "a positive integer")
        _require_each(self, "model", ("q_lora_rank", "first_k_dense", "n_shared_experts", "mtp_depth",
                                      "n_routed_experts", "unroll_layers"),
                      lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
        _require(self.qk_rope_dim > 0 and self.qk_rope_dim % 2 == 0,
                 f"model.qk_rope_dim={self.qk_rope_dim} must be a positive even integer (RoPE rotates pairs)")
        _require(self.first_k_dense <= self.n_layers,
                 f"model.first_k_dense={self.first_k_dense} must be <= model.n_layers={self.n_layers}")
        _require_choices(self, "model")
        if self.attention == "gqa":
            _require(isinstance(self.n_kv_heads, int) and self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
                     f"model.n_kv_heads={self.n_kv_heads} must be a positive divisor of model.n_heads={self.n_heads} "
                     "with model.attention=gqa")
        else:
            _require(self.n_kv_heads == 0, f"model.n_kv_heads={self.n_kv_heads} is only used with model.attention=gqa "
                                           f"(here {self.attention!r}); leave it 0")
        _require(self.expert_capacity_factor > 0 and math.isfinite(self.expert_capacity_factor),
                 f"model.expert_capacity_factor={self.expert_capacity_factor} must be a positive number")
        if self.n_moe_layers > 0 or self.mtp_depth > 0:
            self._check_moe()
        if self.first_k_dense > 0:
            _require(self.ffn_dim > 0, f"model.ffn_dim={self.ffn_dim} must be > 0 when first_k_dense > 0")
        _require(self.rope_theta > 0, f"model.rope_theta={self.rope_theta} must be > 0")
        _require(self.yarn_factor >= 1.0, f"model.yarn_factor={self.yarn_factor} must be >= 1 (1 = YaRN off)")
        _require(self.yarn_beta_fast > self.yarn_beta_slow > 0,
                 f"model.yarn_beta_fast={self.yarn_beta_fast} must be > model.yarn_beta_slow={self.yarn_beta_slow} > 0")
        _require(self.init_std > 0 and math.isfinite(self.init_std), f"model.init_std={self.init_std} must be > 0")
        _require(self.norm_eps > 0, f"model.norm_eps={self.norm_eps} must be > 0")
        self._check_remat()

    def _check_remat(self) -> None:
        as_bool = {True: "full", False: "none", "true": "full", "false": "none"}
        if isinstance(self.remat, bool) or self.remat in as_bool:  # the switch this field used to be
            object.__setattr__(self, "remat", as_bool[self.remat])
        names = self.remat.split(",")
        _require(self.remat in REMAT_POLICIES or (all(names) and set(names) <= set(REMAT_NAMES)),
                 f"model.remat={self.remat!r} must be one of {', '.join(REMAT_POLICIES)}, or a comma-separated "
                 f"list of the activations to keep from: {', '.join(REMAT_NAMES)}")

    def _check_moe(self) -> None:
        E, G = self.n_routed_experts, self.n_group
        _require(E > 0, f"model.n_routed_experts={E} must be > 0 when there are MoE layers "
                        f"(n_layers - first_k_dense = {self.n_moe_layers}, mtp_depth = {self.mtp_depth})")
        _require(self.moe_ffn_dim > 0, f"model.moe_ffn_dim={self.moe_ffn_dim} must be > 0")
        _require(G >= 1, f"model.n_group={G} must be >= 1")
        _require(E % G == 0, f"model.n_routed_experts={E} must be divisible by model.n_group={G}")
        _require(1 <= self.topk_group <= G,
                 f"model.topk_group={self.topk_group} must be between 1 and model.n_group={G}")
        reachable = self.topk_group * (E // G)
        _require(1 <= self.top_k <= reachable,
                 f"model.top_k={self.top_k} must be between 1 and the {reachable} experts reachable in "
                 f"topk_group={self.topk_group} of n_group={G} groups of {E // G}")
        if self.score_func == "sigmoid" and G > 1:
            _require(E // G >= 2, f"model.n_group={G} leaves {E // G} expert per group; sigmoid group scores "
                                  "sum each group's top-2, so groups need >= 2 experts")
        _require(self.routed_scaling_factor > 0,
                 f"model.routed_scaling_factor={self.routed_scaling_factor} must be > 0")

    @property
    def balancer_names(self) -> list[str]:
        return [name.strip() for name in self.balancer.split("+") if name.strip()]

    def args_of_balancer(self, name: str) -> PluginArgs:
        """balancer_args' "NAME.FIELD" entries of balancer `name` (NAME as in model.balancer, or a
        plugin's registered name after its "module:"), as (FIELD, value) pairs."""
        names = {name, name.rpartition(":")[2]}
        return tuple((key.rpartition(".")[2], value) for key, value in self.balancer_args
                     if key.rpartition(".")[0] in names)

    # Derived sizes -------------------------------------------------------------------------
    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.first_k_dense

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_dim + self.qk_rope_dim

    @property
    def kv_heads(self) -> int:
        """K/V heads of the standard attentions (mha: n_heads, gqa: n_kv_heads, mqa: 1); 0 for MLA."""
        return {"mla": 0, "mha": self.n_heads, "gqa": self.n_kv_heads, "mqa": 1}[self.attention]

    @property
    def kv_cache_values_per_token_per_layer(self) -> int:
        """MLA caches RMSNorm(c_KV) and the roped shared k_R only (report §2.1.1); the standard
        attentions cache every K/V head's key and value."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_dim
        return self.kv_heads * (self.qk_head_dim + self.v_head_dim)


@typing.no_type_check  # the fields check themselves (__post_init__), naming what is allowed
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from: `stdlib` (this interpreter's standard library source), `synthetic`,
    or a path / glob of .txt / .py / .jsonl files."""

    source: str = "stdlib"
    max_bytes: int = 6_000_000  # corpus budget read from the source (deterministic order)
    tokenizer: str = ""  # path to a tokenizer.json; empty: train a byte-level BPE on the corpus
    fim_rate: float = 0.1  # report §4.1: FIM at rate 0.1, PSM form
    val_fraction: float = 0.02  # share of documents held out for validation
    shuffle_seed: int = 0
    # The training documents split into this many shards (document i -> shard i mod shards), each
    # packed and shuffled on its own; every global batch takes batch_size / shards rows from each
    # shard, in shard order. A process tokenises and packs only the shards whose rows land on its
    # devices, so a run's batches are the same on any number of processes (data/pipeline.py).
    shards: int = 1

    def __post_init__(self) -> None:
        _require(isinstance(self.source, str) and self.source != "", "data.source must be stdlib, synthetic or a path")
        _require(isinstance(self.shards, int) and self.shards >= 1,
                 f"data.shards={self.shards} must be an integer >= 1")
        _require(self.max_bytes > 0, f"data.max_bytes={self.max_bytes} must be > 0")
        _require(0.0 <= self.fim_rate <= 1.0, f"data.fim_rate={self.fim_rate} must be in [0, 1]")
        _require(0.0 < self.val_fraction < 0.5, f"data.val_fraction={self.val_fraction} must be in (0, 0.5)")


@typing.no_type_check  # the fields check themselves (__post_init__), naming what is allowed
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    seed: int = 0
    # AdamW (report §4.2: betas 0.9/0.95, weight decay 0.1) with warmup -> constant -> cosine.
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    decay_start_fraction: float = 0.6  # constant until this fraction of steps, then cosine decay
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bf16_moments: bool = False
    # ZeRO-1 (report §3.2): the optimizer state split over the batch axes that hold copies of each
    # parameter (data, and expert for all but the routed experts); parallel/sharding.py.
    zero1: bool = False
    # EMA of the parameters in host memory (report §3.2.3; train/ema.py): 0 keeps none; else the
    # decay per update, one update every `ema_every` steps (time constant ema_every / (1 - decay)).
    ema_decay: float = 0.0
    ema_every: int = 1
    # Cross-entropy `ce_chunk` sequence positions at a time (train/loss.py chunked_cross_entropy): the
    # output heads' fp32 logits are never whole in memory, only one chunk's; 0 computes them whole.
    # Must divide seq_len. Same loss and gradients, the head's GEMM recomputed in the backward.
    ce_chunk: int = 0
    mtp_lambda: float = 0.3  # eq. 25 (report: 0.3 for the first 10T tokens)
    balance_alpha: float = 1e-4  # eq. 17 (report: 0.0001)
    bias_gamma: float = 1e-3  # aux-loss-free bias update speed; 0 freezes the bias
    aux_loss_alpha: float = 1e-2  # Switch/GShard global auxiliary loss (balancer "aux_loss")
    z_loss_coef: float = 1e-3  # router z-loss (balancer "z_loss")
    log_every: int = 1
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    # Pipeline parallelism (mesh.pipeline > 1, report §3.2.1): schedule and micro-batches per step.
    pipeline_schedule: PipelineSchedule = "1f1b"
    microbatches: int = 8
    # A stage keeps its forward's residuals for the backward instead of recomputing the forward
    # (twice, for input and weight gradients): unpipelined FLOPs for more activation memory.
    pipeline_keep_residuals: bool = False
    # Post-training (report §5.1): "sft" trains on packed (prompt, response) examples with the loss
    # on responses only, starting from the weights of the run in `init_from` (post/sft.py).
    objective: Objective = "pretrain"
    init_from: str = ""

    def __post_init__(self) -> None:
        _require_each(self, "train", ("steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_batches",
                                      "checkpoint_every", "keep_checkpoints", "microbatches", "ema_every"),
                      lambda v: isinstance(v, int) and v > 0, "a positive integer")
        _require(self.warmup_steps >= 0, f"train.warmup_steps={self.warmup_steps} must be >= 0")
        _require(self.lr > 0 and math.isfinite(self.lr), f"train.lr={self.lr} must be a positive number")
        _require(0.0 <= self.ema_decay < 1.0, f"train.ema_decay={self.ema_decay} must be in [0, 1) (0: no EMA)")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _require(0.0 <= self.decay_start_fraction <= 1.0,
                 f"train.decay_start_fraction={self.decay_start_fraction} must be in [0, 1]")
        _require(0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0, f"train.b1={self.b1}, train.b2={self.b2} must be in [0, 1)")
        _require_each(self, "train", ("weight_decay", "grad_clip", "mtp_lambda", "balance_alpha", "bias_gamma",
                                      "aux_loss_alpha", "z_loss_coef"),
                      lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0")
        _require(isinstance(self.ce_chunk, int) and self.ce_chunk >= 0 and
                 (self.ce_chunk == 0 or self.seq_len % self.ce_chunk == 0),
                 f"train.ce_chunk={self.ce_chunk} must be 0 (whole sequences) or divide train.seq_len={self.seq_len}")
        _require_choices(self, "train")


@typing.no_type_check  # the fields check themselves (__post_init__), naming what is allowed
@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Group Relative Policy Optimization (report §5.2.2; post/grpo.py). The train section still
    sets steps, lr and its schedule, the optimizer, logging, evaluation and checkpoint intervals."""

    task: str = "arithmetic"  # a name in post/tasks.py TASKS (checked in validate.py)
    prompts_per_step: int = 8  # N problems per step, from the task's train split
    group_size: int = 8  # G responses sampled per prompt
    passes: int = 2  # optimisation passes over each batch of rollouts (pi_old is the sampler)
    epsilon: float = 0.2  # ratio clip, eq. 26
    beta: float = 0.04  # KL(policy || reference) coefficient, eq. 26; 0 drops the KL term
    # The reference model of the KL term: the starting policy, or (every k steps) a fresh copy of the
    # policy, so the KL bounds each stretch of k steps rather than the whole run. 0: never refreshed.
    ref_refresh_every: int = 0
    # Advantages (eq. 28): "std" divides each group's centred rewards by the group's std (the
    # report); "none" only centres them (a group's scale stays the reward's, as Dr. GRPO argues).
    advantage_norm: AdvantageNorm = "std"
    # Reward = correctness + format_weight x the task's format reward (a well-formed answer, right or
    # wrong), for tasks that have one; held-out accuracy counts correctness only.
    format_weight: float = 0.1
    temperature: float = 1.0  # of the rollouts and of the policy's log-probs in the ratio
    top_p: float = 1.0
    max_new_tokens: int = 0  # max response length; 0: the task's own limit
    eval_problems: int = 128  # held-out problems scored greedily every train.eval_every steps

    def __post_init__(self) -> None:
        _require_each(self, "grpo", ("prompts_per_step", "passes", "eval_problems"),
                      lambda v: isinstance(v, int) and v > 0, "a positive integer")
        _require(isinstance(self.group_size, int) and self.group_size >= 2,
                 f"grpo.group_size={self.group_size!r} must be an integer >= 2 (advantages compare a group's responses)")
        _require(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
                 f"grpo.max_new_tokens={self.max_new_tokens!r} must be an integer >= 0 (0: the task's limit)")
        _require(isinstance(self.ref_refresh_every, int) and self.ref_refresh_every >= 0,
                 f"grpo.ref_refresh_every={self.ref_refresh_every!r} must be an integer >= 0 (0: never)")
        _require(0.0 <= self.format_weight <= 1.0 and math.isfinite(self.format_weight),
                 f"grpo.format_weight={self.format_weight} must be in [0, 1]")
        _require(0.0 < self.epsilon < 1.0, f"grpo.epsilon={self.epsilon} must be in (0, 1)")
        _require(self.beta >= 0 and math.isfinite(self.beta), f"grpo.beta={self.beta} must be a finite number >= 0")
        _require(0.0 < self.temperature <= 10.0, f"grpo.temperature={self.temperature} must be in (0, 10] "
                 "(GRPO samples; greedy rollouts would give every group zero variance)")
        _require(0.0 < self.top_p <= 1.0, f"grpo.top_p={self.top_p} must be in (0, 1]")


@typing.no_type_check  # the fields check themselves (__post_init__), naming what is allowed
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes (parallel/sharding.py maps model axes onto them); their product must not
    exceed the devices available. The fields are the mesh's axes, in its order (parallel/mesh.py's
    MESH_AXES); `sizes()` is the one {axis: size} view of them."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    pipeline: int = 1

    def __post_init__(self) -> None:
        _require_each(self, "mesh", tuple(f.name for f in dataclasses.fields(self)),
                      lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")

    @property
    def n_devices(self) -> int:
        return self.data * self.fsdp * self.tensor * self.expert * self.pipeline

    def sizes(self) -> dict[str, int]:
        """{axis: size} for every mesh axis, in the mesh's order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@typing.no_type_check  # the fields check themselves (__post_init__), naming what is allowed
@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs; written as config.json beside the run's checkpoints."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    sharding: ShardingOverrides = ()

    def __post_init__(self) -> None:
        mesh_axes = tuple(MeshConfig().sizes())
        for name, axes in self.sharding:
            bad = [a for a in axes if a not in mesh_axes]
            _require(not bad and len(set(axes)) == len(axes),
                     f"sharding.{name}={','.join(axes)} must list distinct mesh axes from {', '.join(mesh_axes)} "
                     "(empty: replicated)")
        _require(self.train.seq_len <= self.model.max_seq_len,
                 f"train.seq_len={self.train.seq_len} must be <= model.max_seq_len={self.model.max_seq_len}")
        _require(self.train.batch_size % self.data.shards == 0,
                 f"data.shards={self.data.shards} must divide train.batch_size={self.train.batch_size}")
        _require(self.data.shards == 1 or self.train.objective == "pretrain",
                 f"data.shards={self.data.shards} is for pretraining; train.objective={self.train.objective} "
                 "reads its own data: use data.shards=1")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


# Presets ---------------------------------------------------------------------------------------

_TINY = ModelConfig()

_SMALL = ModelConfig(
    vocab_size=8192, d_model=512, n_layers=8, first_k_dense=1, n_heads=8, q_lora_rank=192,
    kv_lora_rank=128, qk_nope_dim=32, qk_rope_dim=32, v_head_dim=32, ffn_dim=1536, moe_ffn_dim=512,
    n_routed_experts=16, n_shared_experts=1, top_k=4, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, max_seq_len=512, mtp_depth=1, init_std=0.02,
)

# HF deepseek-ai/DeepSeek-V2-Lite config.json.
_V2_LITE = ModelConfig(
    vocab_size=102400, d_model=2048, n_layers=27, first_k_dense=1, n_heads=16, q_lora_rank=0,
    kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128, ffn_dim=10944, moe_ffn_dim=1408,
    n_routed_experts=64, n_shared_experts=2, top_k=6, n_group=1, topk_group=1,
    routed_scaling_factor=1.0, score_func="softmax", norm_topk_prob=False, rope_theta=10000.0,
    yarn_factor=40.0, original_max_position=4096, yarn_mscale=0.707, yarn_mscale_all_dim=0.707,
    max_seq_len=163840, mtp_depth=0, dtype="bfloat16", init_std=0.02,
)

# Report §2 / §4.2 and HF deepseek-ai/DeepSeek-V3 config.json.
_V3 = ModelConfig(
    vocab_size=129280, d_model=7168, n_layers=61, first_k_dense=3, n_heads=128, q_lora_rank=1536,
    kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128, ffn_dim=18432, moe_ffn_dim=2048,
    n_routed_experts=256, n_shared_experts=1, top_k=8, n_group=8, topk_group=4,
    routed_scaling_factor=2.5, score_func="sigmoid", norm_topk_prob=True, rope_theta=10000.0,
    yarn_factor=40.0, original_max_position=4096, yarn_mscale=1.0, yarn_mscale_all_dim=1.0,
    max_seq_len=163840, mtp_depth=1, dtype="bfloat16", init_std=0.006,
)

PRESETS: dict[str, Config] = {
    # gamma 0.01: a 300-step run needs a faster bias update than the report's 0.001 over 14.3T tokens
    # (experiments/results/aux_free_balance.md: 0.001 has not converged after 300 steps).
    "tiny": Config(model=_TINY, train=TrainConfig(bias_gamma=0.01)),
    "small": Config(model=_SMALL, train=TrainConfig(seq_len=256, batch_size=16, lr=1.5e-3),
                    data=DataConfig(max_bytes=40_000_000)),
    "deepseek-v2-lite": Config(model=_V2_LITE),
    # DualPipe, the report's schedule (§3.2.1): on a pipeline mesh it needs >= 2 x mesh.pipeline
    # micro-batches (the report's layout: experiments/plan_deepseek_v3.py). Sequences of 4K (§4.2),
    # and the cross-entropy 512 positions at a time: one 4K sequence's whole fp32 logits over 129,280
    # tokens and the MTP head are 12.7 GB on a GPU of the report's layout, a sixth of its 80 GB.
    "deepseek-v3-671b": Config(model=_V3, train=TrainConfig(pipeline_schedule="dualpipe", seq_len=4096,
                                                           ce_chunk=512)),
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


# Overrides -------------------------------------------------------------------------------------

def _parse_value(key: str, text: str, annotation: Any) -> Any:
    """Parse `text` as the type a dataclass field declares (resolved annotation)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if text not in allowed:
            raise ConfigError(f"{key}={text!r} must be one of: {', '.join(map(str, allowed))}")
        return text
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if type(None) in typing.get_args(annotation) and text.lower() in ("none", "null"):
            return None
        return _parse_value(key, text, args[0])
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r} must be a boolean (true/false)")
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} must be {'an integer' if annotation is int else 'a number'}") from None
    if annotation is str:
        return text
    raise ConfigError(f"{key}: cannot parse a value of type {annotation}")


def _plugin_value(text: str) -> Any:
    """A plugin hyperparameter from the command line: a boolean, an integer, a number, or else text
    (its `Args` field's type is checked when the config is validated)."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _sharding_axes(text: str) -> tuple[str, ...]:
    """"data,fsdp" -> ("data", "fsdp"); "" or "none" -> () (replicated)."""
    return () if text.lower() in ("", "none") else tuple(a.strip() for a in text.split(",") if a.strip())


def _parse_path(obj: Any, path: list[str], text: str, full_key: str, changes: dict) -> None:
    """Check `path` names a field under `obj` and record its parsed value in the nested `changes`."""
    names = {f.name for f in dataclasses.fields(obj)}
    head = path[0]
    if head not in names:
        raise ConfigError(f"unknown config key {full_key!r}; valid keys under "
                          f"{'.'.join(full_key.split('.')[:-len(path)]) or 'the top level'}: {', '.join(sorted(names))}")
    current = getattr(obj, head)
    if head == "sharding" and isinstance(obj, Config):  # sharding.LOGICAL=AXIS,AXIS
        if len(path) != 2:
            raise ConfigError(f"config key {full_key!r} must look like sharding.LOGICAL=AXIS[,AXIS...]")
        merged = dict(changes.get(head, current))
        merged[path[1]] = _sharding_axes(text)
        changes[head] = tuple(merged.items())
        return
    if head in ARGS_FIELDS:  # model.router_args.FIELD / model.balancer_args.NAME.FIELD
        depth = 2 if head == "balancer_args" else 1  # NAME may hold dots (module.path:name): FIELD is the last part
        if len(path) < depth + 1 or (depth == 1 and len(path) > 2):
            form = "model.balancer_args.NAME.FIELD" if depth == 2 else "model.router_args.FIELD"
            raise ConfigError(f"config key {full_key!r} must look like {form}=VALUE")
        merged = dict(changes.get(head, current))
        merged[".".join(path[1:])] = _plugin_value(text)
        changes[head] = tuple(merged.items())
        return
    if len(path) == 1:
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"config key {full_key!r} is a section; set one of its fields, e.g. {full_key}.<field>=...")
        changes[head] = _parse_value(full_key, text, _field_types(type(obj))[head])
    else:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"unknown config key {full_key!r}: {head!r} has no sub-fields")
        _parse_path(current, path[1:], text, full_key, changes.setdefault(head, {}))


def _replace_nested(obj: Any, changes: dict) -> Any:
    return dataclasses.replace(obj, **{name: _replace_nested(getattr(obj, name), value) if isinstance(value, dict)
                                       else value for name, value in changes.items()})


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply `section.field=value` strings (a later one wins), each parsed by the field's declared
    type. Each section is rebuilt, and so checked, once with all its changes, so fields that are
    checked together (model.attention and model.n_kv_heads) can be set in any order."""
    changes: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value (e.g. model.n_layers=2)")
        key, text = item.split("=", 1)
        _parse_path(config, key.strip().split("."), text.strip(), key.strip(), changes)
    return _replace_nested(config, changes)


def _from_dict(cls: type, data: dict, prefix: str) -> Any:
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"valid: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} in the config file must be an object of fields, not {value!r}")
            kwargs[name] = _from_dict(hints[name], value, f"{prefix}{name}.")
        else:
            kwargs[name] = _json_value(prefix + name, value, hints[name])
    return cls(**kwargs)


def _json_value(key: str, value: Any, annotation: Any) -> Any:
    """A config file's value checked against the field's declared type (JSON has no int/float split:
    an integer is accepted for a float field)."""
    if annotation == ShardingOverrides:  # an object {"logical": ["axis", ...]} (or config.json's pairs)
        pairs = value.items() if isinstance(value, dict) else value
        if not isinstance(pairs, (list, tuple, type({}.items()))) or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], (list, tuple))
                and all(isinstance(a, str) for a in p[1]) for p in pairs):
            raise ConfigError(f"{key} in the config file must be an object of logical name: [mesh axes]")
        return tuple((str(k), tuple(v)) for k, v in pairs)
    if annotation == PluginArgs:  # an object {"field": value} (or the pairs config.json holds)
        pairs = value.items() if isinstance(value, dict) else value
        if not isinstance(pairs, (list, tuple, type({}.items()))) or \
                not all(isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) for p in pairs):
            raise ConfigError(f"{key} in the config file must be an object of name: value")
        return tuple((str(k), v) for k, v in pairs)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        alternatives = [a for a in args if a is not type(None)]
        for alternative in alternatives[:-1]:  # the first type the value fits; the last one's error
            try:
                return _json_value(key, value, alternative)
            except ConfigError:
                pass
        return _json_value(key, value, alternatives[-1])
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} in the config file must be one of: {', '.join(map(str, allowed))}")
        return value
    expected = {bool: (bool, "true or false"), int: (int, "an integer"), float: ((int, float), "a number"),
                str: (str, "a string")}.get(annotation)
    if expected is None:
        return value
    types_ok, description = expected
    if not isinstance(value, types_ok) or (annotation is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key}={json.dumps(value)} in the config file must be {description}")
    return float(value) if annotation is float else value


def config_from_json(text: str) -> Config:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("config file must hold a JSON object")
    return _from_dict(Config, data, "")
