"""Every matrix product of a compiled train step, timed alone: which ones XLA runs slowly.

Compiles a preset's train step (MTP off), reads each `dot` of the optimised HLO (top level, inside
fusions and loop bodies) with its operand shapes and dimension numbers, times that product alone on
the same backend (median of repeats, operands filled with ones), and prints them by total time
(isolated time x how often the HLO holds it). On XLA:CPU a product XLA hands to YNNPACK (a
`ynn_fusion`) is fast; one left to Eigen with an operand contracted along its leading dimension can
be 5-10x slower for the same FLOPs. This table found the output head's Wgrad taking 20 ms of
`tiny`'s 134 ms step (experiments/results/bench_vs_hf.md, session 10).

Command:   uv run python experiments/profile_dots.py [--preset tiny] [--batch 8] [--seq-len 256] [--top 25]
Runtime:   about a minute for `tiny` on a 2-core CPU.
Prints:    the table (markdown); --out also writes it to a file.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.jobs.bench import markdown_table
from dsv3_jax.config import get_preset
from dsv3_jax.host_memory import keep_step_memory
from dsv3_jax.train.state import create_train_state
from dsv3_jax.train.step import make_train_step

_DOT = re.compile(r"(?m)^\s*(?:ROOT )?%([\w.\-]+) = (\w+\[[\d,]*\])\S* dot\(%([\w.\-]+), %([\w.\-]+)\), (.*)$")
_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16, "s32": jnp.int32,
           "f8e4m3fn": jnp.float8_e4m3fn, "f8e5m2": jnp.float8_e5m2}
_SHAPE = re.compile(r"(?m)^\s*(?:ROOT )?%([\w.\-]+) = (\w+\[[\d,]*\])")


def _dims(spec: str, key: str) -> tuple[int, ...]:
    found = re.search(key + r"=\{([\d,]*)\}", spec)
    return tuple(int(d) for d in found.group(1).split(",") if d) if found else ()


def _shape(text: str) -> tuple[str, tuple[int, ...]]:
    dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", text).groups()
    return dtype, tuple(int(d) for d in dims.split(",") if d)


def products(hlo: str) -> collections.Counter:
    """(lhs shape, rhs shape, lhs batch, rhs batch, lhs contracting, rhs contracting) -> count, and
    the op name of one occurrence (what the model code called it)."""
    shapes = dict(_SHAPE.findall(hlo))
    forms, names = collections.Counter(), {}
    for _, _, lhs, rhs, spec in _DOT.findall(hlo):
        if lhs not in shapes or rhs not in shapes:
            continue
        key = (shapes[lhs], shapes[rhs], _dims(spec, "lhs_batch_dims"), _dims(spec, "rhs_batch_dims"),
               _dims(spec, "lhs_contracting_dims"), _dims(spec, "rhs_contracting_dims"))
        forms[key] += 1
        op = re.search(r'op_name="([^"]*)"', spec)
        names[key] = op.group(1) if op else ""
    return forms, names


def time_product(key, repeats: int = 15) -> tuple[float, bool]:
    """Median seconds of the product alone, and whether XLA made it a YNNPACK fusion."""
    (lhs_t, lhs_s), (rhs_t, rhs_s) = _shape(key[0]), _shape(key[1])
    lhs, rhs = jnp.ones(lhs_s, _DTYPES[lhs_t]), jnp.ones(rhs_s, _DTYPES[rhs_t])
    dot = jax.jit(lambda a, b: jax.lax.dot_general(a, b, ((key[4], key[5]), (key[2], key[3])),
                                                   preferred_element_type=jnp.float32))
    compiled = dot.lower(lhs, rhs).compile()
    jax.block_until_ready(compiled(lhs, rhs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(lhs, rhs))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), "ynn_fusion" in compiled.as_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    keep_step_memory()
    base = get_preset(args.preset)
    config = dataclasses.replace(base, model=dataclasses.replace(base.model, mtp_depth=0),
                                 train=dataclasses.replace(base.train, batch_size=args.batch, seq_len=args.seq_len))
    graphdef, optimizer, state = create_train_state(config, 0)
    tokens = jnp.zeros((args.batch, args.seq_len + 1), jnp.int32)
    hlo = jax.jit(make_train_step(config, graphdef, optimizer)).lower(state, tokens).compile().as_text()
    forms, names = products(hlo)
    rows = []
    for key, count in forms.items():
        seconds, ynn = time_product(key)
        rhs_dims = _shape(key[1])[1]
        rhs_free = [size for d, size in enumerate(rhs_dims) if d not in key[3] + key[5]]
        flops = 2 * np.prod(_shape(key[0])[1]) * np.prod(rhs_free)  # every lhs element meets every free rhs column
        rows.append({"total_ms": 1e3 * seconds * count, "count": count, "ms_each": 1e3 * seconds,
                     "GFLOP/s": flops / seconds / 1e9, "ynn": ynn, "lhs": key[0], "rhs": key[1],
                     "contracting": f"{key[4]} x {key[5]}", "batch": f"{key[2]} x {key[3]}",
                     "op": "/".join(names[key].split("/")[-3:])})
    rows.sort(key=lambda row: -row["total_ms"])
    total = sum(row["total_ms"] for row in rows)
    table = markdown_table(rows[:args.top])
    text = (f"Products of `{args.preset}`'s train step (batch {args.batch} x {args.seq_len}, MTP off) timed alone "
            f"on {jax.devices()[0].platform}: {len(rows)} forms, {sum(forms.values())} products, {total:.1f} ms in all."
            "\n\n"
            f"{table}\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
