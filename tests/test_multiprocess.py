"""Multi-host training reproduced on one machine: 2 `dsv3 train` processes on 127.0.0.1, 4 host
devices each, joined by jax.distributed (gloo collectives), against 1 process with 8 host devices."""

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import cli_env
from tests.test_train_cli import SMALL, losses, wait_for

STEPS = 8
MESH = ["--mesh", "data=2,expert=4", "--set", "train.batch_size=8", "--set", "train.checkpoint_every=2",
        "--set", "data.shards=2",  # each process tokenises and packs only its own half of the documents
        "--set", "train.eval_every=4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dsv3(*args, log: Path, host_devices: int, process: tuple[int, int] | None = None):
    """A `dsv3 train` subprocess writing its console to `log` (a pipe left unread could fill and block it)."""
    distributed = ["--coordinator", f"127.0.0.1:{process[1]}", "--num-processes", "2",
                   "--process-id", str(process[0])] if process else []
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "dsv3_jax.cli", "train", *args, *SMALL, *MESH,
                                 "--host-devices", str(host_devices), *distributed],
                                env=cli_env(), stdout=out, stderr=subprocess.STDOUT)


def _two_processes(*args, logs: Path):
    port = _free_port()
    return [_dsv3(*args, log=logs / f"process{i}.log", host_devices=4, process=(i, port)) for i in range(2)]


def _finish(procs, timeout: int) -> list[int]:
    for p in procs:
        p.wait(timeout=timeout)
    return [p.returncode for p in procs]


def _tail(logs: Path) -> str:
    return "\n".join(f"{log.name}: ...{log.read_text()[-1500:]}" for log in sorted(logs.glob("*.log")))


def _same_losses(got, want):
    assert [step for step, _ in got] == [step for step, _ in want]
    np.testing.assert_allclose([loss for _, loss in got], [loss for _, loss in want], rtol=1e-6)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    proc = _dsv3("--steps", str(STEPS), "--run-dir", str(runs / "one"), log=runs / "one.log", host_devices=8)
    assert proc.wait(timeout=600) == 0, _tail(runs)
    return runs / "one"


def test_two_processes_train_and_resume_like_one(one_process_run, tmp_path):
    """Same losses as one process with 8 devices; SIGTERM to both mid-run, --resume, same losses to
    the end (the processes agree on the step to stop after, and restore their own shards)."""
    run = tmp_path / "two"
    procs = _two_processes("--steps", str(STEPS), "--run-dir", str(run), logs=tmp_path)
    metrics = run / "metrics.jsonl"
    assert wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, procs[0],
                    timeout=600), _tail(tmp_path)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    assert _finish(procs, 300) == [128 + signal.SIGTERM] * 2, _tail(tmp_path)
    stopped_at = len(losses(run))
    assert 3 <= stopped_at < STEPS, "the run finished before the signal: nothing was tested"
    _same_losses(losses(run), losses(one_process_run)[:stopped_at])

    procs = _two_processes("--steps", str(STEPS), "--run-dir", str(run), "--resume", logs=tmp_path)
    assert _finish(procs, 600) == [0, 0], _tail(tmp_path)
    _same_losses(losses(run), losses(one_process_run))
    consoles = [(tmp_path / f"process{i}.log").read_text() for i in range(2)]
    assert "done:" in consoles[0] and "done:" not in consoles[1]  # process 0 alone talks to the console


