"""The `dsv3` command. Parsing and dispatch only: the work lives in the package (jobs/ for what a
command runs, the library below it).

Bad input (config values, presets, paths, checkpoints) prints one line to stderr and exits 2.

A command imports the modules it runs when it runs (the imports marked `# on demand`): `dsv3
--help` and a bad flag answer without loading JAX, orbax or matplotlib (0.06 s against 1 s), and
`main` sets the platform, the host allocator and the CPU device count before JAX starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from dsv3_jax.config import ConfigError, apply_overrides, get_preset
from dsv3_jax.errors import UsageError
from dsv3_jax.host_platform import allow_slow_host_collectives, default_to_cpu_without_accelerator


def _fail(message: str) -> None:
    print(f"dsv3: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Exit at once: background threads (orbax, tensorstore) have nothing to finish after bad
    # input, and their shutdown noise would bury the one line that matters.
    os._exit(2)


def _human(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def cmd_info(args: argparse.Namespace) -> None:
    from dsv3_jax.info import model_info  # on demand

    if args.seq_len < 1:
        raise UsageError(f"--seq-len={args.seq_len} must be >= 1")
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


def _load_config(args: argparse.Namespace):
    """(the config the options describe, the run's saved config.json on --resume else None), read
    once; not validated: the job validates the config it runs (jobs/train.py checked_run_config)."""
    saved = None
    if getattr(args, "resume", False) and args.run_dir and (Path(args.run_dir) / "config.json").is_file():
        # --resume starts from the run's own config (a --preset / --config given must match it; the
        # mesh may change): jobs/train.py resume_start and resolve_run_config.
        from dsv3_jax.jobs.train import read_saved_config, resume_start  # on demand

        saved = read_saved_config(Path(args.run_dir))
        given = _preset_or_config(args) if args.preset or args.config else None
        config = resume_start(saved, given, new_mesh=bool(getattr(args, "mesh", None)))
    else:
        config = _preset_or_config(args)
    overrides = list(args.set or [])
    if getattr(args, "steps", None) is not None:
        overrides.append(f"train.steps={args.steps}")
    if getattr(args, "data", None):
        overrides.append(f"data.source={args.data}")
    if getattr(args, "seed", None) is not None:
        overrides.append(f"train.seed={args.seed}")
    if getattr(args, "fp8", False):
        overrides.append("model.fp8=true")
    if getattr(args, "mesh", None):
        from dsv3_jax.parallel.mesh import mesh_overrides  # on demand

        try:
            overrides.extend(mesh_overrides(args.mesh))
        except ValueError as e:
            raise UsageError(str(e)) from None
    return apply_overrides(config, overrides), saved


def _preset_or_config(args: argparse.Namespace):
    from dsv3_jax.config import config_from_json  # on demand

    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config file {args.config!r} does not exist")
        return config_from_json(path.read_text())
    return get_preset(args.preset or "tiny")


def cmd_train(args: argparse.Namespace) -> None:
    import time

    from dsv3_jax.jobs.train import train  # on demand

    config, saved = _load_config(args)
    if args.resume and not args.run_dir:
        raise UsageError("--resume needs --run-dir DIR (the run to continue)")
    name = args.preset or (Path(args.config).stem if args.config else "tiny")
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    from dsv3_jax.parallel.distributed import exit_together, is_main, peers_guarded  # on demand

    with peers_guarded(f"its checkpoints in {run_dir / 'checkpoints'} are kept: start every process again "
                       "with --resume"):
        status = train(config, run_dir, resume=args.resume, progress=not args.quiet, saved=saved)
    if status == 0 and is_main():
        print(f"done: metrics, plots and checkpoints in {run_dir}", file=sys.stderr)
    exit_together(status)  # several processes: all at once, here
    if status:
        raise SystemExit(status)


def _post_training(args: argparse.Namespace, command: str, start_option: str, new_config, run) -> None:
    """`dsv3 sft` / `dsv3 grpo`: a new run from `--from` (its config made by `new_config(overrides)`),
    or `--resume` of one (its saved config, checked like `dsv3 train --resume`); then `run` it."""
    import time

    start_value = getattr(args, start_option)
    saved = None
    if args.resume:
        if not args.run_dir:
            raise UsageError(f"--resume needs --run-dir DIR (the {command} run to continue)")
        if args.from_run or start_value:
            raise UsageError(f"--resume continues the {command} run with its saved config.json; drop --from / "
                             f"--{start_option}")
        args.preset = args.config = None
        config, saved = _load_config(args)
    else:
        if not args.from_run or not start_value:
            raise UsageError(f"dsv3 {command} needs --from RUN (the model to start from) and --{start_option}")
        overrides = list(args.set or []) + ([f"train.steps={args.steps}"] if args.steps is not None else []) \
            + ([f"train.seed={args.seed}"] if args.seed is not None else [])
        config = new_config(overrides)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    status = run(config, run_dir, resume=args.resume, progress=not args.quiet, saved=saved)  # validates
    if status:
        raise SystemExit(status)
    print(f"done: metrics, plots and checkpoints in {run_dir}", file=sys.stderr)


def cmd_sft(args: argparse.Namespace) -> None:
    """Supervised fine-tuning: a training run with train.objective=sft (post/sft.py)."""
    from dsv3_jax.post.sft import sft_config  # on demand
    from dsv3_jax.jobs.train import train  # on demand

    _post_training(args, "sft", "data", lambda overrides: sft_config(args.from_run, args.data, overrides), train)


def cmd_grpo(args: argparse.Namespace) -> None:
    """GRPO with a rule-based reward (jobs/grpo.py)."""
    from dsv3_jax.jobs.grpo import grpo, grpo_config  # on demand
    from dsv3_jax.post.tasks import TASKS  # on demand

    if args.task is not None and args.task not in TASKS:
        raise UsageError(f"unknown --task {args.task!r}; choose one of: {', '.join(TASKS)}")
    _post_training(args, "grpo", "task", lambda overrides: grpo_config(args.from_run, args.task, overrides), grpo)


def cmd_generate(args: argparse.Namespace) -> None:
    import time

    from dsv3_jax.checkpoint import load_trained  # on demand
    from dsv3_jax.data.tokenizer import EOS  # on demand
    from dsv3_jax.infer.generate import generate, generate_speculative  # on demand

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if args.temperature < 0:
        raise UsageError(f"--temperature={args.temperature} must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p={args.top_p} must be in (0, 1]")
    if args.speculative and args.temperature > 0:
        raise UsageError("--speculative mtp is greedy: use it with --temperature 0")
    if not args.prompt:
        raise UsageError("--prompt is empty; give the text to continue")
    if bool(args.run_dir) == bool(args.hf):
        raise UsageError("give exactly one of --run-dir DIR or --hf DIR")
    if args.hf:
        from dsv3_jax.data.tokenizer import load_tokenizer  # on demand
        from dsv3_jax.interop import hf  # on demand

        _, model = hf.load(Path(args.hf))
        tokenizer = load_tokenizer(Path(args.hf) / "tokenizer.json")
    else:
        _, model, tokenizer = load_trained(Path(args.run_dir))
    max_seq_len = model.cfg.max_seq_len
    prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
    if not prompt_ids:
        raise UsageError("--prompt is empty")
    if len(prompt_ids) + args.max_new_tokens > max_seq_len:
        raise UsageError(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens={args.max_new_tokens} exceeds "
                         f"model.max_seq_len={max_seq_len}")
    eos = tokenizer.token_to_id(EOS)
    start = time.perf_counter()
    extra = ""
    if args.speculative:
        new_ids, stats = generate_speculative(model, prompt_ids, args.max_new_tokens, eos, cache_dtype=args.cache_dtype)
        extra = (f", MTP drafts accepted {stats.accepted}/{stats.drafted} ({stats.acceptance_rate:.0%}), "
                 f"{stats.main_forward_passes} main-model passes")
    else:
        new_ids = generate(model, [prompt_ids], args.max_new_tokens, args.temperature, args.top_p, args.seed, eos,
                           cache_dtype=args.cache_dtype)[0]
    elapsed = time.perf_counter() - start
    print(args.prompt + tokenizer.decode(new_ids, skip_special_tokens=False))
    print(f"[{len(new_ids)} tokens in {elapsed:.2f}s: {len(new_ids) / elapsed:.1f} tokens/s{extra}]", file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> None:
    from dsv3_jax.jobs.bench import bench_decode  # on demand

    if args.what == "fp8":
        from dsv3_jax.jobs.bench import bench_fp8  # on demand

        backends = args.backends.split(",") if args.backends else (["xla"] if jax_device().startswith("cpu") else
                                                                   ["xla", "pallas"])
        ns = [int(n) for n in args.n.split(",")]
        rows = bench_fp8(args.m, args.k, ns, backends)
        title = f"dsv3 bench fp8 --m {args.m} --k {args.k} --n {args.n} ({jax_device()})"
        _print_table(title, rows, args.out)
        return
    from dsv3_jax.validate import validate  # on demand

    config = validate(_load_config(args)[0])
    if args.what == "train":
        from dsv3_jax.jobs.bench import bench_train  # on demand

        rows = bench_train(config, args.steps or 5)
        title = f"dsv3 bench train --preset {args.preset} ({jax_device()})"
        _print_table(title, rows, args.out)
        return
    if args.what == "decode":
        if args.batch < 1 or args.context < 1:
            raise UsageError("--batch and --context must be >= 1")
        rows = bench_decode(config, args.batch, args.context, args.decode_steps)
        title = (f"dsv3 bench decode --preset {args.preset} --batch {args.batch} --context {args.context} "
                 f"({jax_device()})")
    _print_table(title, rows, args.out)


def _print_table(title: str, rows: list[dict], out: str | None) -> None:
    from dsv3_jax.jobs.bench import markdown_table  # on demand

    table = markdown_table(rows)
    print(f"{title}\n\n{table}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(f"# {title}\n\n{table}\n")


def jax_device() -> str:
    import platform

    import jax

    device = jax.devices()[0]
    return f"{device.platform}: {getattr(device, 'device_kind', '')}, {platform.processor() or platform.machine()}, " \
           f"{__import__('os').cpu_count()} cores, jax {jax.__version__}"


def cmd_convert(args: argparse.Namespace) -> None:
    from dsv3_jax.checkpoint import load_trained, save_as_run  # on demand
    from dsv3_jax.interop import hf  # on demand
    from dsv3_jax.run_dir import require_new_directory  # on demand

    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise UsageError(f"source {str(src)!r} is not a directory (a dsv3 run or an HF checkpoint directory)")
    require_new_directory(dst)  # before the (slow) load
    if args.direction == "hf-to-orbax":
        model_config, model = hf.load(src)
        save_as_run(model, model_config, dst, src / "tokenizer.json")
    else:
        config, model, _ = load_trained(src, with_tokenizer=False)
        hf.save(model, config.model, dst, fp8=args.fp8)
        if (src / "tokenizer.json").is_file():
            import shutil
            shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    print(f"wrote {dst}")


def cmd_compile(args: argparse.Namespace) -> None:
    from dsv3_jax.jobs.compile import (REPORT_KERNEL_SHAPES, CompileFailure, as_json, compile_step,  # on demand
                                       kernel_lines, kernel_lowering, report_lines)
    from dsv3_jax.parallel.mesh import mesh_overrides  # on demand
    from dsv3_jax.targets import parse_target  # on demand

    target = parse_target(args.target)
    try:
        config = apply_overrides(get_preset(args.preset), (args.set or []) + mesh_overrides(args.mesh or ""))
    except ValueError as e:
        raise UsageError(str(e)) from None
    kernels = kernel_lowering(target, shapes=REPORT_KERNEL_SHAPES) if args.kernels else None
    try:
        report = compile_step(config, target, args.what, fp8=args.fp8, schedule=args.schedule, overlap=args.overlap)
    except CompileFailure as e:
        print(f"dsv3: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if args.json:
        print(json.dumps({**as_json(report), **({"pallas_kernels": kernels} if kernels is not None else {})}))
        return
    lines = report_lines(report)
    if kernels is not None:
        lines += ["", "Each Pallas kernel alone at the report's shapes (M 4096, K 7168, N 2048 / 18432; 8 experts):",
                  ""] + kernel_lines(kernels)
    print("\n".join(lines))


def cmd_plan(args: argparse.Namespace) -> None:
    import dataclasses

    from dsv3_jax.parallel.mesh import MESH_AXES, mesh_overrides  # on demand
    from dsv3_jax.jobs.plan import HARDWARE, RANK_COLUMNS, Layout, check_layout, plan, rank_rows, report_rows  # on demand

    if args.device not in HARDWARE:
        raise UsageError(f"--device {args.device!r} must be one of: {', '.join(HARDWARE)}")
    try:
        flags = ["model.fp8=true"] * args.fp8 + ["train.zero1=true"] * args.zero1
        config = apply_overrides(get_preset(args.preset), flags + (args.set or []) + mesh_overrides(args.mesh or ""))
    except ValueError as e:
        raise UsageError(str(e)) from None
    hardware = HARDWARE[args.device]
    changes = {"devices_per_host": args.devices_per_host} if args.devices_per_host else {}
    for item in args.hw or []:
        key, _, value = item.partition("=")
        fields = [f.name for f in dataclasses.fields(hardware) if f.name != "name"]
        if key not in fields:
            raise UsageError(f"--hw {item!r}: the key must be one of {', '.join(fields)}")
        try:
            changes[key] = type(getattr(hardware, key))(float(value))
        except ValueError:
            raise UsageError(f"--hw {item!r}: {value!r} is not a number") from None
    if any(v <= 0 for v in changes.values()):
        raise UsageError("--hw values and --devices-per-host must be > 0")
    sizes = config.mesh.sizes()
    if not 0 < args.matmul_efficiency <= 1:
        raise UsageError(f"--matmul-efficiency={args.matmul_efficiency} must be in (0, 1]")
    layout = Layout(config, sizes, dataclasses.replace(hardware, **changes),
                    matmul_efficiency=args.matmul_efficiency, fused_attention=args.fused_attention,
                    padded_dispatch=not args.dropless_dispatch)
    check_layout(layout)
    planned = plan(layout)
    rows = report_rows(layout, planned)
    if args.compile:  # the compiler's figures for the same step on a real target, beside the estimate
        from dsv3_jax.jobs.compile import CompileFailure, compile_step, planned_vs_compiled  # on demand
        from dsv3_jax.targets import parse_target  # on demand

        try:
            report = compile_step(config, parse_target(args.compile), "pipeline" if config.mesh.pipeline > 1 else "train",
                                  fp8=args.fp8)
        except CompileFailure as e:
            raise UsageError(f"--compile {args.compile}: {e}") from None
        rows += planned_vs_compiled(planned, report, config)
    per_rank = rank_rows(planned)
    if args.json:
        ranks = {"per pipeline rank": [dict(zip(RANK_COLUMNS, row)) for row in per_rank]} if per_rank else {}
        print(json.dumps({**dict(rows), **ranks}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dsv3 plan --preset {args.preset} (per device unless stated)")
    table.add_column("quantity")
    table.add_column("estimate", justify="right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    if per_rank:
        by_rank = Table(title="per pipeline rank: what its own stages need")
        for i, column in enumerate(RANK_COLUMNS):
            by_rank.add_column(column, justify="left" if i < 3 else "right")
        for row in per_rank:
            by_rank.add_row(*row)
        Console().print(by_rank)


def cmd_check_router(args: argparse.Namespace) -> None:
    """The router contract (model/router_contract.py) on a registered or `module:name` router; exit 1
    when a check fails."""
    from dsv3_jax.model.router_contract import check_router, contract_config  # on demand
    from dsv3_jax.model.routing import check_routing  # on demand

    model = contract_config(get_preset(args.preset).model, args.router)
    model = apply_overrides(dataclasses.replace(get_preset(args.preset), model=model), args.set or []).model
    check_routing(model)  # unknown router / hyperparameter: one line, exit 2
    checks = check_router(model)
    for c in checks:
        print(f"{'PASS' if c.passed else 'FAIL'}  {c.name}: {c.detail}")
    failed = [c.name for c in checks if not c.passed]
    if failed:
        print(f"{args.router}: {len(failed)} of {len(checks)} checks failed", file=sys.stderr)
        sys.exit(1)


def cmd_report(args: argparse.Namespace) -> None:
    from dsv3_jax.report import write_comparison_files, write_report  # on demand

    runs = [*(args.runs or []), *([args.run_dir] if args.run_dir else [])]
    if not runs:
        raise UsageError("dsv3 report needs a run directory (or several, to draw them on one set of axes)")
    for run in runs:
        if not Path(run).is_dir():
            raise UsageError(f"run directory {run!r} is not a directory")
    if len(runs) == 1:
        for path in write_report(Path(runs[0])):
            print(path)
        return
    parent = Path(os.path.commonpath([Path(r).absolute() for r in runs]))
    groups = {str(Path(r).absolute().relative_to(parent)) if Path(r).absolute() != parent else r: [Path(r)]
              for r in runs}
    if len(groups) < len(runs):
        raise UsageError("a run directory is given twice")
    table, png, md = write_comparison_files(groups, Path(args.out) if args.out else parent, "dsv3 report")
    print("\n".join(table))
    print(png)
    print(md)


class _VariantGroups(argparse.Action):
    """`dsv3 compare`: --variant NAME opens a variant; a --set belongs to the latest one (before the
    first --variant: to every variant)."""

    def __call__(self, parser, namespace, value, option_string=None):
        groups = list(getattr(namespace, "groups", None) or [("", [])])
        if option_string == "--variant":
            if any(name == value for name, _ in groups):
                parser.error(f"--variant {value!r} is given twice")
            groups.append((value, []))
        else:
            groups[-1] = (groups[-1][0], [*groups[-1][1], value])
        namespace.groups = groups


def cmd_compare(args: argparse.Namespace) -> None:
    from dsv3_jax.jobs.compare import SweepSpec, compare  # on demand

    groups = args.groups or [("", [])]
    (_, common), variants = groups[0], dict(groups[1:])
    spec = None
    if variants or not args.resume:
        spec = SweepSpec(variants=variants, common=common, preset=args.preset or "tiny", config=args.config or "",
                         seeds=args.seeds, steps=args.steps, data=args.data or "")
    status = compare(spec, Path(args.sweep_dir), resume=args.resume, parallel=args.parallel,
                     steps=args.steps if args.resume else None, say=lambda text: print(text, flush=True))
    if status:
        raise SystemExit(status)


def _post_training_parser(sub, command: str, help: str, from_help: str, default_steps: int, seed_help: str):
    """The options `dsv3 sft` and `dsv3 grpo` share (see `_post_training`)."""
    parser = sub.add_parser(command, help=help)
    parser.add_argument("--from", dest="from_run", help=from_help)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. train.lr=1e-4")
    parser.add_argument("--steps", type=int, help=f"total steps (default {default_steps}); on --resume, the new total")
    parser.add_argument("--seed", type=int, help=seed_help)
    parser.add_argument("--run-dir", help=f"the new {command} run (default: runs/{command}-<time>)")
    parser.add_argument("--resume", action="store_true", help=f"continue the {command} run in --run-dir")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def build_parser() -> argparse.ArgumentParser:
    from dsv3_jax.config import PRESETS  # on demand

    presets = ", ".join(PRESETS)
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in JAX/Flax NNX.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter counts, activated params, MTP, KV bytes/token, FLOPs/token")
    info.add_argument("--preset", default="tiny", help=f"one of: {presets} (default tiny)")
    info.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. model.n_layers=2")
    info.add_argument("--seq-len", type=int, default=4096, help="context length for the attention FLOPs")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)

    train = sub.add_parser("train", help="train a model; leaves a run directory")
    train.add_argument("--preset", help=f"one of: {presets} (default tiny)")
    train.add_argument("--config", help="a config.json (e.g. a run's) instead of a preset")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. train.lr=1e-3")
    train.add_argument("--steps", type=int, help="total training steps (train.steps); on --resume, the new total")
    train.add_argument("--data", help="stdlib (default), synthetic, or a path / glob of text or jsonl files")
    train.add_argument("--run-dir", help="default: runs/<preset>-<time>")
    train.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    train.add_argument("--seed", type=int, help="initialisation seed (train.seed)")
    train.add_argument("--quiet", action="store_true", help="no progress output")
    train.add_argument("--fp8", action="store_true", help="block-scaled FP8 GEMMs (model.fp8=true; report §3.3)")
    train.add_argument("--mesh", help="e.g. data=2,tensor=2,expert=2 (axes: data, fsdp, tensor, expert, pipeline)")
    train.add_argument("--host-devices", type=int, help="split the CPU into N devices (to try meshes on one machine)")
    train.add_argument("--coordinator", help="multi-process run: HOST:PORT of process 0 (every process gives the "
                       "same), or 'env' to read a launcher's environment (SLURM, Cloud TPU)")
    train.add_argument("--num-processes", type=int, help="multi-process run: how many processes (one per host)")
    train.add_argument("--process-id", type=int, help="multi-process run: this process's index, 0..N-1")
    train.add_argument("--distributed-timeout", type=int, default=300,
                       help="seconds to wait for the other processes to join (default 300)")
    train.set_defaults(func=cmd_train)

    sft = _post_training_parser(sub, "sft", "supervised fine-tuning of a trained run on (prompt, response) "
                                "examples", "the run to fine-tune (its latest checkpoint, model, tokenizer)", 200,
                                "seed of the batch order's shuffle and of new weights (train.seed)")
    sft.add_argument("--data", help="a .jsonl file: {\"prompt\", \"response\"} or {\"messages\": [...]} per line")
    sft.set_defaults(func=cmd_sft)

    grpo = _post_training_parser(sub, "grpo", "reinforcement learning with GRPO and a rule-based reward (report §5.2)",
                                 "the run to start from (usually an SFT run)", 50,
                                 "seed of the problems and the sampling (train.seed)")
    grpo.add_argument("--task", help="a registered task: arithmetic, countdown, python_linear")
    grpo.set_defaults(func=cmd_grpo)

    gen = sub.add_parser("generate", help="sample text from a trained run")
    gen.add_argument("--run-dir", help="a dsv3 run directory")
    gen.add_argument("--hf", help="an HF / DeepSeek checkpoint directory (with tokenizer.json)")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                     "with this much probability (1 = all)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--speculative", choices=["mtp"], help="MTP drafts one token ahead; output equals greedy")
    gen.add_argument("--cache-dtype", choices=["float32", "bfloat16"], default=None,
                     help="latent KV cache dtype (default: the model's compute dtype; bfloat16 halves the cache)")
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="throughput tables")
    bench.add_argument("what", choices=["train", "decode", "fp8"], help="train step, cached decode, or FP8 GEMMs")
    bench.add_argument("--steps", type=int, help="train: timed steps (default 5)")
    bench.add_argument("--preset", default="small", help=f"one of: {presets} (default small)")
    bench.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. model.n_layers=2")
    bench.add_argument("--batch", type=int, default=1, help="decode: sequences decoded together")
    bench.add_argument("--context", type=int, default=2048, help="decode: tokens already in the cache")
    bench.add_argument("--decode-steps", type=int, default=8, help="decode: timed steps")
    bench.add_argument("--m", type=int, default=4096, help="fp8: rows (tokens)")
    bench.add_argument("--k", type=int, default=7168, help="fp8: reduction dim (V3 hidden size)")
    bench.add_argument("--n", default="2048,4096,18432", help="fp8: comma-separated output dims")
    bench.add_argument("--backends", help="fp8: xla,pallas (default: xla on CPU, both on GPU)")
    bench.add_argument("--out", help="also write the table to this markdown file")
    bench.set_defaults(func=cmd_bench)

    convert = sub.add_parser("convert", help="HF / DeepSeek safetensors <-> dsv3 run directory (orbax)")
    convert.add_argument("direction", choices=["hf-to-orbax", "orbax-to-hf"], help="which way to convert")
    convert.add_argument("src", help="hf-to-orbax: an HF / DeepSeek checkpoint directory; orbax-to-hf: a run directory")
    convert.add_argument("dst", help="a new (or empty) directory to write")
    convert.add_argument("--fp8", action="store_true", help="orbax-to-hf: write e4m3 weights + weight_scale_inv")
    convert.set_defaults(func=cmd_convert)

    plan = sub.add_parser("plan", help="per-device memory, collectives and step time of a layout, before running it")
    plan.add_argument("--preset", default="tiny", help=f"one of: {presets} (default tiny)")
    plan.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. train.seq_len=4096")
    plan.add_argument("--mesh", help="e.g. data=8,expert=64,pipeline=16 (any size: nothing runs)")
    plan.add_argument("--device", default="h800", help="h800, h100 or tpu-v5p: the hardware table's peaks")
    plan.add_argument("--devices-per-host", type=int, help="override the device's usual count per host")
    plan.add_argument("--hw", action="append", metavar="KEY=VALUE",
                      help="override a hardware figure, e.g. network_bytes_per_s=25e9")
    plan.add_argument("--zero1", action="store_true",
                      help="train.zero1=true: the optimizer state split over each parameter's copies (ZeRO-1)")
    plan.add_argument("--fp8", action="store_true", help="FP8 GEMMs and dispatch (report §3.3)")
    plan.add_argument("--fused-attention", action="store_true",
                      help="count attention as a fused kernel's (no [T, T] scores kept), as on GPU")
    plan.add_argument("--dropless-dispatch", action="store_true",
                      help="count the experts' K real rows per token, not this package's padded all-to-all buffers")
    plan.add_argument("--matmul-efficiency", type=float, default=0.5, help="achieved / peak GEMM FLOP/s (0.5)")
    plan.add_argument("--compile", metavar="TARGET", help="also compile the step for TARGET (as dsv3 compile "
                      "--target) and print the compiler's bytes per device beside the estimate")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(func=cmd_plan)

    comp = sub.add_parser("compile", help="compile the real step for a TPU / GPU target from any host: bytes per "
                          "device, collectives, kernels")
    comp.add_argument("--target", required=True, help="tpu-v5p:2x2x1, tpu-v4:2x2x1, tpu-v5e:2x2, tpu-v6e:2x2, h100x8, "
                      "h100x16/2 (16 GPUs on 2 hosts), h800x8, h200x8, a100x8, b200x8")
    comp.add_argument("--preset", default="tiny", help=f"one of: {presets} (default tiny)")
    comp.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. train.batch_size=32")
    comp.add_argument("--mesh", help="e.g. data=2,expert=4 (at most the target's devices)")
    comp.add_argument("--what", default="train", help="train (default), pipeline (mesh.pipeline > 1) or decode")
    comp.add_argument("--schedule", help="--what pipeline: gpipe, 1f1b, zb1p, dualpipe or dualpipev "
                      "(default: the config's train.pipeline_schedule)")
    comp.add_argument("--fp8", action="store_true", help="FP8 GEMMs through the Pallas kernels (report §3.3)")
    comp.add_argument("--kernels", action="store_true", help="also compile each Pallas kernel alone for the target at the report's shapes, with its on-chip blocks and bytes")
    comp.add_argument("--overlap", action="store_true", help="per asynchronous collective: the compute the schedule "
                      "places between its start and done, and the bytes that can hide behind it (an estimate)")
    comp.add_argument("--json", action="store_true", help="print one JSON object")
    comp.set_defaults(func=cmd_compile)

    check = sub.add_parser("check-router", help="the contract a router must keep (the suite's router tests) on "
                                                 "a registered or module:name router")
    check.add_argument("router", help="a registered name or module:name (imported, which registers it)")
    check.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model config the checks start from")
    check.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="config override, e.g. model.router_args.temperature=0.5")
    check.add_argument("--host-devices", type=int, default=4, help="CPU devices for the sharded check (4)")
    check.set_defaults(func=cmd_check_router)

    cmp = sub.add_parser("compare", help="train variants x seeds on the same data; one table and one plot",
                         description="dsv3 compare --sweep-dir D [--preset P] [--set K=V ...] [--seeds N] "
                         "--variant A [--set K=V ...] --variant B [--set K=V ...]: a --set before the first "
                         "--variant is every variant's.")
    cmp.add_argument("--sweep-dir", required=True, help="the sweep's directory (new, or with --resume its own)")
    cmp.add_argument("--variant", action=_VariantGroups, metavar="NAME", help="a variant; the --set after it are its")
    cmp.add_argument("--set", action=_VariantGroups, metavar="KEY=VALUE", help="config override (see --variant)")
    cmp.add_argument("--preset", help=f"one of: {presets} (default tiny)")
    cmp.add_argument("--config", help="a config.json instead of a preset")
    cmp.add_argument("--steps", type=int, help="train.steps of every run; on --resume, the new total")
    cmp.add_argument("--data", help="data.source of every run (default stdlib)")
    cmp.add_argument("--seeds", type=int, default=1, help="runs per variant, train.seed + 0, 1, ... (default 1)")
    cmp.add_argument("--parallel", type=int, help="runs at a time (default: one per 2 CPU cores)")
    cmp.add_argument("--resume", action="store_true", help="continue the sweep in --sweep-dir (finished runs kept)")
    cmp.set_defaults(func=cmd_compare, groups=None)

    report = sub.add_parser("report", help="PNG plots from a run's metrics; several runs: one set of axes and a table")
    report.add_argument("runs", nargs="*", help="run directories (several: drawn together)")
    report.add_argument("--run-dir", help="a run directory; plots are (re)written into it")
    report.add_argument("--out", help="several runs: where comparison.png / .md go (default: their common parent)")
    report.set_defaults(func=cmd_report)
    return parser


def runs_train_steps(args: argparse.Namespace) -> bool:
    """Commands that run train steps keep XLA:CPU's scratch memory between steps
    (dsv3_jax/host_memory.py); the others keep glibc's defaults (its per-thread malloc arenas
    decode `tiny` ~10% faster)."""
    return args.func in (cmd_train, cmd_sft, cmd_grpo) or (args.func is cmd_bench and args.what == "train")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.func is cmd_compile or getattr(args, "compile", None):
        # Compiling for a target needs no local accelerator: keep JAX on the host CPU (an installed
        # CUDA / TPU plugin would otherwise try, and fail, to open devices this host does not have).
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    default_to_cpu_without_accelerator()
    allow_slow_host_collectives()
    if runs_train_steps(args):
        from dsv3_jax.host_memory import keep_step_memory  # on demand

        keep_step_memory()  # before JAX starts its threads
    if getattr(args, "host_devices", None) is not None:
        if args.host_devices < 1:
            _fail(f"--host-devices={args.host_devices} must be >= 1")
        import jax

        jax.config.update("jax_num_cpu_devices", args.host_devices)  # before any device is touched
    if getattr(args, "coordinator", None) is not None or getattr(args, "num_processes", None) is not None:
        from dsv3_jax.parallel.distributed import initialize  # on demand

        try:
            env = args.coordinator == "env"
            initialize(None if env else args.coordinator, args.num_processes, args.process_id,
                       args.distributed_timeout, from_environment=env)
        except UsageError as e:
            _fail(str(e))
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's info/warning chatter is not for users
    try:
        args.func(args)
    except (ConfigError, UsageError) as e:
        _fail(str(e))


if __name__ == "__main__":
    main()
