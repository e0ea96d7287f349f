"""`dsv3 compare`: train N config variants x S seeds on the same data and tokenizer, then one table
and one plot.

A sweep directory holds sweep.json (what was asked: base preset or config, common overrides,
variants, seeds, steps), tokenizer.json (trained once, every run reads it), one ordinary run
directory per (variant, seed) at NAME/seed_S (each `dsv3 train`'s own: metrics, router.jsonl,
checkpoints, plots), logs/NAME.seed_S.log (each run's output), and, once every run is done,
compare.md / compare.json (report.py `comparison_table`, `run_summary`) and comparison.png.

Runs are `dsv3 train` subprocesses, up to `parallel` at a time. A stop (SIGTERM / SIGINT) reaches
every running child, which checkpoints and exits; `dsv3 compare --sweep-dir D --resume` continues
the unfinished runs from their checkpoints and skips the finished ones. Every run's config is
checked before anything is written, so a bad variant costs nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from dsv3_jax.config import Config, ConfigError, apply_overrides, config_from_json, get_preset
from dsv3_jax.data.corpus import load_documents
from dsv3_jax.data.pipeline import get_tokenizer
from dsv3_jax.errors import UsageError
from dsv3_jax.jobs.train import has_run
from dsv3_jax.report import run_summary, write_comparison_files
from dsv3_jax.run_dir import RunLock, StopSignals, read_jsonl, write_atomic
from dsv3_jax.validate import validate

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """What a sweep trains: every variant's overrides on top of the base config and `common`."""
    variants: dict[str, list[str]]  # name -> its --set overrides
    common: list[str] = dataclasses.field(default_factory=list)  # every variant's --set overrides
    preset: str = "tiny"
    config: str = ""  # a config.json's path instead of the preset
    seeds: int = 1  # runs per variant: train.seed = the base seed + 0, 1, ...
    steps: int | None = None  # train.steps (None: the base config's)
    data: str = ""  # data.source (empty: the base config's)

    def base(self) -> Config:
        if self.config:
            if not Path(self.config).is_file():
                raise UsageError(f"--config file {self.config!r} does not exist")
            return config_from_json(Path(self.config).read_text())
        return get_preset(self.preset)

    def common_overrides(self) -> list[str]:
        return [*self.common, *([f"train.steps={self.steps}"] if self.steps else []),
                *([f"data.source={self.data}"] if self.data else [])]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> SweepSpec:
        return cls(**json.loads(text))


@dataclasses.dataclass(frozen=True)
class SweepRun:
    variant: str
    seed: int
    run_dir: Path
    overrides: list[str]  # everything after the base config: common, variant, seed, tokenizer

    @property
    def label(self) -> str:
        return f"{self.variant}/seed_{self.seed}"


def plan(spec: SweepSpec, sweep_dir: Path) -> tuple[list[SweepRun], Config]:
    """The sweep's runs, each config checked (one line naming the variant if it is bad), and the
    common config they share. Variants may not change the data or the vocabulary: they are compared
    on the same tokens."""

    if not spec.variants:
        raise UsageError("dsv3 compare needs at least one --variant NAME [--set KEY=VALUE ...]")
    if spec.seeds < 1:
        raise UsageError(f"--seeds={spec.seeds} must be >= 1")
    for name in spec.variants:
        if not NAME_PATTERN.match(name) or name in ("logs",):
            raise UsageError(f"--variant {name!r}: a name of letters, digits and . _ + - (it names a directory)")
    base = spec.base()
    try:
        common = apply_overrides(base, spec.common_overrides())
    except ConfigError as e:
        raise UsageError(f"the sweep's common --set: {e}") from None
    tokenizer = common.data.tokenizer or str((sweep_dir / "tokenizer.json").absolute())
    runs = []
    for name, overrides in spec.variants.items():
        for i in range(spec.seeds):
            seed = common.train.seed + i
            everything = [*spec.common_overrides(), *overrides, f"train.seed={seed}", f"data.tokenizer={tokenizer}"]
            try:
                config = validate(apply_overrides(base, everything))
            except ConfigError as e:
                raise UsageError(f"--variant {name}: {e}") from None
            if config.data != dataclasses.replace(common.data, tokenizer=tokenizer) or \
                    config.model.vocab_size != common.model.vocab_size:
                raise UsageError(f"--variant {name} changes data.* or model.vocab_size: the variants of a "
                                 "comparison share the data and the tokenizer (put those in the common --set)")
            runs.append(SweepRun(name, seed, sweep_dir / name / f"seed_{seed}", everything))
    return runs, common


def is_finished(run: SweepRun, steps: int) -> bool:
    """Its last step is the sweep's last step, evaluated (the loop evaluates the last step)."""
    metrics = read_jsonl(run.run_dir / "metrics.jsonl")
    return bool(metrics) and metrics[-1]["step"] >= steps and "val_loss" in metrics[-1]


def _train_command(spec: SweepSpec, run: SweepRun, steps: int) -> list[str]:
    command = [sys.executable, "-m", "dsv3_jax.cli", "train", "--run-dir", str(run.run_dir), "--quiet",
               "--steps", str(steps)]
    if has_run(run.run_dir):
        return command + ["--resume"]  # from its checkpoint, with its saved config
    base = ["--config", spec.config] if spec.config else ["--preset", spec.preset]
    return command + base + [a for o in run.overrides for a in ("--set", o)]


def _write_tokenizer(common: Config, sweep_dir: Path) -> None:
    """The one BPE every run reads (unless the common config names a tokenizer.json)."""
    path = sweep_dir / "tokenizer.json"
    if common.data.tokenizer or path.exists():
        return

    write_atomic(path, get_tokenizer(common, load_documents(common.data.source, common.data.max_bytes), None).to_str())


