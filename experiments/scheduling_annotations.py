"""Can XLA's scheduling annotations pin an all-to-all's window to chosen GEMMs? (issue 36's next step)

Command:   uv run --extra tpu --extra cuda12 python experiments/scheduling_annotations.py
Runtime:   about 2 minutes on a 2-core CPU (each compile in its own process: a compiler that crashes
           costs its row).
Shows:     A toy on 8 devices of an 8 x H100 host and of a v5p slice: one chain dispatches tokens by
           all-to-all, another, independent, runs 4 GEMMs. Annotated, the all-to-all and the 4 GEMMs
           carry one `_scheduling_group_id` (set with `jax.experimental.xla_metadata.set_xla_metadata`),
           which asks XLA's latency-hiding scheduler to put the GEMMs between the all-to-all's start and
           done: what DualPipe's F&B pair needs (one chunk's dispatch beside the other chunk's MLP,
           report §3.2.1, Figure 4). Per row: whether it compiles, the asynchronous all-to-alls and the
           GEMM FLOPs inside their windows, the all-to-alls left synchronous.
           Writes experiments/results/scheduling_annotations.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only targets

from variants import RESULTS

ROWS = {  # name -> (target, annotated, environment)
    "h100x8, plain": ("h100x8", False, {}),
    "h100x8, annotated": ("h100x8", True, {}),
    "tpu-v5p:2x2x2, plain": ("tpu-v5p:2x2x2", False, {}),
    "tpu-v5p:2x2x2, annotated": ("tpu-v5p:2x2x2", True, {}),
    "tpu-v5p:2x2x2, annotated, annotations propagated": (
        "tpu-v5p:2x2x2", True, {"LIBTPU_INIT_ARGS": "--xla_tpu_enable_scheduling_annotation_propagation=true"}),
}
D, ROWS_PER_DEVICE = 1024, 512


def compile_toy(target_name: str, annotated: bool) -> dict:
    import re

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental.xla_metadata import set_xla_metadata
    from jax.sharding import NamedSharding, PartitionSpec

    from dsv3_jax import hlo_stats
    from dsv3_jax.platform import compiler_options
    from dsv3_jax.targets import parse_target

    target = parse_target(target_name)
    mesh = jax.sharding.Mesh(np.array(target.devices()[:8]), ("expert",))

    def body(tokens, other, w):
        group = set_xla_metadata(_scheduling_group_id="1") if annotated else set_xla_metadata()
        with group:  # the dispatch and the independent chain's GEMMs, one group
            dispatched = jax.lax.all_to_all(tokens, "expert", 0, 0, tiled=True)
            for _ in range(4):
                other = jnp.tanh(other @ w)
        return jax.lax.all_to_all(jnp.tanh(dispatched @ w), "expert", 0, 0, tiled=True), other

    rows = PartitionSpec("expert")
    step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(rows, rows, PartitionSpec()), out_specs=(rows, rows)))
    spec = lambda shape, p: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, p))
    args = (spec((8 * ROWS_PER_DEVICE, D), rows), spec((8 * ROWS_PER_DEVICE, D), rows), spec((D, D), PartitionSpec()))
    text = step.lower(*args).compile(compiler_options=compiler_options(target.platform)).as_text()
    windows = [w for w in hlo_stats.async_windows(text) if w["kind"] == "all-to-all"]
    return {"async": len(windows), "gflop_inside": [round(w["flops_between"] / 1e9, 2) for w in windows],
            "sync": len(re.findall(r"= \S+ all-to-all\(", text))}


def _worker(name: str) -> dict:
    target_name, annotated, flags = ROWS[name]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    for key, value in flags.items():
        env[key] = f"{env.get(key, '')} {value}".strip()
    proc = subprocess.run([sys.executable, __file__, "--row", name], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        errors = [line.split("Error: ", 1)[-1] for line in proc.stderr.splitlines() if "Error: " in line]
        return {"error": f"exit {proc.returncode}" + (f": {errors[-1][:300]}" if errors else " (no message)")}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--row"]:
        target_name, annotated, _ = ROWS[sys.argv[2]]
        print(json.dumps(compile_toy(target_name, annotated)))
        return
    from importlib.metadata import version

    lines = ["# XLA scheduling annotations on a toy pair", "",
             f"Compiled {time.strftime('%Y-%m-%d')} from a CPU host: jax {version('jax')}, libtpu {version('libtpu')}, "
             f"jax-cuda12-plugin {version('jax-cuda12-plugin')}.", "", " ".join(__doc__.split("Shows:")[1].split("Writes")[0].split()), "",
             "| row | asynchronous all-to-alls | GEMM GFLOP inside each | synchronous all-to-alls |", "|---|---|---|---|"]
    for name in ROWS:
        r = _worker(name)
        print(name, r, flush=True)
        lines.append(f"| {name} | " + (f"does not compile: {r['error']} | | |" if "error" in r
                                       else f"{r['async']} | {r['gflop_inside']} | {r['sync']} |"))
    (RESULTS / "scheduling_annotations.md").write_text("\n".join(lines) + "\n")
    print("wrote", RESULTS / "scheduling_annotations.md")


if __name__ == "__main__":
    main()
