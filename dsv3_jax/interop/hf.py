"""HF / DeepSeek safetensors checkpoints <-> dsv3_jax.

The published DeepSeek-V3 layout (as HF hosts it): `model.embed_tokens`, `model.layers.N.
{input_layernorm, self_attn.{q_a_proj, q_a_layernorm, q_b_proj | q_proj, kv_a_proj_with_mqa,
kv_a_layernorm, kv_b_proj, o_proj}, post_attention_layernorm, mlp.*}`, `model.norm`, `lm_head`;
MoE layers hold `mlp.gate.weight`, `mlp.gate.e_score_correction_bias`, `mlp.experts.E.
{gate,up,down}_proj`, `mlp.shared_experts.*`; the MTP module k is layer `num_hidden_layers + k`
with `enorm`, `hnorm`, `eh_proj`, `shared_head.{norm,head}` (+ its own copy of embed_tokens).
FP8 checkpoints store e4m3 `weight` plus fp32 `weight_scale_inv`, one per 128x128 block:
bf16 weight = fp8 weight * scale_inv (block-broadcast).

One table (`tensor_specs`) maps every HF tensor to the places it fills in the model's stacked
state, with the reshape both ways; `load` and `save` both read it. Shards are streamed tensor
by tensor into preallocated model arrays.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import UsageError
from dsv3_jax.model.model import DeepSeekV3
from dsv3_jax.run_dir import require_new_directory

FP8_BLOCK = 128

# Config ---------------------------------------------------------------------------------------


def config_from_hf(hf: dict) -> ModelConfig:
    """DeepSeek-V2 / V2-Lite / V3 `config.json` (HF or DeepSeek field names) -> ModelConfig."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    yarn = rope.get("rope_type", rope.get("type")) == "yarn"
    scoring = hf.get("scoring_func", "sigmoid" if hf.get("model_type") == "deepseek_v3" else "softmax")
    n_group = hf.get("n_group") or 1
    topk_group = hf.get("topk_group") or n_group
    if hf.get("topk_method", "noaux_tc") == "greedy":
        n_group = topk_group = 1
    n_layers = hf["num_hidden_layers"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=n_layers,
        first_k_dense=min(hf.get("first_k_dense_replace", 0), n_layers), n_heads=hf["num_attention_heads"],
        q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_dim=hf["qk_nope_head_dim"], qk_rope_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
        ffn_dim=hf["intermediate_size"], moe_ffn_dim=hf["moe_intermediate_size"],
        n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf.get("n_shared_experts") or 0,
        top_k=hf["num_experts_per_tok"], n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)), score_func=scoring,
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        router="deepseek_v3",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        yarn_factor=float(rope.get("factor", 1.0)) if yarn else 1.0,
        original_max_position=int(rope.get("original_max_position_embeddings", 4096)) if yarn else 4096,
        yarn_beta_fast=float(rope.get("beta_fast", 32.0)), yarn_beta_slow=float(rope.get("beta_slow", 1.0)),
        yarn_mscale=float(rope.get("mscale", 1.0)), yarn_mscale_all_dim=float(rope.get("mscale_all_dim", 0.0)),
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        mtp_depth=int(hf.get("num_nextn_predict_layers", 0) or 0),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), init_std=float(hf.get("initializer_range", 0.02)),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig -> a DeepseekV3ForCausalLM config.json (transformers and DeepSeek field names)."""
    if cfg.attention != "mla":
        raise UsageError(f"model.attention={cfg.attention!r} has no DeepSeek-V3 checkpoint layout; only mla exports")
    hf = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "first_k_dense_replace": cfg.first_k_dense, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads, "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_dim, "qk_rope_head_dim": cfg.qk_rope_dim, "v_head_dim": cfg.v_head_dim,
        "head_dim": cfg.qk_rope_dim, "intermediate_size": cfg.ffn_dim, "moe_intermediate_size": cfg.moe_ffn_dim,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.top_k, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
        "routed_scaling_factor": cfg.routed_scaling_factor, "scoring_func": cfg.score_func,
        "topk_method": "noaux_tc", "norm_topk_prob": cfg.norm_topk_prob, "rope_interleave": True,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
        "num_nextn_predict_layers": cfg.mtp_depth, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "initializer_range": cfg.init_std, "attention_bias": False, "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    if cfg.yarn_factor > 1.0:
        hf["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", "factor": cfg.yarn_factor,
                              "original_max_position_embeddings": cfg.original_max_position,
                              "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow,
                              "mscale": cfg.yarn_mscale, "mscale_all_dim": cfg.yarn_mscale_all_dim}
    return hf


# The tensor table -----------------------------------------------------------------------------

Path_ = tuple[str, ...]


@dataclass(frozen=True)
class Spec:
    """One HF tensor: the model places it fills (path, index into stacked axes) and the maps."""

    targets: tuple[tuple[Path_, tuple[int, ...]], ...]
    to_model: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def _linear(path: Path_, index: tuple[int, ...], in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Spec:
    """nn.Linear weight [out, in] <-> our kernel in_shape + out_shape."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return Spec(((path, index),),
                lambda w: (w.reshape(n_out, n_in).T.reshape(in_shape + out_shape),),
                lambda k: k.reshape(n_in, n_out).T)


