"""HF / DeepSeek safetensors interop against transformers goldens (tests/fixtures/make_hf_goldens.py)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from dsv3_jax.errors import UsageError
from dsv3_jax.interop import hf
from dsv3_jax.model.model import DeepSeekV3
from tests.conftest import cli_env, tiny_model_config

GOLDENS = Path(__file__).parent / "fixtures" / "hf"
CASES = sorted(p.name for p in GOLDENS.iterdir() if p.is_dir())


def _logits(model, ids):
    return np.asarray(model(jnp.asarray(ids), with_mtp=False).logits_BTV)


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(name):
    config, model = hf.load(GOLDENS / name)
    expected = np.load(GOLDENS / name / "expected_logits.npy")
    np.testing.assert_allclose(_logits(model, np.load(GOLDENS / name / "input_ids.npy")), expected, atol=1e-4, rtol=0)


def test_golden_configs_cover_the_variants():
    configs = {name: hf.load(GOLDENS / name)[0] for name in CASES}
    assert {c.q_lora_rank > 0 for c in configs.values()} == {True, False}
    assert {c.n_shared_experts for c in configs.values()} >= {1, 2}
    assert {c.first_k_dense for c in configs.values()} == {0, 1, 2}
    assert {c.topk_group < c.n_group for c in configs.values()} == {True, False}
    assert any(c.yarn_factor > 1 for c in configs.values()) and any(c.score_func == "softmax" for c in configs.values())


def test_a_golden_depends_on_masking_dropped_groups_with_minus_inf():
    """In this golden every biased score s + b is negative, so masking the dropped groups with 0.0
    (transformers < 5) instead of -inf would route every token to experts of dropped groups."""
    config, model = hf.load(GOLDENS / "v3_negative_biased_groups")
    assert config.topk_group < config.n_group and config.score_func == "sigmoid"
    assert float(jnp.max(model.moe_layers.ffn.router.bias_E[...])) < -1.0  # sigmoid < 1, so s + b < 0


@pytest.fixture(scope="module")
def tiny_with_mtp():
    cfg = tiny_model_config(mtp_depth=1, n_layers=3, first_k_dense=1)
    model = DeepSeekV3(cfg, nnx.Rngs(3))
    model.moe_layers.ffn.router.bias_E[...] = jax.random.normal(jax.random.key(0), (2, cfg.n_routed_experts)) * 0.1
    return cfg, model


def test_round_trip_is_bit_identical_including_mtp(tiny_with_mtp, tmp_path):
    cfg, model = tiny_with_mtp
    hf.save(model, cfg, tmp_path / "out", shard_bytes=40_000)
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1  # sharded, with an index
    names = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.3.eh_proj.weight" in names and "model.layers.3.shared_head.head.weight" in names
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    loaded_cfg, loaded = hf.load(tmp_path / "out", config=cfg)
    assert loaded_cfg.mtp_depth == 1
    a, b = nnx.to_flat_state(nnx.state(model)), dict(nnx.to_flat_state(nnx.state(loaded)))
    for path, var in a:
        np.testing.assert_array_equal(var.get_value(), b[path].get_value(), err_msg=str(path))


def test_fp8_checkpoint_loads_within_fp8_error(tiny_with_mtp, tmp_path):
    cfg, model = tiny_with_mtp
    hf.save(model, cfg, tmp_path / "fp8", fp8=True)
    header = hf._Shard(next((tmp_path / "fp8").glob("*.safetensors"))).header
    assert header["model.layers.1.mlp.experts.0.gate_proj.weight"]["dtype"] == "F8_E4M3"
    assert header["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"]["dtype"] == "F32"
    _, dequantized = hf.load(tmp_path / "fp8", config=cfg)
    ids = np.arange(40).reshape(2, 20) % cfg.vocab_size
    x, y = _logits(model, ids).astype(np.float64), _logits(dequantized, ids).astype(np.float64)
    # DeepGEMM's measure: 1 - 2<x,y>/(|x|^2+|y|^2); e4m3 has ~2^-4 relative spacing per element.
    diff = 1 - 2 * np.sum(x * y) / (np.sum(x * x) + np.sum(y * y))
    assert 0 < diff < 1e-3, diff


def test_kept_fp8_reproduces_the_stored_e4m3_weights(tiny_with_mtp, tmp_path):
    """Loading with fp8=True: the FP8 path re-quantizes the dequantized masters into exactly the
    checkpoint's e4m3 values and scales, so the model computes with the stored FP8 weights."""
    from pallas_kernels.fp8_quant import quantize_blocks_ref

    cfg, model = tiny_with_mtp
    hf.save(model, cfg, tmp_path / "fp8", fp8=True)
    config, kept = hf.load(tmp_path / "fp8", config=cfg, fp8=True)
    assert config.fp8 and kept.moe_layers.attn.w_o.fp8_backend == "xla"
    shard = hf._Shard(next((tmp_path / "fp8").glob("*.safetensors")))
    stored = shard.get("model.layers.1.mlp.experts.3.down_proj.weight").astype(np.float32)  # [D, F]
    master_FD = np.asarray(kept.moe_layers.ffn.w_down_EFD[...][0, 3])
    padded = np.zeros((128, 128), np.float32)
    padded[:master_FD.shape[0], :master_FD.shape[1]] = master_FD
    q, scale = quantize_blocks_ref(jnp.asarray(padded))
    np.testing.assert_array_equal(np.asarray(q.astype(jnp.float32))[:master_FD.shape[0], :master_FD.shape[1]],
                                  stored.T)
    np.testing.assert_array_equal(scale[0, 0], shard.get("model.layers.1.mlp.experts.3.down_proj.weight_scale_inv")[0, 0])
    ids = np.arange(40).reshape(2, 20) % cfg.vocab_size
    x, y = _logits(model, ids).astype(np.float64), _logits(kept, ids).astype(np.float64)
    assert 1 - 2 * np.sum(x * y) / (np.sum(x * x) + np.sum(y * y)) < 1e-2


