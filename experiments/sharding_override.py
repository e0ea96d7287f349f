"""A sharding override against the default rules: the compiled train step's collectives and the
per-device bytes (tests/test_sharding_rules.py asserts them; this prints the numbers).

Command: uv run python experiments/sharding_override.py > experiments/results/sharding_override.md
"""
import os, sys, datetime
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import jax
from conftest import tiny_model_config
from test_sharding_rules import _step
from dsv3_jax.config import Config, TrainConfig, MeshConfig, apply_overrides
from dsv3_jax.parallel.mesh import make_mesh
from dsv3_jax.hlo_stats import collectives
base = Config(model=tiny_model_config(mtp_depth=0), train=TrainConfig(batch_size=4, seq_len=16), mesh=MeshConfig(data=2, tensor=2))
rows = []
for name, cfg in (("default", base), ("sharding.heads= sharding.ffn=", apply_overrides(base, ["sharding.heads=", "sharding.ffn="]))):
    state, hlo, loss = _step(cfg, make_mesh(cfg.mesh))
    c = collectives(hlo)
    shapes = []
    for path in (("dense_layers", "ffn", "gate", "kernel"), ("moe_layers", "attn", "w_o", "kernel")):
        leaf = state.params
        for k in path: leaf = leaf[k]
        a = leaf.get_value(); shapes.append(f"{tuple(a.shape)} -> {tuple(a.addressable_shards[0].data.shape)}")
    per_dev = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state.params))
    rows.append(f"| {name} | {c.get('all-reduce', {}).get('count', 0)} | {c.get('all-reduce', {}).get('bytes', 0):,} | {c.get('all-gather', {}).get('count', 0)} | {shapes[0]} | {shapes[1]} | {per_dev:,} | {loss:.6f} |")
print(f"# Sharding rules as a value: an override changes the compiled program (tests/test_sharding_rules.py)\n\n"
      f"{datetime.date.today()}, CPU host, 4 of 8 forced host devices, mesh data=2,tensor=2, tiny (mtp_depth 0), batch 4 x 16; the test's own `_step` (compiled train step, `collectives` of its optimized HLO, `addressable_shards[0]`). jax {jax.__version__}.\n\n"
      "| rules | all-reduces | all-reduce bytes | all-gathers | dense ffn gate kernel: global -> device 0 | MoE w_o kernel: global -> device 0 | parameter bytes on device 0 | loss |\n|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