def _same(path: Path_, index: tuple[int, ...]) -> Spec:
    return Spec(((path, index),), lambda w: (w,), lambda v: v)


def _layer_specs(cfg: ModelConfig, hf: str, ours: Path_, index: tuple[int, ...], moe: bool) -> dict[str, Spec]:
    D, H, C, R = cfg.d_model, cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_dim
    N, V, K = cfg.qk_nope_dim, cfg.v_head_dim, cfg.qk_head_dim
    a = ours + ("attn",)
    specs = {
        f"{hf}.input_layernorm.weight": _same(ours + ("attn_norm", "scale"), index),
        f"{hf}.post_attention_layernorm.weight": _same(ours + ("ffn_norm", "scale"), index),
        f"{hf}.self_attn.kv_a_proj_with_mqa.weight": _linear(a + ("w_dkv", "kernel"), index, (D,), (C + R,)),
        f"{hf}.self_attn.kv_a_layernorm.weight": _same(a + ("kv_norm", "scale"), index),
        f"{hf}.self_attn.o_proj.weight": _linear(a + ("w_o", "kernel"), index, (H, V), (D,)),
        # kv_b_proj [H*(N+V), C]: per head, N rows of W_UK then V rows of W_UV.
        f"{hf}.self_attn.kv_b_proj.weight": Spec(
            ((a + ("w_uk", "kernel"), index), (a + ("w_uv", "kernel"), index)),
            lambda w: tuple(np.ascontiguousarray(x) for x in
                            np.split(w.reshape(H, N + V, C).transpose(2, 0, 1), [N], axis=-1)),
            lambda uk, uv: np.concatenate([uk, uv], axis=-1).transpose(1, 2, 0).reshape(H * (N + V), C)),
    }
    if cfg.q_lora_rank:
        Q = cfg.q_lora_rank
        specs[f"{hf}.self_attn.q_a_proj.weight"] = _linear(a + ("w_dq", "kernel"), index, (D,), (Q,))
        specs[f"{hf}.self_attn.q_a_layernorm.weight"] = _same(a + ("q_norm", "scale"), index)
        specs[f"{hf}.self_attn.q_b_proj.weight"] = _linear(a + ("w_uq", "kernel"), index, (Q,), (H, K))
    else:
        specs[f"{hf}.self_attn.q_proj.weight"] = _linear(a + ("w_q", "kernel"), index, (D,), (H, K))
    f = ours + ("ffn",)
    if not moe:
        for name in ("gate", "up"):
            specs[f"{hf}.mlp.{name}_proj.weight"] = _linear(f + (name, "kernel"), index, (D,), (cfg.ffn_dim,))
        specs[f"{hf}.mlp.down_proj.weight"] = _linear(f + ("down", "kernel"), index, (cfg.ffn_dim,), (D,))
        return specs
    E, F = cfg.n_routed_experts, cfg.moe_ffn_dim
    specs[f"{hf}.mlp.gate.weight"] = _linear(f + ("router", "centroids_DE"), index, (D,), (E,))
    if cfg.score_func == "sigmoid":
        specs[f"{hf}.mlp.gate.e_score_correction_bias"] = _same(f + ("router", "bias_E"), index)
    if cfg.n_shared_experts:
        S = cfg.n_shared_experts * F
        for name in ("gate", "up"):
            specs[f"{hf}.mlp.shared_experts.{name}_proj.weight"] = _linear(f + ("shared", name, "kernel"), index, (D,), (S,))
        specs[f"{hf}.mlp.shared_experts.down_proj.weight"] = _linear(f + ("shared", "down", "kernel"), index, (S,), (D,))
    for e in range(E):
        for name, ours_name in (("gate", "w_gate_EDF"), ("up", "w_up_EDF")):
            specs[f"{hf}.mlp.experts.{e}.{name}_proj.weight"] = _linear(f + (ours_name,), index + (e,), (D,), (F,))
        specs[f"{hf}.mlp.experts.{e}.down_proj.weight"] = _linear(f + ("w_down_EFD",), index + (e,), (F,), (D,))
    return specs


