import os
import sys

# Shape checks that run (dsv3_jax/__init__.py): jaxtyping + beartype check every annotated function
# of the package at call time, and implicit rank promotion (x_BTD * scale_D) is an error. Set in
# the environment, before the package or jax is imported, so `dsv3` subprocesses check too.
os.environ.setdefault("DSV3_CHECK_SHAPES", "1")
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
# The checked modules are jaxtyping's rewrite of the source: let Python cache their bytecode (this
# machine and CI set PYTHONDONTWRITEBYTECODE), or each `dsv3` subprocess recompiles them (2 s of
# its start; 0.35 s with the cache).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

# Several host devices for multi-device tests; must be set before jax initialises. Added to any
# XLA_FLAGS already set (replacing them would drop the user's flags; keeping them must not drop ours).
_HOST_DEVICES = "--xla_force_host_platform_device_count=8"
# Tests compile hundreds of small programs and run each a few times: LLVM's optimisation of the
# generated CPU code is most of the compile time (a tiny train step: 17.6 s at the default level,
# 1.1 s at level 0, for 2.2x its 14 ms run time), and it cannot change results (no fast-math at any
# level). A cold-cache suite on the 2-core CI machine: 34 min -> see README. Benchmarks and the
# `dsv3` command keep XLA's default.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
for _flag in (_HOST_DEVICES, _FAST_COMPILE):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

# The suite runs on the host CPU unless the machine has an accelerator (then `pytest -m gpu` runs on
# it): as the `dsv3` command decides (dsv3_jax/host_platform.py), before JAX starts.
from dsv3_jax.host_platform import allow_slow_host_collectives, default_to_cpu_without_accelerator

default_to_cpu_without_accelerator()
allow_slow_host_collectives()  # as the `dsv3` command does: 8 host devices on CI's 2 cores

from dsv3_jax.host_memory import keep_step_memory

keep_step_memory()  # as the `dsv3` command does (dsv3_jax/host_memory.py); before JAX starts

import dataclasses
from pathlib import Path

import jax
import pytest

from dsv3_jax.config import ModelConfig, get_preset

# Shared by every `dsv3` subprocess of a test run: they compile the same small programs, and
# XLA's persistent cache turns ~20 s of compiling per process into a read (measured 36 s -> 16 s
# for a resumed CLI run on the 2-core CI-like machine).
JAX_CACHE = Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax-compilation"


# Likewise the data pipeline's trained tokenizer and packed windows (dsv3_jax/data/cache.py): most
# `dsv3` processes of the suite read the default corpus, 7 s of BPE training and tokenising each.
os.environ.setdefault("DSV3_DATA_CACHE", str(JAX_CACHE.parent / "dsv3-data"))


# The test processes use it too, for compiles over a second: the same reference steps are built
# by several test files.
jax.config.update("jax_compilation_cache_dir", str(JAX_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a `python -m dsv3_jax.cli` subprocess: CPU, one device (unless `extra`
    says otherwise), the shared compilation cache."""
    return {**os.environ, "XLA_FLAGS": _FAST_COMPILE, "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(JAX_CACHE), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1", **extra}


def tiny_model_config(**changes) -> ModelConfig:
    """The `tiny` preset shrunk further for unit tests (fp32, short sequences)."""
    base = dict(vocab_size=97, d_model=32, n_layers=3, first_k_dense=1, n_heads=2, q_lora_rank=16,
                kv_lora_rank=16, qk_nope_dim=8, qk_rope_dim=8, v_head_dim=8, ffn_dim=48, moe_ffn_dim=16,
                n_routed_experts=8, n_shared_experts=1, top_k=2, n_group=4, topk_group=2, max_seq_len=64,
                mtp_depth=2, dtype="float32")
    base.update(changes)
    return dataclasses.replace(get_preset("tiny").model, **base)


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return tiny_model_config()


def need_devices(n: int) -> None:
    """Skip a multi-device test where fewer than n devices exist, except in CI (CI=true), where the
    8 host devices above must be there: a missing mesh there is a failure, not a silent skip."""
    have = len(jax.devices())
    if have >= n:
        return
    message = (f"needs {n} devices, found {have} ({jax.default_backend()}); on CPU set "
               f"XLA_FLAGS={_HOST_DEVICES} before jax starts")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def tiny_base_run(tmp_path_factory) -> Path:
    """A run directory holding a randomly initialised small model and a BPE tokenizer trained on a
    few hundred lines of arithmetic and text: the starting point of SFT and GRPO tests."""
    from flax import nnx

    from dsv3_jax.checkpoint import save_as_run
    from dsv3_jax.data.tokenizer import train_tokenizer
    from dsv3_jax.model.model import DeepSeekV3

    root = tmp_path_factory.mktemp("base")
    docs = [f"{a}+{b}={a + b}\nThe answer is {a * b}. Some words, and more words." for a in range(30) for b in range(9)]
    tokenizer = train_tokenizer(docs, 300)
    tokenizer.save(str(root / "tokenizer.json"))
    cfg = tiny_model_config(vocab_size=300, mtp_depth=1)
    save_as_run(DeepSeekV3(cfg, nnx.Rngs(0)), cfg, root / "run", root / "tokenizer.json")
    return root / "run"
