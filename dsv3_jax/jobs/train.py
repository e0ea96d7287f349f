"""The training loop: data, jitted steps, metrics, validation, checkpoints, signals, progress.

Run directory: config.json, tokenizer.json, metrics.jsonl (one line per step),
router.jsonl (per layer and step: expert loads, MaxVio, load entropy; at evaluations the fraction of
validation tokens whose experts changed, train/topk_drift.py), checkpoints/ (orbax; with
train.ema_decay > 0 also the parameters' EMA, kept in host memory, train/ema.py, and evaluated as
val_loss_ema), plots (*.png); see run_dir.py for the lock and the logs. Nothing is written to it
until every check has passed, and a checkpoint is written only for a state whose loss, gradient
norm and values are all finite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np

from dsv3_jax.checkpoint import Checkpointer, restore_target
from dsv3_jax.config import Config, MeshConfig, config_from_json
from dsv3_jax.data.pipeline import ShardedBatches, build_data, shards_for_rows, val_batches
from dsv3_jax.errors import UsageError
from dsv3_jax.parallel.distributed import any_process, barrier, is_main
from dsv3_jax.parallel.mesh import make_mesh
from dsv3_jax.parallel.sharding import rules_for, use_rules
from dsv3_jax.platform import compiler_options, platform_of
from dsv3_jax.post.sft import build_sft_data, init_from_run
from dsv3_jax.report import write_report
from dsv3_jax.run_dir import RunLock, StopSignals, record_layout_change, truncate_jsonl, write_atomic
from dsv3_jax.train.ema import HostEMA
from dsv3_jax.train.state import abstract_train_state, create_train_state
from dsv3_jax.train.step import make_eval_step, make_train_step, max_violation
from dsv3_jax.train.topk_drift import TopKDrift
from dsv3_jax.validate import validate

# TrainConfig fields that `--resume` may change; any other difference from the saved config.json
# is refused (the README lists these).
RESUMABLE_TRAIN_FIELDS = ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints")
# How a step is laid out on devices, not what it computes: `--resume` may change these with the mesh
# (a checkpoint restores onto any mesh, checkpoint.restore_target).
LAYOUT_TRAIN_FIELDS = ("pipeline_schedule", "microbatches", "pipeline_keep_residuals")


class NonFiniteLoss(UsageError):
    pass


def _differences(saved, given, prefix: str = "") -> list[str]:
    """'section.field: saved -> given' for every leaf field that differs."""
    out = []
    for field in dataclasses.fields(saved):
        a, b = getattr(saved, field.name), getattr(given, field.name)
        if dataclasses.is_dataclass(a):
            out += _differences(a, b, f"{prefix}{field.name}.")
        elif a != b:
            out.append(f"{prefix}{field.name}: {a!r} -> {b!r}")
    return out


def has_checkpoint(run_dir: Path) -> bool:
    ckpt_dir = run_dir / "checkpoints"
    return ckpt_dir.is_dir() and any(ckpt_dir.iterdir())


def has_run(run_dir: Path) -> bool:
    return (run_dir / "config.json").exists() or has_checkpoint(run_dir)


def resume_start(saved: Config, given: Config | None, new_mesh: bool) -> Config:
    """What `--resume`'s options apply to: the saved config, or the `given` one (a --preset or
    --config repeated from the run's first command; checked against the saved one later, in
    `resolve_run_config`). Its mesh is the saved one unless `new_mesh` (a --mesh given), in which case
    it starts from one device: `--mesh expert=2` on resume means that mesh, not the saved one plus it."""
    start = saved if given is None else given
    return dataclasses.replace(start, mesh=MeshConfig() if new_mesh else saved.mesh)


def read_saved_config(run_dir: Path) -> Config:
    """The run's config.json, or a UsageError saying why it is not a run to resume."""
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        raise UsageError(f"--resume: {str(run_dir)!r} has no config.json, so it is not a dsv3 run directory")
    try:
        return config_from_json(saved_path.read_text())
    except Exception as e:
        raise UsageError(f"--resume: {str(saved_path)!r} cannot be read as a dsv3 config: {e}") from None