def tensor_specs(cfg: ModelConfig) -> dict[str, Spec]:
    """Every tensor of the checkpoint, in HF naming, for this config."""
    specs = {
        "model.embed_tokens.weight": _same(("embed", "table_VD"), ()),
        "model.norm.weight": _same(("final_norm", "scale"), ()),
        "lm_head.weight": _linear(("head", "kernel"), (), (cfg.d_model,), (cfg.vocab_size,)),
    }
    for i in range(cfg.n_layers):
        stack, j = ("dense_layers", i) if i < cfg.first_k_dense else ("moe_layers", i - cfg.first_k_dense)
        specs.update(_layer_specs(cfg, f"model.layers.{i}", (stack,), (j,), moe=stack == "moe_layers"))
    for k in range(cfg.mtp_depth):
        hf = f"model.layers.{cfg.n_layers + k}"
        specs.update(_layer_specs(cfg, hf, ("mtp", "block"), (k,), moe=cfg.n_routed_experts > 0))
        specs[f"{hf}.enorm.weight"] = _same(("mtp", "enorm", "scale"), (k,))
        specs[f"{hf}.hnorm.weight"] = _same(("mtp", "hnorm", "scale"), (k,))
        specs[f"{hf}.eh_proj.weight"] = _linear(("mtp", "eh_proj", "kernel"), (k,), (2 * cfg.d_model,), (cfg.d_model,))
        specs[f"{hf}.shared_head.norm.weight"] = _same(("mtp", "final_norm", "scale"), (k,))
    return specs


def _shared_copies(cfg: ModelConfig) -> dict[str, str]:
    """MTP tensors DeepSeek stores that are copies of the main model's (we share them)."""
    copies = {}
    for k in range(cfg.mtp_depth):
        hf = f"model.layers.{cfg.n_layers + k}"
        copies[f"{hf}.shared_head.head.weight"] = "lm_head.weight"
        copies[f"{hf}.embed_tokens.weight"] = "model.embed_tokens.weight"
    return copies


# Reading --------------------------------------------------------------------------------------