def default_parallel(n_runs: int) -> int:
    """Runs at a time: one per 2 CPU cores (XLA:CPU uses every core it gets), at least one."""
    return max(1, min(n_runs, (os.cpu_count() or 1) // 2))


def compare(spec: SweepSpec | None, sweep_dir: Path, resume: bool = False, parallel: int | None = None,
            steps: int | None = None, say=print) -> int:
    """Train (or continue) a sweep; 0 when every run finished (table and plot written), 128+signal
    when stopped, 1 when a run failed (its log named)."""
    sweep_dir = Path(sweep_dir)
    spec_path = sweep_dir / "sweep.json"
    if resume:
        if not spec_path.is_file():
            raise UsageError(f"--resume: {str(sweep_dir)!r} has no sweep.json (not a dsv3 compare directory)")
        if spec is not None and spec.variants:
            raise UsageError("--resume continues the sweep in sweep.json: give no --variant (only --steps, --parallel)")
        spec = SweepSpec.from_json(spec_path.read_text())
        if steps is not None:
            spec = dataclasses.replace(spec, steps=steps)
    else:
        if sweep_dir.exists() and (not sweep_dir.is_dir() or any(sweep_dir.iterdir())):
            raise UsageError(f"--sweep-dir {str(sweep_dir)!r} exists and is not empty: continue it with --resume "
                             "or choose a new directory")
        if not sweep_dir.absolute().parent.is_dir():
            raise UsageError(f"the parent of --sweep-dir {str(sweep_dir)!r} does not exist; create it first")
    runs, common = plan(spec, sweep_dir)  # every config checked before anything is written
    total_steps = common.train.steps
    parallel = default_parallel(len(runs)) if parallel is None else parallel
    if parallel < 1:
        raise UsageError(f"--parallel={parallel} must be >= 1")

    sweep_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(sweep_dir):
        write_atomic(spec_path, spec.to_json())
        _write_tokenizer(common, sweep_dir)
        (sweep_dir / "logs").mkdir(exist_ok=True)
        pending = [r for r in runs if not is_finished(r, total_steps)]
        say(f"sweep {sweep_dir}: {len(runs)} runs ({len(spec.variants)} variants x {spec.seeds} seeds), "
            f"{len(runs) - len(pending)} finished, {min(parallel, max(1, len(pending)))} at a time")
        status = _run_all(spec, pending, total_steps, parallel, sweep_dir, say)
        if status:
            return status
        write_results(spec, runs, sweep_dir, say)
    return 0


def _run_all(spec: SweepSpec, pending: list[SweepRun], steps: int, parallel: int, sweep_dir: Path, say) -> int:
    running: dict[subprocess.Popen, tuple[SweepRun, object]] = {}
    failed: list[tuple[SweepRun, int, Path]] = []
    stopped_by = None
    with StopSignals() as stop:
        while running or (pending and not stop.received and not failed):
            while pending and len(running) < parallel and not stop.received and not failed:
                run = pending.pop(0)
                log_path = sweep_dir / "logs" / f"{run.variant}.seed_{run.seed}.log"
                log = open(log_path, "a")
                command = _train_command(spec, run, steps)
                say(f"  start  {run.label}" + (" (resumed)" if "--resume" in command else ""))
                running[subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)] = (run, log)
            if stop.received and stopped_by is None:
                stopped_by = stop.received[0]
                for child in running:  # each checkpoints after its current step and exits
                    child.send_signal(signal.SIGTERM)
            for child in [c for c in running if c.poll() is not None]:
                run, log = running.pop(child)
                log.close()
                if child.returncode == 0:
                    summary = read_jsonl(run.run_dir / "metrics.jsonl")[-1]
                    say(f"  done   {run.label}: val loss {summary.get('val_loss', float('nan')):.4f}")
                elif stopped_by is not None:  # checkpointed (128 + signal), or stopped before it trained
                    say(f"  stopped {run.label}")
                else:
                    failed.append((run, child.returncode, Path(log.name)))
                    say(f"  FAILED {run.label} (exit {child.returncode}): see {log.name}")
            time.sleep(0.2)
    if failed:
        run, code, log = failed[0]
        say(f"dsv3 compare: {len(failed)} run(s) failed, first {run.label} (exit {code}); its output: {log}")
        return 1
    if stopped_by is not None:
        say(f"stopped: continue with dsv3 compare --sweep-dir {sweep_dir} --resume")
        return 128 + stopped_by
    return 0


def write_results(spec: SweepSpec, runs: list[SweepRun], sweep_dir: Path, say=print) -> None:
    """compare.md (the table), compare.json (each run's summary) and comparison.png."""

    groups: dict[str, list[Path]] = {}
    for run in runs:
        groups.setdefault(run.variant, []).append(run.run_dir)
    base = f"--config {spec.config}" if spec.config else f"--preset {spec.preset}"
    preamble = [f"Base {base}, common overrides: {' '.join(spec.common_overrides()) or 'none'}; "
                f"{spec.seeds} seed(s) per variant (mean, with the range over seeds in brackets).", ""]
    preamble += [f"- **{name}**: {' '.join(overrides) or '(the base config)'}" for name, overrides in spec.variants.items()]
    table, png, md = write_comparison_files(groups, sweep_dir, f"dsv3 compare: {sweep_dir.name}", preamble, "compare.md")
    write_atomic(sweep_dir / "compare.json", json.dumps(
        {run.label: run_summary(run.run_dir) for run in runs}, indent=1))
    say("\n".join(table))
    say(f"table: {md}; plot: {png}")
