"""A run directory's bookkeeping: one writer at a time, logs that survive a kill, atomic files.

Layout: config.json, tokenizer.json, metrics.jsonl, router.jsonl, checkpoints/ (orbax), plots,
.lock (the writer's PID), damaged_checkpoints/ (checkpoints that failed to restore, set aside),
mesh_changes.jsonl (one line per resume onto another mesh or number of processes).
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from dsv3_jax.errors import UsageError


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path` and rename it: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def require_new_directory(path: Path) -> None:
    """An output directory that may be created: absent or empty, not a file, its parent present.
    Checked before any work, so a bad destination costs nothing and overwrites nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"destination {str(path)!r} is a file; give a new directory path")
    if path.exists() and any(path.iterdir()):
        raise UsageError(f"destination {str(path)!r} exists and is not empty; choose a new path")
    if not path.absolute().parent.is_dir():
        raise UsageError(f"the parent of destination {str(path)!r} does not exist; create it first")


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL log. A torn last line (the writer killed mid-line) is dropped; a bad
    line anywhere else is damage and refused."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # torn by a kill: the step it described was never checkpointed
            raise UsageError(f"{path}:{number} is not a JSON line; the log is damaged (remove that line to go on)") \
                from None
    return records


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records of steps <= last_step (those after it were written after the checkpoint
    a resume starts from, and will be written again)."""
    if path.exists():
        kept = [r for r in read_jsonl(path) if r["step"] <= last_step]
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def record_layout_change(run_dir: Path, step: int, before: dict | None, now: dict) -> None:
    """A line in `mesh_changes.jsonl` when a run resumes at `step` on another layout than the one its
    checkpoint was written on (`before`; None for checkpoints that predate the record). Lines of
    earlier resumes from this same step (whose steps are being redone) are replaced."""
    path = Path(run_dir) / "mesh_changes.jsonl"
    truncate_jsonl(path, step - 1)
    if before is None or before == now:
        return
    line = json.dumps({"step": step, "from": before, "to": now})
    with open(path, "a") as log:
        log.write(line + "\n")


class RunLock:
    """An exclusive `flock` on `<run_dir>/.lock` for as long as this process trains the run.

    The kernel drops the lock when its holder exits, kill -9 included, so a stale lock from a
    dead process never blocks the next start: it is simply taken over."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    @staticmethod
    def check_free(run_dir: Path) -> None:
        """Refuse at once if a live process holds the run's lock. Writes nothing: for the checks
        that run before anything may be written."""
        path = Path(run_dir) / ".lock"
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                _lock_or_refuse(fd, path)
            finally:
                os.close(fd)  # closing releases the probe's lock

    def __enter__(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock_or_refuse(fd, self.path)
        except UsageError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the file stays (unlinking it would race a new holder)
            self.fd = None


def _lock_or_refuse(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        raise UsageError(f"run directory {str(path.parent)!r} is in use by another dsv3 process (PID {holder}); "
                         "wait for it to finish or stop it, then --resume") from None


class StopSignals:
    """SIGTERM / SIGINT recorded instead of killing the process, so a training loop can finish its
    step, save a checkpoint and exit 128 + signal; the previous handlers come back on exit."""

    def __enter__(self) -> "StopSignals":
        import signal

        self.received: list[int] = []
        self._previous = {sig: signal.signal(sig, lambda s, _frame: self.received.append(s))
                          for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