def resolve_run_config(config: Config, run_dir: Path, resume: bool, saved: Config | None = None) -> Config:
    """The config of this run: the given one for a new run; on resume the saved one (`saved`, if the
    caller has read it already, else read here), with the given values of RESUMABLE_TRAIN_FIELDS, the
    given mesh and LAYOUT_TRAIN_FIELDS, and refused if the given config differs in any other field
    (equal values are accepted silently)."""
    if not resume:
        if has_run(run_dir):
            raise UsageError(f"run directory {str(run_dir)!r} already holds a run; pass --resume to continue it, "
                             "or choose a new --run-dir (nothing was changed)")
        return config
    saved = read_saved_config(run_dir) if saved is None else saved
    changes = {name: getattr(config.train, name) for name in RESUMABLE_TRAIN_FIELDS + LAYOUT_TRAIN_FIELDS}
    resumed = dataclasses.replace(saved, train=dataclasses.replace(saved.train, **changes), mesh=config.mesh)
    conflicts = _differences(resumed, config)
    if conflicts:
        raise UsageError(f"--resume continues the run with its saved config; these options differ from it (saved "
                         f"-> given): {'; '.join(conflicts[:6])}{' ...' if len(conflicts) > 6 else ''} (only the "
                         f"mesh and train.{', train.'.join(RESUMABLE_TRAIN_FIELDS + LAYOUT_TRAIN_FIELDS)} may change "
                         "on resume; start a new --run-dir for the rest)")
    return resumed


def _host(metrics: dict) -> dict:
    return {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}


def checked_run_config(config: Config, run_dir: Path, resume: bool, saved: Config | None = None) -> Config:
    """The run's config after the checks that touch nothing: `run_dir` is a directory (or absent)
    that no other writer holds, and the config (the saved one on resume) is valid: the one
    validation of a run's config. Shared by `train` and the GRPO loop."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {str(run_dir)!r} is a file, not a directory")
    if is_main():  # process 0 alone takes the lock; two processes probing at once saw each other as its holder
        RunLock.check_free(run_dir)
    # The given config is checked first (on resume: the saved one with this command's options), so
    # an impossible mesh is named before a changed option; without conflicts it is the run's config.
    return resolve_run_config(validate(config), run_dir, resume, saved)


def train(config: Config, run_dir: Path, resume: bool = False, progress: bool = True,
          saved: Config | None = None) -> int:
    """Train (or continue) a run. Returns the process exit status (0, or 128+signal when stopped).
    `saved`: the run's config.json on resume, if the caller has read it (the CLI has)."""
    run_dir = Path(run_dir)
    # Every check first, touching nothing: another writer, config, devices, data, tokenizer, model.
    config = checked_run_config(config, run_dir, resume, saved)
    tc = config.train
    if tc.objective == "grpo":
        raise UsageError(f"{str(run_dir)!r} is a GRPO run: continue it with dsv3 grpo --run-dir {run_dir} --resume")
    mesh = make_mesh(config.mesh) if config.mesh.n_devices > 1 else None
    # data.shards > 1: this process builds only the shards whose rows land on its devices.
    shards = (shards_for_rows(*_rows_of_this_process(config, mesh), tc.batch_size, config.data.shards)
              if config.data.shards > 1 else None)
    if tc.objective == "sft":
        data = build_sft_data(config, run_dir if resume else None)
    else:
        data = build_data(config, run_dir if resume else None, shards)
    if resume and has_checkpoint(run_dir):
        # Only shapes: the checkpoint gives the values (at scale, initialising the model only to
        # overwrite it would cost minutes and a second copy of the state).
        graphdef, optimizer, state = abstract_train_state(config, tc.seed)
    else:
        graphdef, optimizer, state = create_train_state(config, tc.seed, mesh)  # sharded from the start
        if tc.init_from:
            state = init_from_run(state, config, mesh)  # fine-tuning starts from the base run's weights
    iterator = ShardedBatches(data.train_shards, tc.batch_size, config.data.shards, config.data.shuffle_seed)
    barrier("checked")  # every process has checked the run directory before process 0 writes to it

    main = is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir) if main else contextlib.nullcontext():
        if main:
            # Read again, now that no other writer can start: one may have changed it since the check.
            resolve_run_config(config, run_dir, resume)
            if not (run_dir / "tokenizer.json").exists() or not resume:
                write_atomic(run_dir / "tokenizer.json", data.tokenizer.to_str())
        barrier("run directory ready")
        checkpointer = Checkpointer(run_dir / "checkpoints", keep=tc.keep_checkpoints)
        try:
            return _run(config, run_dir, resume, progress, data, graphdef, optimizer, state, iterator, checkpointer,
                        mesh)
        finally:
            checkpointer.close()


