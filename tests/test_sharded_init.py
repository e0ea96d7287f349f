"""The train state is created sharded under a mesh: the same values as on one device, and a state
larger than one device's budget starts without ever existing whole on one device."""

import jax
import numpy as np
import pytest

from dsv3_jax.checkpoint import Checkpointer
from dsv3_jax.config import Config, MeshConfig, TrainConfig, get_preset
from dsv3_jax.parallel.mesh import make_mesh
from dsv3_jax.train import state as state_module
from dsv3_jax.train.state import abstract_train_state, create_train_state, sharded_init
from tests.conftest import need_devices, tiny_model_config

pytestmark = pytest.mark.multidevice


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_sharded_init_gives_the_single_device_values():
    """Bit for bit the same program run on one device; within an ulp of the eager single-device
    init (XLA fuses std * normal under jit)."""
    need_devices(8)
    config = Config(model=tiny_model_config(), train=TrainConfig(batch_size=4, seq_len=16))
    _, _, eager = create_train_state(config, 3)
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=2, expert=2))
    _, _, got = create_train_state(config, 3, mesh)
    one_device, _ = sharded_init(config, 3, make_mesh(MeshConfig()))
    jax.tree.map(np.testing.assert_array_equal, got, one_device())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), got, eager)
    experts = got.params["moe_layers"]["ffn"]["w_gate_EDF"].get_value()
    assert experts.sharding.mesh == mesh and not experts.sharding.is_fully_replicated
    assert experts.addressable_shards[0].data.nbytes == experts.nbytes // 8  # expert x fsdp x tensor


def test_a_state_larger_than_one_devices_budget_is_created_in_shards():
    """The `small` preset's state (params + AdamW moments, 1.4 GB) against a budget of a third of
    it per device: the compiled sharded initialisation's outputs and temporaries per device fit the
    budget, so no device ever holds the state whole (compiled only; nothing is allocated)."""
    need_devices(8)
    config = get_preset("small")
    whole = _bytes(abstract_train_state(config)[2])
    budget = whole // 3
    init, _ = sharded_init(config, 0, make_mesh(MeshConfig(fsdp=2, tensor=2, expert=2)))
    memory = init.lower().compile().memory_analysis()
    per_device = memory.output_size_in_bytes + memory.temp_size_in_bytes
    assert whole > budget and per_device < budget, (whole, per_device)
    assert memory.output_size_in_bytes < whole / 5  # outputs: about 1/8 plus the replicated norms and routers


def test_a_sharded_state_restores_into_its_shardings(tmp_path):
    """What `--resume` on a mesh does: orbax reads each leaf straight into the target sharding."""
    need_devices(8)
    config = Config(model=tiny_model_config(), train=TrainConfig(batch_size=4, seq_len=16))
    _, _, state = create_train_state(config, 0, make_mesh(MeshConfig(data=2, expert=4)))
    saver = Checkpointer(tmp_path / "checkpoints")
    saver.save(5, state, {"position": 7})
    saver.close()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, data, step = Checkpointer(tmp_path / "checkpoints", read_only=True).restore(target)
    assert (step, data) == (5, {"position": 7})
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    assert all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)))
    assert not restored.params["moe_layers"]["ffn"]["w_gate_EDF"].get_value().sharding.is_fully_replicated


def test_a_mesh_never_builds_the_state_outside_the_sharded_program(monkeypatch):
    need_devices(8)
    real = state_module._build

    def traced_only(*args):
        out = real(*args)
        assert all(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(out[2])), "state built eagerly"
        return out

    monkeypatch.setattr(state_module, "_build", traced_only)
    config = Config(model=tiny_model_config(), train=TrainConfig(batch_size=4, seq_len=16))
    create_train_state(config, 0, make_mesh(MeshConfig(fsdp=4, tensor=2)))
