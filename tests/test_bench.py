"""The benches run and report what they claim to (no timing is asserted: benches print tables)."""

import dataclasses

import pytest

from dsv3_jax.jobs.bench import bench_decode, bench_fp8, bench_train, markdown_table
from dsv3_jax.config import Config, TrainConfig
from tests.conftest import tiny_model_config


def test_bench_decode_rows_and_cache_sizes():
    cfg = tiny_model_config(mtp_depth=0)
    rows = bench_decode(Config(model=cfg, train=TrainConfig(seq_len=16)), batch=1, context=16, decode_steps=1)
    by_mode = {r["mode"]: r for r in rows}
    assert set(by_mode) == {"absorbed", "expanded", "naive"}
    assert by_mode["absorbed"]["cache_bytes_per_token"] == cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_dim) * 2
    assert by_mode["naive"]["cache_bytes_per_token"] == cfg.n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 2
    assert all(r["decode_tokens_per_s"] > 0 for r in rows)
    assert "| absorbed |" in markdown_table(rows)


def test_bench_fp8_and_train_tables():
    rows = bench_fp8(128, 128, [128], ["xla", "pallas"], repeats=1)
    assert [r["op"] for r in rows] == ["bf16 jnp.dot", "fp8 block-scaled (xla)", "fp8 block-scaled (pallas)",
                                       "fp8 grouped, 8 experts (xla)", "fp8 grouped, 8 experts (pallas)"]
    cfg = dataclasses.replace(tiny_model_config(), n_layers=2, mtp_depth=0)
    (row,) = bench_train(Config(model=cfg, train=TrainConfig(batch_size=2, seq_len=16)), steps=1, peak_matmul_n=256)
    assert row["tokens_per_s"] > 0 and row["model_TFLOP/s"] > 0 and row["MFU"].startswith("n/a")  # CPU: no peak
    # The measured peak is a real matmul rate, and the tiny model reaches a fraction of it.
    assert row["jnp.dot_TFLOP/s"] > 0 and row["of_jnp.dot"] == pytest.approx(
        row["model_TFLOP/s"] / row["jnp.dot_TFLOP/s"])