def _run(config, run_dir, resume, progress, data, graphdef, optimizer, state, iterator, checkpointer, mesh) -> int:
    tc = config.train
    main = is_main()  # process 0 writes the run directory's files and talks to the console
    metrics_path, router_path = run_dir / "metrics.jsonl", run_dir / "router.jsonl"
    reporter = ProgressReporter(enabled=progress and main, total=tc.steps)
    start = 0
    layout = run_layout(config)
    if resume and checkpointer.latest_step() is not None:
        # Restored straight into this mesh's shardings (each device reads its own shards), whatever
        # mesh wrote the checkpoint.
        abstract = restore_target(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state), mesh,
                                  config.train.zero1, rules_for(config))
        state, data_state, start = checkpointer.restore_newest_good(abstract, run_dir / "damaged_checkpoints",
                                                                    say=reporter.warn)
        written_on = data_state.pop("written_on", None)  # metadata: any mesh restores (restore_target)
        iterator.set_state(data_state)
        if main:
            truncate_jsonl(metrics_path, start)
            truncate_jsonl(router_path, start)
            record_layout_change(run_dir, start, written_on, layout)
    else:  # a new run, or a resumed one killed before its first checkpoint: start clean
        if isinstance(jax.tree.leaves(state)[0], jax.ShapeDtypeStruct):  # no complete save to restore
            state = create_train_state(config, config.train.seed, mesh)[2]
        if main:
            for path in (metrics_path, router_path):
                path.unlink(missing_ok=True)
    drift = TopKDrift(run_dir / "routing_signatures", main)
    drift.start(start)

    train_step, eval_step, state, place_batch, place_rows = _compile(config, graphdef, optimizer, state, mesh)
    ema = HostEMA(tc.ema_decay, tc.ema_every, state.params) if tc.ema_decay else None  # starts at the initial params
    if ema is not None and start:
        ema.load(checkpointer.restore_ema(start, ema.restore_target()))
    # The iterator yields whole global batches when this process reads every data shard, else its rows.
    place_train = place_batch if len(data.train_shards) == config.data.shards else place_rows
    if main:
        write_atomic(run_dir / "config.json", config.to_json())
    val_set = [place_batch(b) for b in val_batches(data.val_windows, tc.batch_size, tc.eval_batches)]

    reporter.start(start)
    reporter.message(f"run directory: {run_dir} (steps {start + 1}..{tc.steps})")
    tokens_per_step = tc.batch_size * tc.seq_len
    status = 0
    try:
        with StopSignals() as stop, _appender(metrics_path, main) as metrics_file, \
                _appender(router_path, main) as router_file:
            for step in range(start + 1, tc.steps + 1):
                batch = place_train(next(iterator))
                t0 = time.perf_counter()
                state, metrics = train_step(state, batch)
                metrics = _host(metrics)
                elapsed = time.perf_counter() - t0
                check_finite(metrics, step, checkpointer, run_dir)
                if ema is not None:  # the step has finished: its parameters go to host memory
                    ema.update(step, state.params)
                load = metrics.pop("expert_load", None)
                record = {"step": step, **{k: float(v) for k, v in metrics.items()},
                          "tokens_per_s": tokens_per_step / elapsed}
                routing = layer_routing_stats(load) if load is not None else None
                if step % tc.eval_every == 0 or step == tc.steps:
                    evaluated, signature_LN = _evaluate(eval_step, state, val_set)
                    record.update(evaluated)
                    if ema is not None:  # the EMA's parameters on the devices for this evaluation only
                        ema_state = state.replace(params=ema.device_params())
                        record["val_loss_ema"] = _evaluate(eval_step, ema_state, val_set)[0]["val_loss"]
                        del ema_state
                    changed_L = None if signature_LN is None else drift.update(step, signature_LN,
                                                                               min(checkpointer.steps(), default=None))
                    if changed_L is not None:
                        routing["topk_changed"] = changed_L
                        record["val_topk_changed"] = float(np.mean(changed_L))
                if step % tc.log_every == 0 or "val_loss" in record:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if routing is not None:
                    router_file.write(json.dumps({"step": step, **routing}) + "\n")
                    router_file.flush()
                reporter.update(step, record)
                stopping = any_process(bool(stop.received))  # all processes stop after the same step
                if step % tc.checkpoint_every == 0 or step == tc.steps or stopping:
                    checkpointer.save(step, state, {**iterator.get_state(), "written_on": layout},
                                      ema=None if ema is None else ema.host_arrays())
                if stopping:
                    status = reporter.stopped(stop.received[0] if stop.received else signal.SIGTERM, step, run_dir,
                                              "sft" if tc.objective == "sft" else "train")
                    break
    finally:
        reporter.close()
        if ema is not None:
            ema.close()
    if status == 0 and main:
        write_report(run_dir)
    return status