def test_block_quantization_matches_the_format():
    w = np.random.default_rng(0).normal(size=(200, 300)).astype(np.float32)
    q, scale_inv = hf.quantize_fp8(w)
    assert scale_inv.shape == (2, 3)  # ceil(200/128) x ceil(300/128)
    np.testing.assert_allclose(scale_inv[0, 0], np.abs(w[:128, :128]).max() / 448, rtol=1e-6)
    back = hf.dequantize_fp8(q, scale_inv)
    assert np.max(np.abs(back - w) / np.abs(w).max()) < 2 ** -4


def test_bad_checkpoints_are_refused_with_the_offending_names(tiny_with_mtp, tmp_path):
    cfg, model = tiny_with_mtp
    src = tmp_path / "src"
    hf.save(model, cfg, src)
    shard = next(src.glob("*.safetensors"))
    tensors = load_file(str(shard))
    tensors.pop("model.layers.0.self_attn.o_proj.weight")
    tensors["model.layers.9.mystery.weight"] = np.zeros(3, np.float32)
    tensors["model.norm.weight"] = np.zeros(5, np.float32)
    save_file(tensors, str(shard))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: shard.name for k in tensors}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match=r"missing \(1\): model.layers.0.self_attn.o_proj.weight.*"
                                         r"unexpected \(1\): model.layers.9.mystery.weight"):
        hf.load(src, config=cfg)
    tensors["model.layers.0.self_attn.o_proj.weight"] = np.zeros((cfg.d_model, 16), np.float32)
    tensors.pop("model.layers.9.mystery.weight")
    save_file(tensors, str(shard))
    index["weight_map"] = {k: shard.name for k in tensors}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match=r"misshapen \(1\): model.norm.weight \(5,\) != \(32,\)"):
        hf.load(src, config=cfg)


