"""The `dsv3` command. Parsing and dispatch only: the work lives in the package.

Bad input (config values, presets, paths, checkpoints) prints one line to stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from dsv3_jax.config import ConfigError, apply_overrides, get_preset


class UsageError(Exception):
    """Bad user input other than a config value (paths, checkpoints, ...)."""


def _fail(message: str) -> None:
    print(f"dsv3: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _human(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def cmd_info(args: argparse.Namespace) -> None:
    from dsv3_jax.info import model_info

    config = apply_overrides(get_preset(args.preset), args.set or [])
    info = model_info(config.model, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(info))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dsv3 info --preset {args.preset}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, value in info.items():
        table.add_row(key, f"{value:,}" if key.endswith(("bytes_per_token", "seq_len")) else _human(value))
    Console().print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in JAX/Flax NNX.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter counts, activated params, MTP, KV bytes/token, FLOPs/token")
    info.add_argument("--preset", default="tiny")
    info.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. model.n_layers=2")
    info.add_argument("--seq-len", type=int, default=4096, help="context length for the attention FLOPs")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, UsageError) as e:
        _fail(str(e))


if __name__ == "__main__":
    main()