def run_layout(config: Config) -> dict:
    """Where this run's steps run: the mesh's axis sizes and the number of processes (recorded with
    each checkpoint; a resume onto another one is logged in mesh_changes.jsonl)."""
    return {"mesh": config.mesh.sizes(), "processes": jax.process_count()}


def _rows_of_this_process(config: Config, mesh) -> tuple[int, int]:
    """[first, end) rows of each global batch that land on this process's devices."""
    B = config.train.batch_size
    if mesh is None:
        return 0, B
    rows = {index[0].indices(B)[:2] for index in
            rules_for(config).batch(mesh).addressable_devices_indices_map((B, config.train.seq_len + 1)).values()}
    first, end = min(r[0] for r in rows), max(r[1] for r in rows)
    if sum(e - f for f, e in rows) != end - first:
        raise UsageError(f"this process's devices hold rows {sorted(rows)} of each batch, not one block: "
                         "data.shards > 1 needs each process's batch rows to be contiguous")
    return first, end


def layer_routing_stats(load_LE: np.ndarray) -> dict[str, list]:
    """One router.jsonl line's per-layer statistics from the step's whole-batch loads [layers, E]:
    the loads, MaxVio (max_i load_i / mean load - 1, the report's Figure 9 measure) and the entropy
    (nats) of the load distribution over experts (log E when perfectly even)."""
    load_LE = np.asarray(load_LE, np.float64)
    share_LE = load_LE / np.maximum(load_LE.sum(-1, keepdims=True), 1e-12)
    entropy_L = -np.sum(np.where(share_LE > 0, share_LE * np.log(np.maximum(share_LE, 1e-300)), 0.0), -1)
    return {"expert_load": load_LE.tolist(), "max_vio": np.asarray(max_violation(load_LE)).tolist(),
            "load_entropy": entropy_L.tolist()}


def _appender(path: Path, main: bool):
    """The run's append-only log on process 0; a sink elsewhere."""
    return open(path if main else os.devnull, "a")


def _compile(config: Config, graphdef, optimizer, state, mesh):
    """Jitted train / eval steps; under a mesh (config.mesh > 1 device) the state and batches are
    sharded by the logical-axis table and XLA partitions the step (parallel/sharding.py); with
    mesh.pipeline > 1 the MoE stack runs through the pipeline schedule."""
    eval_step = make_eval_step(config, graphdef)
    # What the platform's compiler needs for collectives to overlap compute (platform.py).
    options = compiler_options(platform_of((jax.devices() if mesh is None else mesh.devices.flat)[0]))
    if mesh is None:
        return (jax.jit(make_train_step(config, graphdef, optimizer), donate_argnums=0, compiler_options=options),
                jax.jit(eval_step), state,
                lambda batch: batch, lambda rows: rows)
    # mesh.pipeline > 1: the MoE stack runs through train.pipeline_schedule (train/pipelined.py).
    train_step = make_train_step(config, graphdef, optimizer, pipeline_mesh=mesh if config.mesh.pipeline > 1 else None)
    rules = rules_for(config)
    state_shardings, batch_sharded = rules.tree(state, mesh, config.train.zero1), rules.batch(mesh)
    state = jax.device_put(state, state_shardings)
    # Metrics replicated, so every process can read them (an array on other hosts' devices cannot).
    replicated = rules.sharding((), mesh)
    train = jax.jit(train_step, in_shardings=(state_shardings, batch_sharded),
                    out_shardings=(state_shardings, replicated), donate_argnums=0, compiler_options=options)
    evaluate = jax.jit(eval_step, in_shardings=(state_shardings, batch_sharded), out_shardings=replicated)

    def in_mesh(step):  # the mesh (and the run's rules) in context for the layers that shard_map or constrain
        def call(*args):
            with jax.set_mesh(mesh), use_rules(rules):
                return step(*args)
        return call

    def place(batch: np.ndarray) -> jax.Array:  # each process fills only its own devices' rows
        return jax.make_array_from_callback(batch.shape, batch_sharded, lambda index: batch[index])

    def place_rows(rows: np.ndarray) -> jax.Array:  # this process's rows only (data.shards, `ShardedBatches`)
        return jax.make_array_from_process_local_data(batch_sharded, rows, (config.train.batch_size,) + rows.shape[1:])

    return in_mesh(train), in_mesh(evaluate), state, place, place_rows


