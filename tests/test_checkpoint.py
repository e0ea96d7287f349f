"""A checkpoint is independent of the mesh that wrote it (checkpoint.restore_target): a run trained
on (data=2, expert=2) over 4 host devices is sampled and exported on 1 device and resumed on 2 and 8
with the losses of the uninterrupted run; a damaged checkpoint is still called damaged, a sound one on
another mesh never is."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dsv3_jax.checkpoint import Checkpointer, DamagedCheckpoint, load_trained, restore_target
from dsv3_jax.config import Config, MeshConfig, TrainConfig
from dsv3_jax.parallel.mesh import MESH_AXES, make_mesh
from dsv3_jax.train.state import create_train_state
from tests.conftest import cli_env, need_devices, tiny_model_config
from tests.test_train_cli import SMALL, losses

pytestmark = pytest.mark.multidevice

STEPS = 9
# The first command of the run, repeated with --resume (and another mesh) to continue it.
COMMAND = ["--preset", "tiny", "--seed", "11", *SMALL, "--set", "train.batch_size=8", "--set", "train.checkpoint_every=3",
           "--set", "train.keep_checkpoints=3"]
FOUR = ["--mesh", "data=2,expert=2", "--host-devices", "4"]


def dsv3(*args):
    return subprocess.run([sys.executable, "-m", "dsv3_jax.cli", *args], capture_output=True, text=True,
                          env=cli_env(), timeout=300)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """9 steps on (data=2, expert=2), checkpoints at 3, 6 and 9: the uninterrupted run."""
    run = tmp_path_factory.mktemp("mesh") / "straight"
    out = dsv3("train", "--steps", str(STEPS), "--run-dir", str(run), *COMMAND, *FOUR)
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def preempted(straight: Path, where: Path) -> Path:
    """The straight run as if stopped after checkpoint 6 (what a preempted job leaves)."""
    shutil.copytree(straight, where)
    shutil.rmtree(where / "checkpoints" / "9")
    return where


def test_a_four_device_run_samples_and_exports_on_one_device(straight, tmp_path):
    """(a) greedy tokens on 1 device (the `dsv3 generate` command, and in process) equal those on the
    4-device mesh; (b) `convert orbax-to-hf` of it loads, with the run's logits."""
    from dsv3_jax.data.tokenizer import load_tokenizer
    from dsv3_jax.infer.generate import generate
    from dsv3_jax.interop import hf

    need_devices(4)
    run = preempted(straight, tmp_path / "run")
    prompt = "def f("
    config, on_mesh, tokenizer = load_trained(run, mesh=make_mesh(MeshConfig(data=2, expert=2)))
    experts = on_mesh.moe_layers.ffn.w_gate_EDF.get_value()
    assert len(experts.sharding.device_set) == 4 and not experts.sharding.is_fully_replicated
    _, on_one, _ = load_trained(run)
    assert len(on_one.moe_layers.ffn.w_gate_EDF.get_value().sharding.device_set) == 1
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    want = generate(on_mesh, [ids], 12)[0]
    assert generate(on_one, [ids], 12)[0] == want
    out = dsv3("generate", "--run-dir", str(run), "--prompt", prompt, "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.rstrip("\n") == prompt + tokenizer.decode(want, skip_special_tokens=False)

    out = dsv3("convert", "orbax-to-hf", str(run), str(tmp_path / "hf"))
    assert out.returncode == 0, out.stderr[-2000:]
    _, exported = hf.load(tmp_path / "hf")
    tokens = np.asarray([load_tokenizer(tmp_path / "hf" / "tokenizer.json").encode("x = 1 + 2").ids], np.int32)
    np.testing.assert_allclose(exported(tokens).logits_BTV, on_mesh(tokens).logits_BTV, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mesh, devices", [("expert=2", 2), ("data=2,expert=4", 8)])
def test_resume_on_another_mesh_continues_the_run(straight, tmp_path, mesh, devices):
    """(c) the run's own command with --resume and another --mesh / --host-devices: the steps after
    checkpoint 6 have the uninterrupted run's losses (fp32, up to reassociation across devices), the
    batches continue where they stopped, and the change is logged in mesh_changes.jsonl."""
    run = preempted(straight, tmp_path / "run")
    out = dsv3("train", "--steps", str(STEPS), "--run-dir", str(run), *COMMAND, "--mesh", mesh,
               "--host-devices", str(devices), "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "damaged" not in out.stderr
    got, want = losses(run), losses(straight)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    assert got[:6] == want[:6]
    np.testing.assert_allclose([l for _, l in got[6:]], [l for _, l in want[6:]], rtol=1e-5)
    assert np.diff([l for _, l in want]).std() > 1e-4  # the losses move: a repeated batch would show
    changes = [json.loads(line) for line in (run / "mesh_changes.jsonl").read_text().splitlines()]
    sizes = dict(item.split("=") for item in mesh.split(","))
    assert changes == [{"step": 6, "from": {"mesh": {**dict.fromkeys(MESH_AXES, 1), "data": 2, "expert": 2},
                                            "processes": 1},
                        "to": {"mesh": {**dict.fromkeys(MESH_AXES, 1), **{k: int(v) for k, v in sizes.items()}},
                               "processes": 1}}]
    assert json.loads((run / "config.json").read_text())["mesh"]["expert"] == int(sizes["expert"])


def test_resume_refuses_what_cannot_change_and_a_mesh_that_cannot_hold_the_model(straight, tmp_path):
    run = preempted(straight, tmp_path / "run")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    out = dsv3("train", "--run-dir", str(run), *COMMAND, *FOUR, "--set", "model.n_layers=3", "--resume")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "model.n_layers: 2 -> 3" in out.stderr, out.stderr
    out = dsv3("train", "--run-dir", str(run), *["12" if a == "11" else a for a in COMMAND], *FOUR, "--resume")
    assert out.returncode == 2 and "train.seed: 11 -> 12" in out.stderr, out.stderr
    out = dsv3("train", "--run-dir", str(run), *COMMAND, "--mesh", "expert=3", "--host-devices", "3",
               "--set", "train.batch_size=9", "--resume")  # 8 experts on 3 ranks
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "model.n_routed_experts=8 must be divisible by mesh.expert=3" in out.stderr
    out = dsv3("train", "--run-dir", str(run), "--mesh", "data=4", "--host-devices", "2", "--resume")
    assert out.returncode == 2 and "needs 4 devices but 2 are available" in out.stderr, out.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def _state(mesh):
    config = Config(model=tiny_model_config(), train=TrainConfig(batch_size=8, seq_len=16))
    return create_train_state(config, 0, mesh)[2]


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def test_restore_places_any_checkpoint_on_the_mesh_it_runs_on(tmp_path):
    """Written on (data=2, expert=4), read back on (expert=2), (pipeline=2, tensor=2) and one device:
    the same values, in the shardings the rules give that mesh; a target without shardings is refused."""
    need_devices(8)
    state = _state(make_mesh(MeshConfig(data=2, expert=4)))
    saver = Checkpointer(tmp_path / "checkpoints")
    saver.save(3, state, {"next_index": 3})
    saver.close()
    reader = Checkpointer(tmp_path / "checkpoints", read_only=True)
    for sizes in (MeshConfig(expert=2), MeshConfig(pipeline=2, tensor=2), None):
        mesh = make_mesh(sizes) if sizes else None
        target = restore_target(_abstract(state), mesh)
        restored, data, step = reader.restore(target)
        assert (step, data) == (3, {"next_index": 3})
        jax.tree.map(np.testing.assert_array_equal, restored, state)
        assert all(a.sharding == t.sharding for a, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)))
        experts = restored.params["moe_layers"]["ffn"]["w_gate_EDF"].get_value()
        assert len(experts.sharding.device_set) == (sizes.n_devices if sizes else 1)
    # The expert stack on 2 expert ranks: each holds half the experts, read from the 4 ranks' files.
    two = reader.restore(restore_target(_abstract(state), make_mesh(MeshConfig(expert=2))))[0]
    shard = two.params["moe_layers"]["ffn"]["w_gate_EDF"].get_value().addressable_shards[0]
    assert shard.data.nbytes == state.params["moe_layers"]["ffn"]["w_gate_EDF"].get_value().nbytes // 2
    with pytest.raises(ValueError, match="without shardings"):
        reader.restore(_abstract(state))
    reader.close()


def test_only_really_damaged_checkpoints_are_called_damaged(tmp_path):
    """A truncated newest checkpoint (written on 8 devices, read on 1) is damaged: set aside, the one
    before it restores. The sound one is never damaged on any mesh."""
    need_devices(8)
    state = _state(make_mesh(MeshConfig(data=2, expert=4)))
    saver = Checkpointer(tmp_path / "checkpoints", keep=3)
    saver.save(1, state, {"next_index": 1})
    saver.save(2, state, {"next_index": 2})
    saver.close()
    for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])  # truncated
    said = []
    reader = Checkpointer(tmp_path / "checkpoints")
    with pytest.raises(DamagedCheckpoint, match="checkpoint 2 .* is damaged"):
        reader.restore(restore_target(_abstract(state)), 2)
    restored, data, step = reader.restore_newest_good(restore_target(_abstract(state)), tmp_path / "aside",
                                                      say=said.append)
    assert step == 1 and data == {"next_index": 1} and "checkpoint(s) 2 could not be read" in said[0]
    assert [p.name.split("-")[0] for p in (tmp_path / "aside").iterdir()] == ["2"]
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    for sizes in (MeshConfig(expert=2), MeshConfig(data=4, expert=2)):
        said.clear()
        reader.restore_newest_good(restore_target(_abstract(state), make_mesh(sizes)), tmp_path / "aside",
                                   say=said.append)
        assert not said
    reader.close()


