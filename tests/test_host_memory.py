"""keep_step_memory: the second execution of a program with a large scratch buffer reuses the
first one's pages instead of faulting in fresh ones (counted by the kernel, getrusage)."""

import json
import os
import platform
import subprocess
import sys

import pytest

from dsv3_jax.host_memory import cpu_backend_expected

_PROBE = r"""
import json, resource, sys
from dsv3_jax.host_memory import keep_step_memory
applied = keep_step_memory()
import jax, jax.numpy as jnp
# x x^T summed by rows: the 4096 x 4096 fp32 product (64 MiB) lives in XLA:CPU's scratch buffer
# between the matmul and the reduction.
f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T), axis=0))
x = jnp.linspace(0.0, 1.0, 4096 * 64).reshape(4096, 64)
jax.block_until_ready(f(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    jax.block_until_ready(f(x))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(setting: str) -> dict:
    env = {**os.environ, "DSV3_KEEP_STEP_MEMORY": setting, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc malloc settings")
def test_a_steps_scratch_memory_is_reused_not_faulted_in_again():
    kept, default = _probe("1"), _probe("0")
    assert kept["applied"] and not default["applied"]
    product_pages = 4096 * 4096 * 4 / 4096
    assert default["faults"] > 0.25 * product_pages, default  # glibc maps fresh pages per execution
    # The process's other faults (XLA's threads) stay below 1% on an idle machine; with the suite's
    # other worker busy they reached 343 pages (2%): still 20x under the default's.
    assert kept["faults"] < 0.05 * product_pages, (kept, default)


def test_only_the_cpu_backend_is_tuned(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not cpu_backend_expected()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert cpu_backend_expected()


@pytest.mark.parametrize("argv, keeps", [
    (["train"], True), (["sft"], True), (["grpo"], True), (["bench", "train"], True),
    (["bench", "decode"], False), (["generate", "--run-dir", "r", "--prompt", "x"], False), (["info"], False),
])
def test_the_commands_that_train_keep_step_memory(argv, keeps):
    from dsv3_jax.cli import build_parser, runs_train_steps

    assert runs_train_steps(build_parser().parse_args(argv)) == keeps


def test_jax_platforms_defaults_to_cpu_only_on_a_host_without_accelerators(monkeypatch):
    from dsv3_jax import host_platform

    for has_accelerator, user, want in ((False, None, "cpu"), (True, None, None), (False, "tpu", "tpu")):
        monkeypatch.delenv("JAX_PLATFORMS", raising=False)
        if user:
            monkeypatch.setenv("JAX_PLATFORMS", user)
        monkeypatch.setattr(host_platform, "host_has_accelerator", lambda: has_accelerator)
        host_platform.default_to_cpu_without_accelerator()
        assert os.environ.get("JAX_PLATFORMS") == want, (has_accelerator, user)


def test_host_collectives_wait_longer_unless_the_user_sets_the_timeout(monkeypatch):
    # conftest.py set the flag before this process's CPU backend started: XLA accepted it (an unknown
    # XLA_FLAGS entry aborts the process), and the 8-device tests ran under it.
    from dsv3_jax import host_platform

    for user, want in (("--xla_force_host_platform_device_count=2",
                        f"--xla_force_host_platform_device_count=2 {host_platform._TIMEOUT_FLAG}=900"),
                       (f"{host_platform._TIMEOUT_FLAG}=5", f"{host_platform._TIMEOUT_FLAG}=5")):
        monkeypatch.setenv("XLA_FLAGS", user)
        host_platform.allow_slow_host_collectives()
        assert os.environ["XLA_FLAGS"] == want