def test_convert_cli_round_trip_and_failure_writes_nothing(tmp_path):
    env = cli_env()
    run = lambda *a: subprocess.run([sys.executable, "-m", "dsv3_jax.cli", "convert", *a], capture_output=True,
                                    text=True, env=env, timeout=300)
    out = run("hf-to-orbax", str(GOLDENS / "v3_grouped_yarn"), str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    out = run("orbax-to-hf", str(tmp_path / "run"), str(tmp_path / "back"))
    assert out.returncode == 0, out.stderr
    _, model = hf.load(tmp_path / "back")
    ids = np.load(GOLDENS / "v3_grouped_yarn" / "input_ids.npy")
    np.testing.assert_allclose(_logits(model, ids), np.load(GOLDENS / "v3_grouped_yarn" / "expected_logits.npy"),
                               atol=1e-4, rtol=0)
    broken = tmp_path / "broken"
    shutil.copytree(GOLDENS / "v2_lite_style", broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors.pop("lm_head.weight")
    save_file(tensors, str(broken / "model.safetensors"))
    out = run("hf-to-orbax", str(broken), str(tmp_path / "never"))
    assert out.returncode == 2 and "missing (1): lm_head.weight" in out.stderr
    assert not (tmp_path / "never").exists()


TORCH_PYTHON = os.environ.get("DSV3_TORCH_PYTHON", sys.executable)


def _has_torch(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import torch, transformers"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _has_torch(TORCH_PYTHON), reason="needs torch + transformers (set DSV3_TORCH_PYTHON to a "
                                                           "python that has them); the goldens test covers HF parity")
def test_export_loads_in_transformers_with_matching_logits(tiny_with_mtp, tmp_path):
    cfg, model = tiny_with_mtp
    hf.save(model, cfg, tmp_path / "export")
    ids = np.arange(30).reshape(2, 15) % cfg.vocab_size
    np.save(tmp_path / "ids.npy", ids)
    script = textwrap.dedent(f"""
        import numpy as np, torch
        from transformers import DeepseekV3ForCausalLM
        m = DeepseekV3ForCausalLM.from_pretrained({str(tmp_path / 'export')!r}, dtype=torch.float32).eval()
        with torch.no_grad():
            out = m(torch.tensor(np.load({str(tmp_path / 'ids.npy')!r}), dtype=torch.long)).logits
        np.save({str(tmp_path / 'hf_logits.npy')!r}, out.float().numpy())
    """)
    out = subprocess.run([TORCH_PYTHON, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "hf_logits.npy"), _logits(model, ids), atol=1e-4, rtol=0)


def test_mtp_follows_the_published_layout_eq_21_to_25(tmp_path):
    """MTP modules read from `model.layers.{L}.{embed_tokens, enorm, hnorm, eh_proj, shared_head}`
    (L = n_layers + k - 1), computed here in numpy from the safetensors alone. The modules'
    transformer blocks are made the identity (attention and FFN output projections zeroed in the
    file), so eq. 22 drops out and eq. 21, 23 and 24-25 are checked exactly; the blocks themselves
    are the main layers' code and names, which the transformers goldens cover."""
    from safetensors.numpy import load_file

    from dsv3_jax.config import TrainConfig
    from dsv3_jax.model.rope import rope_tables
    from dsv3_jax.model.routing import Balancing
    from dsv3_jax.train.loss import total_loss

    cfg = tiny_model_config(mtp_depth=2, n_layers=3, first_k_dense=1)
    hf.save(DeepSeekV3(cfg, nnx.Rngs(5)), cfg, tmp_path / "saved")
    tensors = load_file(tmp_path / "saved" / "model-00001-of-00001.safetensors")
    mtp_layers = [f"model.layers.{cfg.n_layers + k}" for k in range(cfg.mtp_depth)]
    for name in list(tensors):
        if any(name.startswith(layer + ".") for layer in mtp_layers) and name.endswith(("o_proj.weight",
                                                                                        "down_proj.weight")):
            tensors[name] = np.zeros_like(tensors[name])
    save_file(tensors, tmp_path / "saved" / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    _, model = hf.load(tmp_path / "saved", config=cfg)

    tokens_BS = np.asarray(jax.random.randint(jax.random.key(6), (2, 13), 0, cfg.vocab_size))
    inputs_BT = jnp.asarray(tokens_BS[:, :-1])
    out = model(inputs_BT)
    cos, sin = rope_tables(cfg, jnp.broadcast_to(jnp.arange(12), (2, 12)))
    h_BTD = np.asarray(model.moe_stack(model.embed_and_dense(inputs_BT, cos, sin), cos, sin, inputs_BT)[0],
                       np.float64)  # h^0: the main model's last hidden state, before its final norm

    rms = lambda x, w: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w
    T = inputs_BT.shape[1]
    losses = []
    for k, layer in enumerate(mtp_layers, start=1):
        w = lambda name: tensors[f"{layer}.{name}"].astype(np.float64)
        ahead_BT = np.pad(tokens_BS[:, k:k + T], ((0, 0), (0, T - tokens_BS[:, k:k + T].shape[1])))  # t_{i+k}
        emb_BTD = w("embed_tokens.weight")[ahead_BT]
        concat = np.concatenate([rms(emb_BTD, w("enorm.weight")), rms(h_BTD, w("hnorm.weight"))], -1)
        h_BTD = concat @ w("eh_proj.weight").T  # eq. 21 (eq. 22's block is the identity here)
        logits_BTV = rms(h_BTD, w("shared_head.norm.weight")) @ w("shared_head.head.weight").T  # eq. 23
        valid = T - k  # eq. 24: positions whose target t_{i+k+1} is inside the window
        np.testing.assert_allclose(out.mtp_logits_PBTV[k - 1, :, :valid], logits_BTV[:, :valid], rtol=1e-4, atol=1e-5)
        logp = logits_BTV[:, :valid] - np.log(np.exp(logits_BTV[:, :valid]).sum(-1, keepdims=True))
        target_BT = tokens_BS[:, k + 1:k + 1 + valid]
        losses.append(-np.take_along_axis(logp, target_BT[..., None], -1).mean())
    lam = 0.3
    parts = total_loss(out.logits_BTV, out.mtp_logits_PBTV, out.stats, jnp.asarray(tokens_BS), lam,
                       Balancing.from_config(cfg, TrainConfig()))
    np.testing.assert_allclose(lam * float(parts.mtp), lam / cfg.mtp_depth * sum(losses), rtol=1e-5)  # eq. 25
