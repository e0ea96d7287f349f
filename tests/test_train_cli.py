"""End-to-end `dsv3 train` in subprocesses: exact resume after SIGTERM / SIGKILL, bad input, report, generate."""

import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv3_jax.run_dir import read_jsonl
from tests.conftest import cli_env

STEPS = 40
SMALL = ["--data", "synthetic", "--quiet",
         "--set", "model.vocab_size=384", "--set", "model.d_model=32", "--set", "model.n_layers=2",
         "--set", "model.n_heads=2", "--set", "model.q_lora_rank=16", "--set", "model.kv_lora_rank=16",
         "--set", "model.qk_nope_dim=8", "--set", "model.qk_rope_dim=8", "--set", "model.v_head_dim=8",
         "--set", "model.ffn_dim=64", "--set", "model.moe_ffn_dim=16", "--set", "train.batch_size=4",
         "--set", "train.seq_len=32", "--set", "train.eval_every=10", "--set", "train.checkpoint_every=5",
         "--set", "train.eval_batches=1", "--set", "train.warmup_steps=3"]
ENV = cli_env()


def dsv3(*args, **kw):
    return subprocess.run([sys.executable, "-m", "dsv3_jax.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=300, **kw)


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "dsv3_jax.cli", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["loss"]) for m in lines]