class _Shard:
    """A memory-mapped .safetensors file read tensor by tensor.

    Read directly (8-byte header length, JSON header, raw little-endian data) rather than through
    `safetensors`' numpy backend, which has no float8 dtype; e4m3 comes from ml_dtypes.
    """

    _DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
               "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}

    def __init__(self, file: Path):
        import ml_dtypes

        self.file = file
        try:
            with open(file, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                self.header = json.loads(f.read(header_len))
        except (OSError, ValueError) as e:
            raise UsageError(f"{str(file)!r} is not a readable safetensors file ({e})") from None
        self.header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        needed = self.data_start + max((e["data_offsets"][1] for e in self.header.values()), default=0)
        size = file.stat().st_size
        if size < needed:
            raise UsageError(f"{str(file)!r} is truncated: {size:,} bytes, its header describes {needed:,} (an "
                             "interrupted download or copy?)")
        self.dtypes = {**self._DTYPES, "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
                       "F8_E5M2": ml_dtypes.float8_e5m2}
        self.mmap = np.memmap(file, dtype=np.uint8, mode="r")

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        entry = self.header[name]
        start, end = entry["data_offsets"]
        raw = self.mmap[self.data_start + start:self.data_start + end]
        return raw.view(self.dtypes[entry["dtype"]]).reshape(entry["shape"])


def _shard_index(path: Path) -> dict[str, Path]:
    """tensor name -> shard file, from model.safetensors.index.json or by scanning the shards."""
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return {name: path / shard for name, shard in weight_map.items()}
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise UsageError(f"{str(path)!r} holds no .safetensors files")
    return {name: shard for shard in shards for name in _Shard(shard).keys()}


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: int = FP8_BLOCK) -> np.ndarray:
    """fp32 = e4m3 weight x its 128x128 block's scale_inv (DeepSeek's FP8 checkpoint format)."""
    rows, cols = weight.shape
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block, axis=0), block, axis=1)[:rows, :cols]
    return weight.astype(np.float32) * scale