def _evaluate(eval_step, state, val_set: list[jax.Array | np.ndarray]) -> tuple[dict[str, float], np.ndarray | None]:
    """(validation metrics, each MoE layer's expert-set signature of every validation token [L, N])."""
    losses, loads, signatures = [], [], []
    for batch in val_set:
        m = _host(eval_step(state, batch))
        losses.append(float(m["lm_loss"]))
        if "expert_load" in m:
            loads.append(m["expert_load"])
            signatures.append(m["choice_signature"])
    out = {"val_loss": float(np.mean(losses))}
    if loads:
        # MaxVio_global: loads summed over the whole validation set, per layer, averaged over layers.
        out["val_max_vio"] = float(np.mean(max_violation(np.sum(loads, axis=0))))
    return out, np.concatenate(signatures, axis=-1) if signatures else None


def check_finite(metrics: dict, step: int, checkpointer: Checkpointer, run_dir: Path) -> None:
    """Stop before a non-finite state can be saved (so every checkpoint on disk is finite, and
    pruning old ones never leaves only bad ones)."""
    nonfinite = int(metrics.pop("nonfinite_state"))
    if math.isfinite(float(metrics["loss"])) and math.isfinite(float(metrics["grad_norm"])) and not nonfinite:
        return
    parts = ", ".join(f"{k}={float(metrics[k]):.4g}" for k in ("loss", "lm_loss", "mtp_loss", "balance_loss",
                                                               "grad_norm") if k in metrics)
    last = checkpointer.latest_step()
    where = f"last good checkpoint: step {last}" if last is not None else "no checkpoint was saved yet"
    raise NonFiniteLoss(f"non-finite training state at step {step} ({parts}, {nonfinite:,} non-finite weights "
                        f"after the update; not saved); {where} in {run_dir / 'checkpoints'}; see "
                        f"{run_dir / 'metrics.jsonl'} and try a lower train.lr")


class ProgressReporter:
    """A rich progress bar with loss, tokens/s and MaxVio (plain lines when not a terminal)."""

    def __init__(self, enabled: bool, total: int):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = enabled
        self.total = total
        self.progress = None

    def start(self, completed: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if self.enabled and self.console.is_terminal:
            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"), console=self.console)
            self.task = self.progress.add_task("train", total=self.total, completed=completed, info="")
            self.progress.start()

    def warn(self, text: str) -> None:
        """Shown even with --quiet: something the user must know about their run."""
        self.console.print(f"dsv3: warning: {text}", highlight=False)

    def update(self, step: int, record: dict) -> None:
        info = f"loss {record['loss']:.3f}"
        for key, fmt in (("tokens_per_s", "  {:,.0f} tok/s"), ("reward_mean", "  reward {:.3f}"),
                         ("max_vio", "  MaxVio {:.2f}"), ("val_loss", "  val {:.3f}"),
                         ("val_accuracy", "  held-out accuracy {:.3f}")):
            if key in record:
                info += fmt.format(record[key])
        evaluated = "val_loss" in record or "val_accuracy" in record
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
            if evaluated:
                self.progress.console.print(f"step {step}: {info}")
        elif self.enabled and (step % 25 == 0 or evaluated):
            self.console.print(f"step {step}: {info}")

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def stopped(self, signum: int, step: int, run_dir: Path, command: str) -> int:
        """Say how to continue after a stop signal; returns the exit status 128 + signal."""
        self.message(f"stopped by signal {signum} after step {step}; checkpoint saved. "
                     f"Continue with: dsv3 {command} --run-dir {run_dir} --resume")
        return 128 + signum

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