@pytest.mark.parametrize("flags,message", [
    (["--num-processes", "2"], "needs all of --coordinator HOST:PORT, --num-processes N and --process-id I"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     r"--process-id=2 must be in \[0, --num-processes=2\)"),
])
def test_incomplete_multi_process_flags_are_refused(flags, message, tmp_path):
    out = subprocess.run([sys.executable, "-m", "dsv3_jax.cli", "train", "--run-dir", str(tmp_path / "run"), *flags],
                         env=cli_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and re.search(message, out.stderr), out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("victim", [1, 0], ids=["worker-killed", "coordinator-killed"])
def test_a_dead_peer_stops_the_other_and_the_checkpoints_restore(one_process_run, tmp_path, victim):
    """kill -9 one of the two processes mid-run: the other exits non-zero within seconds, saying
    so (process 0's death may instead be reported by JAX's own runtime, which then aborts before
    Python can speak: a race between a failing collective and its coordination client);
    after a worker's death the checkpoints on disk restore in a one-process run on 8 devices, which
    repeats the logged losses of the steps after its checkpoint."""
    run, steps = tmp_path / "two", 40
    # Constant after warm-up (not decaying from 60% of train.steps): the resume below ends sooner.
    constant_lr = ["--set", "train.decay_start_fraction=1.0"]
    procs = _two_processes("--steps", str(steps), "--run-dir", str(run), "--distributed-timeout", "30", *constant_lr,
                           logs=tmp_path)
    metrics = run / "metrics.jsonl"
    assert wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 4, procs[0],
                    timeout=600), _tail(tmp_path)
    procs[victim].kill()
    survivor = procs[1 - victim]
    assert survivor.wait(timeout=60) != 0, _tail(tmp_path)
    console = (tmp_path / f"process{1 - victim}.log").read_text()
    ours = re.search(r"dsv3: error: (a collective with another process failed|process 1 of 2 stopped responding)"
                     r".*start every process again with --resume", console)
    if victim == 1:
        assert ours, console[-2000:]
    else:  # whichever notices first: a collective failing (our message) or JAX's coordination client
        assert ours or "another task died" in console, console[-2000:]
    logged = dict(losses(run))
    assert max(logged) < steps, "the run finished before the kill: nothing was tested"
    if victim == 0:
        return  # the same checkpoints as below; restoring them once is enough

    # Resumed one step past the last logged one: every logged step after the checkpoint is repeated
    # (the 40 steps above only leave room for the kill).
    end = max(logged) + 1
    resumed = _dsv3("--steps", str(end), "--run-dir", str(run), "--resume", "--set", "train.checkpoint_every=2",
                    *constant_lr, log=tmp_path / "resume.log", host_devices=8)
    assert resumed.wait(timeout=600) == 0, _tail(tmp_path)
    after = dict(losses(run))
    assert sorted(after) == list(range(1, end + 1))
    overlap = [s for s in logged if s in after and s > 2]
    np.testing.assert_allclose([after[s] for s in overlap], [logged[s] for s in overlap], rtol=1e-6)
    # 2 processes -> 1 on the same mesh: the checkpoint's layout was 2 processes, the resume's 1.
    changes = [json.loads(line) for line in (run / "mesh_changes.jsonl").read_text().splitlines()]
    assert [(c["from"]["processes"], c["to"]["processes"], c["to"]["mesh"]["expert"]) for c in changes] == [(2, 1, 4)]
    assert changes[0]["step"] % 2 == 0 and changes[0]["step"] <= max(logged)  # the checkpoint it resumed from


def test_a_one_process_checkpoint_resumes_on_two_processes(one_process_run, tmp_path):
    """1 process -> 2 (the way back of the test above): the one-process run, preempted after its
    step-6 checkpoint, resumed by 2 processes of 4 devices; steps 7 and 8 repeat its losses."""
    run = tmp_path / "moved"
    shutil.copytree(one_process_run, run)
    shutil.rmtree(run / "checkpoints" / str(STEPS))  # the preemption: the newest checkpoint never landed
    procs = _two_processes("--steps", str(STEPS), "--run-dir", str(run), "--resume", logs=tmp_path)
    assert _finish(procs, 600) == [0, 0], _tail(tmp_path)
    _same_losses(losses(run), losses(one_process_run))  # resume drops the logged rows past its checkpoint
    changes = [json.loads(line) for line in (run / "mesh_changes.jsonl").read_text().splitlines()]
    assert [(c["from"]["processes"], c["to"]["processes"], c["step"]) for c in changes] == [(1, 2, STEPS - 2)]


def _workers(mode: str, directory: Path, *flags: str) -> list[dict]:
    """Both processes of tests/restore_worker.py in `mode`; the JSON line each printed (restore)."""
    port, worker = _free_port(), Path(__file__).with_name("restore_worker.py")
    procs = [subprocess.Popen([sys.executable, str(worker), mode, str(directory), str(port), str(i), *flags],
                              env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    return [json.loads(o.strip().splitlines()[-1]) for o in outs] if mode == "restore" else []


def test_each_process_reads_only_its_own_shards(tmp_path):
    """Restore memory on a state no process may hold whole: a 420 MB train state (fp32 weights and
    AdamW moments) written by 2 processes on fsdp=2, each its own half, then restored by 2 processes
    on fsdp=2 through the path every command uses. Each process reads about half of the checkpoint's
    bytes from disk (/proc/self/io) and its peak resident memory rises by less than the whole state
    (measured: 0.8x, its half read plus its half as the CPU device's array; a host copy of the whole
    state would be >= 1.5x); its shards equal a fresh sharded init. The planted bug, restoring onto
    replicated targets (a restore that ignores the mesh), reads all of it on each process.
    (A checkpoint written by ONE process stores each array as one chunk, so every restoring process
    reads all of it: then only the second half of this claim holds.)"""
    directory = tmp_path / "ckpt"
    _workers("save", directory)
    on_disk = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    sharded = _workers("restore", directory)
    whole = sharded[0]["whole"]
    assert whole > 400e6
    replicated = _workers("restore", directory, "--replicated")
    for result in sharded:
        assert result["equal"] and result["local"] < 0.51 * whole, result
        assert result["read"] < 0.6 * on_disk, (result, on_disk)
    assert all(r["read"] > 0.9 * on_disk for r in replicated), (replicated, on_disk)
    # Peak memory where the kernel lets a process reset its high-water mark (/proc/self/clear_refs).
    assert all(r["rise"] < whole for r in sharded if r["peak_reset"]), sharded
    assert all(r["rise"] > 1.2 * whole for r in replicated if r["peak_reset"]), replicated
