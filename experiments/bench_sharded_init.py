"""Sharded initialisation: per-device bytes of the train state as the mesh grows (compiled, not run).

Command:   uv run python experiments/bench_sharded_init.py [--preset small]
Runtime:   about 2 minutes on a 2-core CPU (four compilations; nothing is allocated).
Shows:     the init program that `create_train_state(config, seed, mesh)` runs under a mesh
           (train/state.py `sharded_init`), compiled for 1, 2, 4 and 8 host devices: its per-device
           outputs and temporaries from `compiled.memory_analysis()` against the whole state, and the
           collectives in its HLO (none expected: each device draws its own shards of the random
           weights). Writes experiments/results/bench_sharded_init.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from dsv3_jax.config import MeshConfig, get_preset  # noqa: E402
from dsv3_jax.parallel.mesh import make_mesh  # noqa: E402
from dsv3_jax.train.state import abstract_train_state, sharded_init  # noqa: E402
from variants import RESULTS  # noqa: E402

MESHES = {1: MeshConfig(), 2: MeshConfig(expert=2), 4: MeshConfig(fsdp=2, expert=2), 8: MeshConfig(fsdp=2, tensor=2, expert=2)}
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    args = parser.parse_args()
    config = get_preset(args.preset)
    whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_train_state(config)[2]))
    lines = [f"# Sharded initialisation of the `{args.preset}` train state ({time.strftime('%Y-%m-%d')}, "
             f"{jax.devices()[0].platform} host devices, jax {jax.__version__})", "",
             f"Whole state (fp32 params + AdamW moments + bias + step): {whole / 2**20:,.1f} MiB. Per device, "
             "from `memory_analysis()` of the compiled init program; nothing is allocated.", "",
             "| devices | mesh | outputs / device MiB | temp / device MiB | (outputs + temp) / whole | collectives in HLO |",
             "|---|---|---|---|---|---|"]
    for n, sizes in MESHES.items():
        init, _ = sharded_init(config, 0, make_mesh(sizes))
        compiled = init.lower().compile()
        memory = compiled.memory_analysis()
        hlo = compiled.as_text()
        found = {c: len(re.findall(rf"\b{c}(-start)?\(", hlo)) for c in COLLECTIVES}
        mesh = ",".join(f"{a}={getattr(sizes, a)}" for a in ("data", "fsdp", "tensor", "expert") if getattr(sizes, a) > 1)
        per_device = memory.output_size_in_bytes + memory.temp_size_in_bytes
        lines.append(f"| {n} | {mesh or '-'} | {memory.output_size_in_bytes / 2**20:,.1f} | "
                     f"{memory.temp_size_in_bytes / 2**20:,.1f} | {per_device / whole:.2f} | "
                     f"{', '.join(f'{c} {k}' for c, k in found.items() if k) or 'none'} |")
        print(lines[-1], flush=True)
    lines.append("")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_sharded_init.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
