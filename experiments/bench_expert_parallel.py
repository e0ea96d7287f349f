"""Expert parallelism at fixed tokens per rank, ep = 1, 2, 4, 8 host devices (report §3.2.2).

Command:   uv run python experiments/bench_expert_parallel.py [--tokens-per-rank 512] [--repeats 5]
               [--router-jsonl runs/tiny-.../router.jsonl]
Runtime:   about 2 minutes on a 2-core CPU.
Shows:     per rank, for the explicit all-to-all dispatch (`a2a`, the default) and for leaving the
           dispatch to XLA's partitioner (`gspmd`, the old default): compiled temp bytes
           (`compiled.memory_analysis()`), bytes one all-to-all moves, whether a routed-expert
           weight is all-gathered, the rows the rank's grouped GEMM is sized for, and the time of
           one MoE forward + backward (router, dispatch, experts, combine). The MoE is the `tiny`
           preset's (8 experts, top-2 of 4 groups limited to 2, D 128, F 64).
           Then redundant experts (report §3.4): max / mean rank load before and after
           `plan_placement`, for the loads of a real run (`--router-jsonl`: each MoE layer's loads
           over its first 10 steps, before the bias has balanced them, and its last 50) and for Zipf loads at the report's prefill layout (256
           experts + 32 redundant on 32 ranks). Writes experiments/results/bench_expert_parallel.md.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dsv3_jax.jobs.bench import markdown_table  # noqa: E402
from dsv3_jax.config import MeshConfig, get_preset  # noqa: E402
from dsv3_jax.model.moe import MoE  # noqa: E402
from dsv3_jax.parallel.expert import pair_capacity, ranks_per_token  # noqa: E402
from dsv3_jax.parallel.mesh import make_mesh  # noqa: E402
from dsv3_jax.parallel.placement import identity_placement, imbalance, plan_placement  # noqa: E402
from dsv3_jax.parallel.sharding import DEFAULT_RULES  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "f16": 2, "pred": 1}


def _shape_bytes(text: str) -> int:
    dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", text).groups()
    return BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))


def collectives(hlo: str, cfg) -> tuple[int, bool]:
    """(largest bytes one all-to-all moves per rank, whether an expert weight is all-gathered)."""
    a2a = [sum(map(_shape_bytes, re.findall(r"\w+\[[\d,]*\]", line.split(" all-to-all(")[0].split("=", 1)[1])))
           for line in hlo.splitlines() if " all-to-all(" in line]
    E, D, F = cfg.n_routed_experts, cfg.d_model, cfg.moe_ffn_dim
    weight = re.compile(rf"\w+\[(\d+,)?{E},({D},{F}|{F},{D})\]")
    gathered = any("all-gather(" in line and weight.search(line.split("all-gather(")[0]) for line in hlo.splitlines())
    return max(a2a, default=0), gathered


def run(ep: int, dispatch: str, n_per_rank: int, repeats: int) -> dict:
    cfg = dataclasses.replace(get_preset("tiny").model, expert_dispatch=dispatch)
    moe = MoE(cfg, nnx.Rngs(0))
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
    T = 128
    x_BTD = jax.random.normal(jax.random.key(1), (ep * n_per_rank // T, T, cfg.d_model))

    def loss(params, x):
        y, stats = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y * y), stats.capacity_dropped

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    mesh = make_mesh(MeshConfig(expert=ep))
    with jax.set_mesh(mesh):
        params = jax.device_put(params, DEFAULT_RULES.tree(params, mesh))
        x_BTD = jax.device_put(x_BTD, DEFAULT_RULES.sharding(("batch", None, None), mesh))
        compiled = fn.lower(params, x_BTD).compile()
        (_, dropped), _ = out = fn(params, x_BTD)
        jax.block_until_ready(out)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, x_BTD))
            times.append(time.perf_counter() - t0)
    a2a_bytes, gathered = collectives(compiled.as_text(), cfg)
    K = cfg.top_k
    if dispatch == "a2a" and ep > 1:
        C = pair_capacity(n_per_rank, ranks_per_token(K, ep, cfg.n_group, cfg.topk_group), ep,
                          cfg.expert_capacity_factor)
        rows = ep * C * min(K, cfg.n_routed_experts // ep)
    else:
        rows = ep * n_per_rank * K  # every assignment of the global batch
    return {"ep": ep, "dispatch": dispatch if ep > 1 else "local", "tokens/rank": n_per_rank,
            "temp MiB/rank": compiled.memory_analysis().temp_size_in_bytes / 2**20,
            "all-to-all KiB": a2a_bytes / 2**10, "expert weights gathered": "yes" if gathered else "no",
            "GEMM rows/rank": rows, "dropped": float(dropped), "ms": 1e3 * float(np.median(times))}


def placement_rows(name: str, load_E, n_ranks: int, n_redundant: int) -> dict:
    placed = plan_placement(load_E, n_ranks, n_redundant)
    return {"loads": name, "experts": len(load_E), "ranks": n_ranks, "redundant": n_redundant,
            "max/mean before": imbalance(identity_placement(len(load_E)), load_E, n_ranks),
            "max/mean after": imbalance(placed, load_E, n_ranks), "most copies": int(placed.replicas.max())}


def redundancy_table(router_jsonl: str | None) -> str:
    rows = []
    if router_jsonl:
        records = [json.loads(line) for line in Path(router_jsonl).read_text().splitlines() if line.strip()]
        for window, part in (("steps 1-10", records[:10]), ("last 50 steps", records[-50:])):
            load_LE = np.mean([r["expert_load"] for r in part], axis=0)
            for layer, load_E in enumerate(load_LE):
                rows.append(placement_rows(f"run {window}, MoE layer {layer}", load_E, 4, 4))
    zipf = np.random.default_rng(0).permutation(1.0 / np.arange(1, 257) ** 1.2)
    rows.append(placement_rows("Zipf s=1.2", zipf, 32, 32))
    rows.append(placement_rows("Zipf s=1.2", zipf, 64, 64))
    return markdown_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens-per-rank", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--router-jsonl", default=None, help="a run's router.jsonl (per-step expert loads)")
    args = parser.parse_args()
    rows = [run(1, "a2a", args.tokens_per_rank, args.repeats)]
    for dispatch in ("a2a", "gspmd"):
        rows += [run(ep, dispatch, args.tokens_per_rank, args.repeats) for ep in (2, 4, 8)]
    table = markdown_table(rows)
    print(table)
    a2a = {r["ep"]: r["temp MiB/rank"] for r in rows if r["dispatch"] == "a2a"}
    lines = ["# Expert parallelism at fixed tokens per rank (host devices)", "",
             f"`uv run python experiments/bench_expert_parallel.py` on {jax.devices()[0].device_kind}, "
             f"jax {jax.__version__}; {args.tokens_per_rank} tokens per rank, the `tiny` preset's MoE "
             "(8 experts, top-2, D 128, F 64), forward + backward.", "", table, "",
             f"a2a temp memory ep 8 / ep 2: {a2a[8] / a2a[2]:.2f}x. `GEMM rows/rank`: the rows the rank's "
             "grouped GEMM is written for (a2a: P x C x J receive slots; local and gspmd: every assignment of "
             "the global batch, which the partitioner keeps whole on each rank since it gathers the expert "
             "weights). Host devices share one CPU, so times show overheads, not speed-ups.", "",
             "## Redundant experts", "",
             "max / mean rank load with each expert on one rank (before) and after `plan_placement` gives "
             "the hottest experts copies and packs them (each copy takes an equal share of its expert's "
             f"tokens). Run loads: {args.router_jsonl or 'none given'}.", "", redundancy_table(args.router_jsonl), ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_expert_parallel.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