def quantize_fp8(weight: np.ndarray, block: int = FP8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Block-quantize [out, in] as DeepSeek's FP8 checkpoints do: e4m3 values, fp32 scale_inv = amax/448."""
    import ml_dtypes

    rows, cols = weight.shape
    br, bc = -(-rows // block), -(-cols // block)
    padded = np.zeros((br * block, bc * block), np.float32)
    padded[:rows, :cols] = weight
    blocks = padded.reshape(br, block, bc, block)
    scale_inv = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-12) / 448.0
    q = (blocks / scale_inv[:, None, :, None]).reshape(br * block, bc * block)[:rows, :cols]
    return q.astype(ml_dtypes.float8_e4m3fn), scale_inv.astype(np.float32)


def load(path: str | Path, dtype=np.float32, config: ModelConfig | None = None,
         fp8: bool = False) -> tuple[ModelConfig, nnx.Module]:
    """(ModelConfig, DeepSeekV3 model) from an HF / DeepSeek checkpoint directory.

    FP8 weights (e4m3 + weight_scale_inv) are dequantized into the master weights. With
    `fp8=True` the model also runs its GEMMs in block-scaled FP8 (`model.fp8`): re-quantizing a
    dequantized 128x128 block whose largest |e4m3| value is 448 (as DeepSeek's quantizer makes
    it) gives back exactly the stored e4m3 values and scale, so the FP8 path computes with the
    checkpoint's own FP8 weights (not exactly for kv_b_proj, whose blocks straddle the split
    into W_UK / W_UV). A checkpoint with missing, unexpected or misshapen tensors is refused
    with their names.
    """
    import dataclasses

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UsageError(f"{str(path)!r} is not an HF checkpoint directory (no config.json)")
    if config is None:
        config = config_from_hf(json.loads((path / "config.json").read_text()))
    config = dataclasses.replace(config, param_dtype="float32", dtype="float32") if dtype == np.float32 else config
    config = dataclasses.replace(config, fp8=fp8)
    files = _shard_index(path)
    # MTP modules are loaded when present: transformers, for one, saves none even when
    # num_nextn_predict_layers is set.
    present = sum(f"model.layers.{config.n_layers + k}.eh_proj.weight" in files for k in range(config.mtp_depth))
    config = dataclasses.replace(config, mtp_depth=present)
    abstract = nnx.eval_shape(lambda: DeepSeekV3(config, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(state)}
    arrays = {p: np.zeros(v.get_value().shape, np.dtype(v.get_value().dtype)) for p, v in flat.items()}

    specs = tensor_specs(config)
    copies = _shared_copies(config)
    scale_names = {n for n in files if n.endswith("_scale_inv")}
    unexpected = sorted(n for n in files if n not in specs and n not in copies and n not in scale_names
                        and not n.endswith("rotary_emb.inv_freq"))
    missing = sorted(n for n in specs if n not in files)
    misshapen: list[str] = []
    if unexpected or missing:
        raise UsageError(_mismatch_message(path, missing, unexpected, misshapen))
    shards: dict[Path, _Shard] = {}
    read = lambda name: shards.setdefault(files[name], _Shard(files[name])).get(name)
    for name, spec in specs.items():
        tensor = read(name)
        if f"{name}_scale_inv" in files:
            tensor = dequantize_fp8(tensor, read(f"{name}_scale_inv"))
        expected = _hf_shape(spec, arrays)
        if tuple(tensor.shape) != expected:
            misshapen.append(f"{name} {tuple(tensor.shape)} != {expected}")
            continue
        for (target, index), value in zip(spec.targets, spec.to_model(tensor.astype(np.float32))):
            arrays[target][index] = value
    if misshapen:
        raise UsageError(_mismatch_message(path, [], [], misshapen))
    for p, v in flat.items():
        v.set_value(jax.numpy.asarray(arrays[p].astype(np.dtype(v.get_value().dtype))))
    return config, nnx.merge(graphdef, state)


def _hf_shape(spec: Spec, arrays: dict) -> tuple[int, ...]:
    parts = [np.zeros(arrays[target][index].shape, np.float32) for target, index in spec.targets]
    return tuple(spec.to_hf(*parts).shape)


def _mismatch_message(path: Path, missing: list[str], unexpected: list[str], misshapen: list[str]) -> str:
    parts = [f"{label} ({len(names)}): {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
             for label, names in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if names]
    return f"checkpoint {str(path)!r} does not match its config: " + "; ".join(parts)


# Writing --------------------------------------------------------------------------------------


def _apply_umask(directory: Path) -> None:
    """Modes a plain mkdir / open would have given: 0o777 / 0o666 minus the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for file in directory.iterdir():
        file.chmod(0o666 & ~umask)


def save(model: nnx.Module, config: ModelConfig, path: str | Path, shard_bytes: int = 2 * 2 ** 30,
         fp8: bool = False) -> None:
    """Write sharded safetensors + index + config.json (loadable by transformers' DeepseekV3ForCausalLM).

    Written to a temporary directory first and moved into place: nothing appears at `path` on failure.
    `fp8=True` writes 2-D projection weights as e4m3 + weight_scale_inv (DeepSeek's format).
    """
    from safetensors.numpy import save_file

    path = Path(path)
    require_new_directory(path)
    _, state = nnx.split(model)
    arrays = {tuple(str(k) for k in p): np.asarray(v.get_value(), np.float32) for p, v in nnx.to_flat_state(state)}
    tmp = Path(tempfile.mkdtemp(prefix=".dsv3-export-", dir=path.absolute().parent))
    try:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        tensors: dict[str, np.ndarray] = {}
        for name, spec in tensor_specs(config).items():
            tensors[name] = np.ascontiguousarray(spec.to_hf(*[arrays[t][i] for t, i in spec.targets]))
        for copy, source in _shared_copies(config).items():
            tensors[copy] = tensors[source]
        for name, tensor in tensors.items():
            out = {name: tensor}
            if fp8 and tensor.ndim == 2 and name.endswith("proj.weight") and "eh_proj" not in name:
                q, s = quantize_fp8(tensor)
                out = {name: q, f"{name}_scale_inv": s}
            nbytes = sum(t.nbytes for t in out.values())
            if size + nbytes > shard_bytes and shards[-1]:
                shards.append({})
                size = 0
            shards[-1].update(out)
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: np.ascontiguousarray(v) for k, v in shard.items()}, str(tmp / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in shard})
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": int(sum(t.nbytes for s in shards for t in s.values()))},
             "weight_map": weight_map}, indent=2))
        hf_config = config_to_hf(config)
        if fp8:
            hf_config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        _apply_umask(tmp)  # mkdtemp made it private; the export is for others to read, like any new file
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
