"""The parameters' EMA in host memory (report §3.2.3, train/ema.py) against a numpy EMA of the
parameter trajectory: on a sharded mesh, and through the training loop, its checkpoints and a resume."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import need_devices, tiny_model_config
from dsv3_jax.checkpoint import Checkpointer, restore_target
from dsv3_jax.config import Config, DataConfig, TrainConfig, get_preset
from dsv3_jax.errors import UsageError
from dsv3_jax.jobs.grpo import grpo
from dsv3_jax.train.ema import HOST_KIND, HostEMA
from dsv3_jax.jobs.train import train
from dsv3_jax.train.state import abstract_train_state, create_train_state


def numpy_ema(trajectory: list, decay: float, every: int):
    """The reference: start at trajectory[0] (the initial parameters), fold in every `every`-th."""
    ema = [np.array(leaf, np.float64) for leaf in trajectory[0]]
    for step, leaves in enumerate(trajectory[1:], start=1):
        if step % every == 0:
            ema = [decay * e + (1 - decay) * np.asarray(p, np.float64) for e, p in zip(ema, leaves)]
    return ema


def test_host_ema_of_sharded_params_equals_a_numpy_ema_and_lives_in_host_memory():
    need_devices(8)
    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    shardings = {"w": NamedSharding(mesh, P("expert", None)), "b": NamedSharding(mesh, P())}  # split; replicated
    rng = np.random.default_rng(0)
    trajectory = [{"w": rng.normal(size=(8, 3)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
                  for _ in range(7)]
    place = lambda tree: {k: jax.device_put(jnp.asarray(v), shardings[k]) for k, v in tree.items()}  # noqa: E731
    ema = HostEMA(0.75, 2, place(trajectory[0]))
    for step, params in enumerate(trajectory[1:], start=1):
        ema.update(step, place(params))
    host = ema.host_arrays()
    expected = numpy_ema([[t["b"], t["w"]] for t in trajectory], 0.75, 2)  # tree order: b, w
    for leaf, want in zip(jax.tree.leaves(host), expected):
        np.testing.assert_allclose(np.asarray(leaf), want, rtol=1e-6, atol=1e-7)
    assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(host)} == {HOST_KIND}
    # this process holds each distinct shard once: 4 row blocks of w, one copy of b
    assert [len(shards) for shards in ema.shards] == [1, 4]
    on_device = ema.device_params()
    assert on_device["w"].sharding == shardings["w"] and on_device["w"].sharding.memory_kind == "device"
    ema.close()


def _config(**train) -> Config:
    model = tiny_model_config(n_layers=2, mtp_depth=1, vocab_size=384)
    return Config(model=model, data=DataConfig(source="synthetic"),
                  train=TrainConfig(**{"steps": 4, "batch_size": 2, "seq_len": 16, "eval_every": 100, "eval_batches": 1,
                                       "checkpoint_every": 1, "keep_checkpoints": 5, "warmup_steps": 1,
                                       "ema_decay": 0.5, "ema_every": 2, **train}))


def test_the_loops_ema_is_the_numpy_ema_of_its_parameters_and_resumes_exactly(tmp_path):
    config = _config()
    run = tmp_path / "run"
    assert train(config, run, progress=False) == 0
    abstract = restore_target(abstract_train_state(config)[2])
    reader = Checkpointer(run / "checkpoints", read_only=True)
    trajectory = [jax.tree.leaves(create_train_state(config, config.train.seed)[2].params)]
    trajectory += [jax.tree.leaves(reader.restore(abstract, step)[0].params) for step in range(1, 5)]
    ema = HostEMA(0.5, 2, create_train_state(config, 0)[2].params)  # for its restore target only
    saved = jax.tree.leaves(reader.restore_ema(4, ema.restore_target()))
    for leaf, want in zip(saved, numpy_ema(trajectory, 0.5, 2), strict=True):
        np.testing.assert_allclose(np.asarray(leaf), want, rtol=1e-6, atol=1e-7)
    assert not np.allclose(np.asarray(saved[0]), np.asarray(trajectory[4][0]))  # an average, not the last params
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(last["val_loss_ema"]) and last["val_loss_ema"] != last["val_loss"]

    # Resumed from checkpoint 3 (between two updates; the step-4 one removed): the same EMA at step 4.
    again = tmp_path / "again"
    shutil.copytree(run, again)
    shutil.rmtree(again / "checkpoints" / "4")
    assert train(config, again, resume=True, progress=False) == 0
    resumed = jax.tree.leaves(Checkpointer(again / "checkpoints", read_only=True).restore_ema(4, ema.restore_target()))
    for a, b in zip(resumed, saved, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ema.close()


def test_grpo_refuses_an_ema_before_touching_anything(tmp_path):
    """GRPO keeps no EMA: asked for one, it says so in one line (exit 2 from the CLI) and writes nothing."""
    config = get_preset("tiny")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, objective="grpo", ema_decay=0.5))
    with pytest.raises(UsageError, match="dsv3 grpo keeps no parameter EMA"):
        grpo(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
