"""Speed work must not change what is computed: the first train steps' losses (and gradient norms)
equal the values recorded before the optimisations of issue 18 (tests/fixtures/early_losses.json,
written by `python -m tests.test_speed_invariants` at commit cf3ded2, before them), up to float
reassociation."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dsv3_jax.config import Config, TrainConfig
from dsv3_jax.train.state import create_train_state
from dsv3_jax.train.step import make_train_step
from tests.conftest import tiny_model_config

FIXTURE = Path(__file__).parent / "fixtures" / "early_losses.json"
STEPS = 6
# seq_len 32 (recorded first); seq_len 160 > layers.CAUSAL_CHUNK = 128 also covers chunked causal
# attention and several 128-row expert blocks per expert (recorded at cf3ded2 too, later).
CASES = {"seq_len_32": dict(seq_len=32, batch_size=4), "seq_len_160": dict(seq_len=160, batch_size=2)}


def early_losses(seq_len: int, batch_size: int) -> dict[str, list[float]]:
    """Six steps of the test-sized model (MLA, MoE with the aux-free bias, MTP) on fixed tokens."""
    config = Config(model=tiny_model_config(n_layers=3, mtp_depth=1, max_seq_len=max(64, seq_len)),
                    train=TrainConfig(batch_size=batch_size, seq_len=seq_len, warmup_steps=2, lr=3e-3,
                                      bias_gamma=0.01))
    graphdef, optimizer, state = create_train_state(config, 0)
    step = jax.jit(make_train_step(config, graphdef, optimizer))
    out = {"loss": [], "grad_norm": [], "mtp_loss": []}
    for i in range(STEPS):
        tokens = jax.random.randint(jax.random.key(i), (batch_size, seq_len + 1), 0, config.model.vocab_size)
        state, metrics = step(state, tokens)
        for key in out:
            out[key].append(float(metrics[key]))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_early_losses_are_unchanged_by_speed_work(case):
    want = json.loads(FIXTURE.read_text())[case]
    got = early_losses(**CASES[case])
    for key, values in want.items():
        np.testing.assert_allclose(got[key], values, rtol=2e-5, err_msg=f"{case} {key}")


if __name__ == "__main__":  # record the fixture (only from the code before an optimisation)
    FIXTURE.write_text(json.dumps({case: early_losses(**kw) for case, kw in CASES.items()}, indent=1) + "\n")
    sys.exit(0)