def tree_digest(path: Path) -> str:
    """Every file's name and bytes, except the lock's PID (bookkeeping of who last opened the run)."""
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.name != ".lock"):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def wait_for(predicate, proc, timeout=240, poll=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "straight"
    out = dsv3("train", "--steps", str(STEPS), "--run-dir", str(run), *SMALL)
    assert out.returncode == 0, out.stderr
    return run


def test_straight_run_leaves_a_complete_run_directory(straight_run):
    names = {p.name for p in straight_run.iterdir()}
    assert {"config.json", "metrics.jsonl", "router.jsonl", "tokenizer.json", "checkpoints",
            "loss.png", "max_vio.png", "expert_load.png"} <= names
    records = [json.loads(l) for l in (straight_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert {"step", "loss", "lm_loss", "mtp_loss", "balance_loss", "max_vio", "grad_norm", "lr",
            "tokens_per_s", "dropped_fraction"} <= set(records[0])
    assert "val_loss" in records[9] and "val_max_vio" in records[9]
    assert records[-1]["lm_loss"] < records[0]["lm_loss"] - 1.0


def stop_and_resume(run: Path, steps: int, args: list[str]) -> None:
    """Start `dsv3 train`, SIGTERM it after 3 logged steps (status 128 + SIGTERM), then --resume it
    to the end."""
    proc = start("train", "--steps", str(steps), "--run-dir", str(run), *args)
    metrics = run / "metrics.jsonl"
    assert wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped_at = len(losses(run))
    assert 3 <= stopped_at < steps, "the run finished before the signal: nothing was tested"
    out = dsv3("train", "--steps", str(steps), "--run-dir", str(run), "--resume", *args)
    assert out.returncode == 0, out.stderr


def test_resume_after_sigterm_is_exact(straight_run, tmp_path):
    stop_and_resume(tmp_path / "term", STEPS, SMALL)
    assert losses(tmp_path / "term") == losses(straight_run)


def test_kill_9_loop_loses_and_repeats_no_step(straight_run, tmp_path):
    """kill -9 at random moments, while training and while saving, at least 4 times, resuming after
    each: every step appears exactly once in metrics.jsonl and the losses equal the uninterrupted run."""
    run = tmp_path / "kills"
    metrics = run / "metrics.jsonl"
    checkpoints = run / "checkpoints"
    rng = random.Random(0)
    lines = lambda: len(read_jsonl(metrics))
    saving = lambda: checkpoints.is_dir() and any("tmp" in p.name for p in checkpoints.iterdir())
    kills, mid_save = 0, 0
    while kills < 4:
        resume = ["--resume"] if (run / "config.json").exists() else []
        before = lines()
        proc = start("train", "--steps", str(STEPS), "--run-dir", str(run), *SMALL, *resume)
        if not wait_for(lambda: lines() > before, proc):  # training, past where it resumed
            break
        if kills % 2:
            time.sleep(rng.uniform(0.0, 0.15))  # somewhere in a step
        elif wait_for(saving, proc, timeout=10, poll=0.002):  # inside orbax's save, before its rename
            mid_save += 1
        proc.kill()
        proc.communicate(timeout=60)
        if proc.returncode == 0:
            break  # it finished first
        kills += 1
    out = dsv3("train", "--steps", str(STEPS), "--run-dir", str(run), "--resume", *SMALL)
    assert out.returncode == 0, out.stderr
    assert kills >= 4 and mid_save >= 1, (kills, mid_save)
    assert [s for s, _ in losses(run)] == list(range(1, STEPS + 1))
    assert losses(run) == losses(straight_run)


def test_interrupted_save_never_replaces_the_last_good_checkpoint(straight_run, tmp_path):
    run = tmp_path / "partial"
    shutil.copytree(straight_run, run)
    # What a save killed half-way leaves behind: orbax's temporary directory, never renamed.
    partial = run / "checkpoints" / "45.orbax-checkpoint-tmp-1700000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_bytes(b"\x00" * 10)
    out = dsv3("train", "--steps", "42", "--run-dir", str(run), "--resume", *SMALL)
    assert out.returncode == 0, out.stderr
    assert [s for s, _ in losses(run)] == list(range(1, 43))  # resumed from step 40, not from the junk


def test_when_no_checkpoint_restores_the_run_is_refused_and_left_untouched(straight_run, tmp_path):
    run = tmp_path / "corrupt"
    shutil.copytree(straight_run, run)
    for f in (run / "checkpoints").glob("*/state/**/*"):  # every kept checkpoint (35 and 40)
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(b"garbage")
    before = tree_digest(run)
    out = dsv3("train", "--steps", "45", "--run-dir", str(run), "--resume", *SMALL)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "checkpoint 40" in out.stderr, out.stderr
    assert "source locations" not in out.stderr  # TensorStore's noise trimmed
    assert tree_digest(run) == before


def test_foreign_checkpoint_is_refused_and_left_untouched(straight_run, tmp_path):
    from dsv3_jax.checkpoint import Checkpointer
    from dsv3_jax.config import apply_overrides, config_from_json
    from dsv3_jax.train.state import create_train_state

    run = tmp_path / "mixed"
    shutil.copytree(straight_run, run)
    shutil.rmtree(run / "checkpoints")
    # A checkpoint written by a wider model (d_model 48) where this run expects d_model 32.
    other = apply_overrides(config_from_json((straight_run / "config.json").read_text()), ["model.d_model=48"])
    checkpointer = Checkpointer(run / "checkpoints")
    checkpointer.save(5, create_train_state(other, 0)[2], {"next_index": 5})
    checkpointer.close()
    before = tree_digest(run)
    out = dsv3("train", "--steps", "45", "--run-dir", str(run), "--resume", *SMALL)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "was written by a different model: misshapen" in out.stderr
    assert tree_digest(run) == before
    not_a_run = tmp_path / "not_a_run"
    (not_a_run / "checkpoints").mkdir(parents=True)
    out = dsv3("train", "--run-dir", str(not_a_run), "--resume", *SMALL)
    assert out.returncode == 2 and "not a dsv3 run directory" in out.stderr


def test_existing_run_is_not_overwritten_without_resume(straight_run):
    before = tree_digest(straight_run)
    out = dsv3("train", "--steps", "3", "--run-dir", str(straight_run), *SMALL)
    assert out.returncode == 2 and "already holds a run" in out.stderr
    assert tree_digest(straight_run) == before


@pytest.mark.parametrize("args, fragment", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--set", "model.bogus=1"], "unknown config key 'model.bogus'"),
    (["--set", "train.lr=-1"], "train.lr=-1.0 must be a positive number"),
    (["--set", "model.topk_group=7"], "model.topk_group=7"),
    (["--data", "/nonexistent/corpus.txt"], "does not exist"),
    (["--data", "/nonexistent/*.jsonl"], "matches no files"),
    (["--set", "sharding.moe_ffn=expert", "--mesh", "expert=2", "--host-devices", "2"],
     "logical axes 'expert' and 'moe_ffn' of one array"),
    (["--set", "sharding.attention=tensor"], "sharding.attention is not a logical axis"),
])
def test_bad_input_one_line_exit_2(tmp_path, args, fragment):
    out = dsv3("train", "--steps", "2", "--run-dir", str(tmp_path / "r"), "--quiet", *args)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") <= 1 and fragment in out.stderr, out.stderr  # run-dir line + error
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_non_finite_loss_names_step_parts_and_where_to_look(tmp_path):
    out = dsv3("train", "--steps", "20", "--run-dir", str(tmp_path / "r"), *SMALL,
               "--set", "train.lr=1e30", "--set", "train.warmup_steps=0", "--set", "train.grad_clip=0")
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert "non-finite training state at step" in last and "lm_loss=" in last and "metrics.jsonl" in last, last


def test_report_and_generate(straight_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(straight_run, run)
    for png in run.glob("*.png"):
        png.unlink()
    out = dsv3("report", "--run-dir", str(run))
    assert out.returncode == 0 and (run / "expert_load.png").stat().st_size > 1000, out.stderr
    out = dsv3("generate", "--run-dir", str(run), "--prompt", "def add_", "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def add_") and len(out.stdout) > len("def add_") + 5
    assert "tokens/s" in out.stderr
    bad = dsv3("generate", "--run-dir", str(tmp_path / "missing"), "--prompt", "x")
    assert bad.returncode == 2 and "not a dsv3 run directory" in bad.stderr
