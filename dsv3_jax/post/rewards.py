"""Rule-based rewards for GRPO (report §5.2.1: "for questions that can be validated using specific
rules", a final answer in a designated format, or code checked by a compiler / test cases).

A reward is a function (completion text, problem) -> float, registered by name with
`@register_reward`; tasks (post/tasks.py) name the reward that scores them. The code reward runs
the program in a separate Python process (`run_python`) with a wall-clock and CPU limit, an address
space limit, no network and no process spawning; a timeout, crash or memory blow-up scores 0 and
never reaches the trainer.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from typing import Callable

from dsv3_jax.post.tasks import Problem

RewardFn = Callable[[str, Problem], float]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def register(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn
    return register


_INTEGER = re.compile(r"-?\d+")


@register_reward("exact_answer")
def exact_answer(completion: str, problem: Problem) -> float:
    """1 if the completion's final number is the reference answer, else 0 (a completion with no
    number, or a right number followed by another, scores 0)."""
    numbers = _INTEGER.findall(completion)
    return float(bool(numbers) and numbers[-1] == problem.answer)


@register_reward("python_tests")
def python_tests(completion: str, problem: Problem) -> float:
    """1 if the prompt's code, completed by the model, passes the problem's asserts, else 0."""
    return float(run_python(problem.prompt + completion + "\n\n" + problem.tests).passed)


# The sandbox -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed", "failed" (non-zero exit: an assert, an exception), "timeout", "killed" (signal)
    detail: str  # the last line of stderr, or why it was stopped

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# Runs in the child before the program: limits, then an audit hook that refuses what a test of a
# pure function never needs (the network, new processes, foreign code). Not a boundary against
# hostile code (a determined program can get around a Python-level hook); it keeps a model's
# mistakes (loops, huge allocations, stray os.system calls) from harming the trainer.
_PRELUDE = textwrap.dedent("""
    import os, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))
    resource.setrlimit(resource.RLIMIT_CPU, ({cpu_s}, {cpu_s}))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:  # a private network namespace: no interface but a down loopback (where user namespaces are allowed)
        os.unshare(os.CLONE_NEWUSER | os.CLONE_NEWNET)
    except (AttributeError, OSError):
        pass
    _DENIED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
               "os.forkpty", "os.kill", "os.killpg", "ctypes.", "pty.")
    def _deny(event, args):
        if event.startswith(_DENIED) or (event == "import" and args[0] in ("ctypes", "_ctypes")):
            raise PermissionError("sandbox: " + event + " is not allowed")
    sys.addaudithook(_deny)
    del os, resource
    _path = sys.argv[1]
    with open(_path) as _f:
        _code = compile(_f.read(), "program.py", "exec")
    exec(_code, {{"__name__": "__main__"}})
""")


def run_python(source: str, timeout_s: float = 2.0, memory_mb: int = 512) -> SandboxResult:
    """Run `source` in a fresh isolated interpreter (`python -I`, empty temporary cwd) and report how
    it ended. The whole process group is killed at `timeout_s`; CPU time is capped at the same."""
    cpu_s = max(1, int(timeout_s + 0.999))
    prelude = _PRELUDE.format(memory=memory_mb << 20, cpu_s=cpu_s)
    with tempfile.TemporaryDirectory(prefix="dsv3-sandbox-") as workdir:
        path = os.path.join(workdir, "program.py")
        with open(path, "w") as f:
            f.write(source)
        proc = subprocess.Popen([sys.executable, "-I", "-c", prelude, path], cwd=workdir, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        try:
            _, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return SandboxResult("timeout", f"no result within {timeout_s:g} s")
    last = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
    if proc.returncode == 0:
        return SandboxResult("passed", "")
    if proc.returncode < 0:
        return SandboxResult("killed", f"signal {-proc.returncode} ({signal.Signals(-proc.returncode).name})")
    return SandboxResult("failed", last[0][:200])


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
