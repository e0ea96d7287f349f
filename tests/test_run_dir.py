"""Run directories never lose work (issue 17): finite checkpoints, one writer, torn logs, clean
refusals. The kill -9 loop lives in test_train_cli.py beside the other end-to-end runs."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dsv3_jax.checkpoint import Checkpointer
from dsv3_jax.config import Config, ConfigError, DataConfig, TrainConfig, config_from_json
from dsv3_jax.errors import UsageError
from dsv3_jax.run_dir import RunLock, read_jsonl, truncate_jsonl
from dsv3_jax.jobs.train import NonFiniteLoss, check_finite, resolve_run_config, train
from tests.conftest import cli_env, tiny_model_config

ENV = cli_env()
GOLDEN = Path(__file__).parent / "fixtures" / "hf" / "v3_plain_q_two_shared"


def dsv3(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "dsv3_jax.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def one_line_exit_2(out, fragment: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert out.stderr.strip().count("\n") == 0 and fragment in out.stderr, out.stderr


def small_config(**train) -> Config:
    model = tiny_model_config(n_layers=2, mtp_depth=1, vocab_size=384)
    return Config(model=model, data=DataConfig(source="synthetic"),
                  train=TrainConfig(**{"steps": 4, "batch_size": 2, "seq_len": 16, "eval_every": 100, "eval_batches": 1,
                                       "checkpoint_every": 1, "keep_checkpoints": 2, "warmup_steps": 1, **train}))


def tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# 1. Only finite states are saved --------------------------------------------------------------

def test_a_finite_loss_with_a_nan_gradient_or_overflowed_weights_is_not_saved(tmp_path):
    ckpt = Checkpointer(tmp_path / "c")
    good = {"loss": np.float32(2.0), "lm_loss": np.float32(2.0), "grad_norm": np.float32(1.0)}
    check_finite({**good, "nonfinite_state": np.int32(0)}, 3, ckpt, tmp_path)
    with pytest.raises(NonFiniteLoss, match="grad_norm=nan"):
        check_finite({**good, "grad_norm": np.float32("nan"), "nonfinite_state": np.int32(0)}, 3, ckpt, tmp_path)
    with pytest.raises(NonFiniteLoss, match="12 non-finite weights"):  # finite loss and gradient, lr overflowed
        check_finite({**good, "nonfinite_state": np.int32(12)}, 3, ckpt, tmp_path)
    ckpt.close()


def test_divergent_run_stops_before_saving_and_keeps_finite_checkpoints(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss) as caught:
        train(small_config(steps=40, lr=1e9, warmup_steps=0, grad_clip=0.0), run, progress=False)
    checkpointer = Checkpointer(run / "checkpoints", read_only=True)
    steps = checkpointer.manager.all_steps()
    assert steps and f"last good checkpoint: step {max(steps)}" in str(caught.value)
    for step in steps:  # everything on disk is finite
        restored = checkpointer.manager.restore(step)
        leaves = jax.tree.leaves(restored["state"])
        assert all(np.isfinite(np.asarray(x)).all() for x in leaves if np.issubdtype(np.asarray(x).dtype, np.floating))
    checkpointer.close()


# 2. One writer ---------------------------------------------------------------------------------

def test_a_second_writer_is_refused_with_the_holders_pid_and_a_dead_holder_is_taken_over(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(UsageError, match=f"in use by another dsv3 process \\(PID {os.getpid()}\\)"):
            RunLock(tmp_path).__enter__()
        with pytest.raises(UsageError, match=f"PID {os.getpid()}"):
            train(small_config(), tmp_path, resume=True, progress=False)
    # A holder killed with SIGKILL leaves the file but not the lock.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dsv3_jax.run_dir import RunLock; "
                               f"RunLock({str(tmp_path)!r}).__enter__(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UsageError, match=f"PID {holder.pid}"):
        RunLock.check_free(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


# 3. Torn metrics lines -------------------------------------------------------------------------

def test_a_torn_last_line_is_dropped_by_resume_and_report(tmp_path):
    log = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 5.0 - s, "lm_loss": 5.0 - s, "tokens_per_s": 1.0} for s in range(1, 5)]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')
    assert read_jsonl(log) == records
    truncate_jsonl(log, 3)
    assert read_jsonl(log) == records[:3] and log.read_text().endswith("}\n")
    log.write_text(log.read_text() + '{"step": 4, "lo')
    from dsv3_jax.report import write_report

    assert [p.name for p in write_report(tmp_path)] == ["loss.png"]
    log.write_text('{"step": 1\n' + json.dumps(records[1]) + "\n")  # damage in the middle is not a torn line
    with pytest.raises(UsageError, match="metrics.jsonl:1 is not a JSON line"):
        read_jsonl(log)


# 4. Nothing written before every check passed ---------------------------------------------------

def test_a_failed_start_writes_nothing_and_a_leftover_tokenizer_is_not_reused(tmp_path):
    out = dsv3("train", "--data", "synthetic", "--mesh", "data=4", "--run-dir", str(tmp_path / "r"), "--quiet")
    one_line_exit_2(out, "needs 4 devices but 1 are available (on CPU: --host-devices 4)")
    out = dsv3("train", "--data", "/bin/ls", "--run-dir", str(tmp_path / "r"), "--quiet")
    one_line_exit_2(out, "is not UTF-8 text")
    assert not (tmp_path / "r").exists()
    # A directory left by an older failed start (a tokenizer, no run) is not a run; its tokenizer is replaced.
    run = tmp_path / "left"
    run.mkdir()
    (run / "tokenizer.json").write_text("left over")
    assert train(small_config(steps=1), run, progress=False) == 0
    assert (run / "tokenizer.json").read_text() != "left over"


# 5. Bad input: one line, exit 2 -----------------------------------------------------------------

def test_truncated_safetensors_are_refused_in_one_line(tmp_path):
    broken = tmp_path / "hf"
    shutil.copytree(GOLDEN, broken)
    shard = broken / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 2])
    one_line_exit_2(dsv3("convert", "hf-to-orbax", str(broken), str(tmp_path / "out")), "is truncated")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config, fragment", [
    ({"train": {"lr": "abc"}}, 'train.lr="abc" in the config file must be a number'),
    ({"model": {"rope_theta": None}}, "model.rope_theta=null in the config file must be a number"),
    ({"model": {"fp8": 1}}, "model.fp8=1 in the config file must be true or false"),
    ({"mesh": 2}, "mesh in the config file must be an object"),
])
def test_config_files_with_wrong_types_are_refused(config, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        config_from_json(json.dumps(config))


def test_bad_cli_values_one_line_exit_2(tmp_path):
    bad_type = tmp_path / "bad.json"
    bad_type.write_text('{"train": {"lr": "abc"}}')
    cases = [
        (["train", "--host-devices", "0"], "--host-devices=0 must be >= 1"),
        (["info", "--seq-len", "-5"], "--seq-len=-5 must be >= 1"),
        (["train", "--config", str(bad_type), "--run-dir", str(tmp_path / "r")], "must be a number"),
        (["train", "--data", "synthetic", "--host-devices", "3", "--mesh", "expert=3", "--set", "train.batch_size=3",
          "--run-dir", str(tmp_path / "r")], "model.n_routed_experts=8 must be divisible by mesh.expert=3"),
        (["generate", "--run-dir", str(tmp_path / "nowhere"), "--prompt", ""], "--prompt is empty"),
        (["convert", "orbax-to-hf", str(tmp_path), str(bad_type)], "is a file"),
        (["convert", "orbax-to-hf", str(tmp_path), str(tmp_path / "no" / "such" / "dir")], "does not exist"),
    ]
    for args, fragment in cases:
        one_line_exit_2(dsv3(*args), fragment)
    assert not (tmp_path / "r").exists()


# 6. --resume with conflicting options ------------------------------------------------------------

def test_resume_refuses_changed_fields_and_applies_the_safe_ones(tmp_path):
    config = small_config()
    (tmp_path / "config.json").write_text(config.to_json())
    more_steps = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=99, eval_every=7))
    assert resolve_run_config(more_steps, tmp_path, resume=True) == more_steps
    changed = dataclasses.replace(config, train=dataclasses.replace(config.train, lr=1.0, batch_size=4),
                                  data=dataclasses.replace(config.data, source="stdlib"))
    with pytest.raises(UsageError) as caught:
        resolve_run_config(changed, tmp_path, resume=True)
    for field in ("data.source: 'synthetic' -> 'stdlib'", "train.batch_size: 2 -> 4", "train.lr: 0.003 -> 1.0"):
        assert field in str(caught.value)
    out = dsv3("train", "--run-dir", str(tmp_path), "--resume", "--set", "model.n_layers=3")
    one_line_exit_2(out, "model.n_layers: 2 -> 3")


# 7. A damaged latest checkpoint --------------------------------------------------------------------

def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_good_one(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(small_config(steps=4, keep_checkpoints=4), run, progress=False) == 0
    straight = [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl")]
    for f in (run / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(b"garbage")
    assert train(small_config(steps=4, keep_checkpoints=4), run, resume=True, progress=False) == 0
    warning = capsys.readouterr().err
    assert "checkpoint(s) 4 could not be read" in warning and "resuming from checkpoint 3" in warning, warning
    assert [p.name.split("-")[0] for p in (run / "damaged_checkpoints").iterdir()] == ["4"]  # kept, set aside
    assert [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl")] == straight  # step 4 redone exactly


# 9. Data that is not text ---------------------------------------------------------------------------

def test_non_utf8_data_is_refused_naming_the_file(tmp_path):
    from dsv3_jax.data.corpus import load_documents

    (tmp_path / "a.txt").write_bytes("caf\xe9 latin-1\n".encode("latin-1"))
    (tmp_path / "b.py").write_bytes(b"x = 1\n")
    with pytest.raises(UsageError, match="a.txt' is not UTF-8 text"):
        load_documents(str(tmp_path), 10_000)
    with pytest.raises(UsageError, match="not UTF-8 text|binary"):
        load_documents("/bin/ls", 10_000)


# 10. Exports honour the umask ----------------------------------------------------------------------

def test_export_modes_follow_the_umask(tmp_path):
    from flax import nnx

    from dsv3_jax.interop import hf
    from dsv3_jax.model.model import DeepSeekV3

    cfg = tiny_model_config(n_layers=1, first_k_dense=1, mtp_depth=0)
    old = os.umask(0o022)
    try:
        hf.save(DeepSeekV3(cfg, nnx.Rngs(0)), cfg, tmp_path / "export")
    finally:
        os.umask(old)
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in (tmp_path / "export").iterdir()} == {0o644}


# 11. Help and plots ----------------------------------------------------------------------------------

def test_help_names_presets_and_describes_every_option():
    from dsv3_jax.cli import build_parser
    from dsv3_jax.config import PRESETS

    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            assert action.help, f"dsv3 {name} {action.option_strings or action.dest} has no description"
    train_help = dsv3("train", "--help").stdout
    assert all(preset in train_help for preset in PRESETS)


def test_router_stats_plot_has_one_labelled_axis_per_quantity(tmp_path, monkeypatch):
    from dsv3_jax import report

    figures = {}
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.setdefault(path.name, fig) and path)
    records = [{"step": s, "loss": 1.0, "router_entropy": 1.5, "dropped_fraction": 0.0, "capacity_dropped": 0.01}
               for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report.write_report(tmp_path)
    axes = figures["router_stats.png"].axes
    assert [ax.get_ylabel() for ax in axes] == ["entropy (nats)", "fraction"]


def test_only_process_0_probes_the_lock(tmp_path, monkeypatch):
    """Every process of a multi-process run checks the run before starting; if all of them probed
    the lock, two probes at the same moment saw each other as a live holder (seen: process 0 of a
    resumed 2-process run refused its own run). Process 0 alone probes and holds it."""
    import dsv3_jax.jobs.train as loop

    config = small_config()
    with RunLock(tmp_path):  # stands for the other process's probe at that moment
        monkeypatch.setattr(loop, "is_main", lambda: False)
        assert loop.checked_run_config(config, tmp_path, resume=False) is not None
        monkeypatch.setattr(loop, "is_main", lambda: True)
        with pytest.raises(UsageError, match="in use by another dsv3 process"):
            loop.checked_run_config(config, tmp_path, resume=False)
