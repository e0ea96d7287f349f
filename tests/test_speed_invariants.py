"""Speed work must not change what is computed: the first train steps' losses (and gradient norms)
equal the values recorded before the optimisations of issue 18 (tests/fixtures/early_losses.json,
written by `python -m tests.test_speed_invariants` at commit cf3ded2, before them), up to float
reassociation."""

import json
import sys
from pathlib import Path

import jax
import numpy as np

from dsv3_jax.config import Config, TrainConfig
from dsv3_jax.train.state import create_train_state
from dsv3_jax.train.step import make_train_step
from tests.conftest import tiny_model_config

FIXTURE = Path(__file__).parent / "fixtures" / "early_losses.json"
STEPS = 6


def early_losses() -> dict[str, list[float]]:
    """Six steps of the test-sized model (MLA, MoE with the aux-free bias, MTP) on fixed tokens."""
    config = Config(model=tiny_model_config(n_layers=3, mtp_depth=1),
                    train=TrainConfig(batch_size=4, seq_len=32, warmup_steps=2, lr=3e-3, bias_gamma=0.01))
    graphdef, optimizer, state = create_train_state(config, 0)
    step = jax.jit(make_train_step(config, graphdef, optimizer))
    out = {"loss": [], "grad_norm": [], "mtp_loss": []}
    for i in range(STEPS):
        tokens = jax.random.randint(jax.random.key(i), (4, 33), 0, config.model.vocab_size)
        state, metrics = step(state, tokens)
        for key in out:
            out[key].append(float(metrics[key]))
    return out


def test_early_losses_are_unchanged_by_speed_work():
    want = json.loads(FIXTURE.read_text())
    got = early_losses()
    for key, values in want.items():
        np.testing.assert_allclose(got[key], values, rtol=2e-5, err_msg=key)


if __name__ == "__main__":  # record the fixture (only from the code before an optimisation)
    FIXTURE.write_text(json.dumps(early_losses(), indent=1) + "\n")
    sys.exit(0)