def test_fine_tuning_starts_from_a_run_trained_on_another_mesh(straight, tmp_path):
    """sft / grpo --from: the base run's weights read onto the fine-tuning run's mesh (expert=2 here,
    from a (data=2, expert=2) checkpoint), equal to the weights read onto one device."""
    import dataclasses

    from dsv3_jax.config import config_from_json
    from dsv3_jax.post.sft import init_from_run

    need_devices(2)
    run = preempted(straight, tmp_path / "run")
    base = config_from_json((run / "config.json").read_text())
    config = dataclasses.replace(base, mesh=MeshConfig(expert=2),
                                 train=dataclasses.replace(base.train, objective="sft", init_from=str(run)))
    mesh = make_mesh(config.mesh)
    state = init_from_run(create_train_state(config, 0, mesh)[2], config, mesh)
    _, on_one, _ = load_trained(run, with_tokenizer=False)
    experts = state.params["moe_layers"]["ffn"]["w_gate_EDF"].get_value()
    assert len(experts.sharding.device_set) == 2 and not experts.sharding.is_fully_replicated
    np.testing.assert_array_equal(experts, on_one.moe_layers.ffn.w_gate_EDF.get_value())
    np.testing.assert_array_equal(state.params["embed"]["table_VD"].get_value(), on_one.embed.table_VD.get_value())
