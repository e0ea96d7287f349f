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
from collections.abc import Callable

from dsv3_jax.post.expressions import Parsed, parse_expression
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


def _well_formed(completion: str, problem: Problem) -> Parsed | None:
    """The completion parsed, if it is one expression using exactly the prompt's numbers, each once."""
    given = sorted(int(n) for n in problem.prompt.split(":")[0].split(","))
    parsed = parse_expression(completion)
    return parsed if parsed is not None and sorted(parsed.numbers) == given else None


@register_reward("countdown_format")
def countdown_format(completion: str, problem: Problem) -> float:
    """1 if the completion is one expression (integers, + - * /, brackets) using exactly the given
    numbers, each once, whatever its value; else 0. A division by zero is still well-formed."""
    return float(_well_formed(completion, problem) is not None)


@register_reward("countdown")
def countdown(completion: str, problem: Problem) -> float:
    """1 if the completion is a well-formed expression of the given numbers, each once, whose exact
    value is the target; any such expression counts. Else 0 (division by zero, a number used twice
    or left out, a number not given, any text besides the expression)."""
    parsed = _well_formed(completion, problem)
    return float(parsed is not None and parsed.value == int(problem.answer))


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


# Runs in the child before the program: limits; a file boundary (writes only inside its temporary
# directory, reads only there and in the interpreter's standard library), enforced by the kernel
# with Landlock where it has it (Linux >= 5.13: the process restricts itself, for good), and by
# the audit hook otherwise; then the audit hook, which refuses what a test of a pure function
# never needs (the network, new processes, foreign code). The hook alone is not a boundary
# against hostile code (a determined program can get around a Python-level hook); it keeps a
# model's mistakes (loops, huge allocations, stray os.system calls, stray files) from harming the
# trainer. `file_boundary()` says which one this machine gives.
_PRELUDE = textwrap.dedent("""
    import os, resource, sys, sysconfig
    resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))
    resource.setrlimit(resource.RLIMIT_CPU, ({cpu_s}, {cpu_s}))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:  # a private network namespace: no interface but a down loopback (where user namespaces are allowed)
        os.unshare(os.CLONE_NEWUSER | os.CLONE_NEWNET)
    except (AttributeError, OSError):
        pass
    _WORK = [os.path.realpath(p) for p in [os.getcwd()] + {writable}]
    _LIBRARY = sorted({{os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}})

    def _landlock():
        # Landlock (Documentation/userspace-api/landlock.rst): a ruleset handling every file access
        # this kernel's ABI knows, one rule granting all of them beneath the work directory and one
        # granting read / execute beneath the library; then no_new_privs and restrict_self.
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        abi = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # landlock_create_ruleset: version
        if abi < 1:
            return 0
        handled = (1 << 13) - 1  # ABI 1: execute ... make_sym
        handled |= (1 << 13) * (abi >= 2) | (1 << 14) * (abi >= 3) | (1 << 15) * (abi >= 5)  # refer, truncate, ioctl
        attr = ctypes.c_uint64(handled)
        ruleset = libc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(8), ctypes.c_uint32(0))
        if ruleset < 0:
            return 0
        class Beneath(ctypes.Structure):
            _pack_ = 1
            _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
        read = 1 | 4 | 8  # execute, read_file, read_dir
        for root, allowed in [(root, handled) for root in _WORK] + [(root, read) for root in _LIBRARY]:
            fd = os.open(root, os.O_PATH | os.O_CLOEXEC)
            rule = Beneath(allowed, fd)
            ok = libc.syscall(445, ruleset, 1, ctypes.byref(rule), ctypes.c_uint32(0)) == 0  # path_beneath
            os.close(fd)
            if not ok:
                return 0
        if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.syscall(446, ruleset, ctypes.c_uint32(0)) != 0:  # no_new_privs
            return 0
        os.close(ruleset)
        return abi

    _KERNEL = {kernel} and _landlock()
    for _name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[_name]  # so that the program's own `import ctypes` is an import, which the hook refuses
    if {report}:
        print("landlock (kernel, ABI " + str(_KERNEL) + ")" if _KERNEL else "audit hook (Python)", file=sys.stderr)

    def _within(path, roots):
        return any(path == root or path.startswith(root + os.sep) for root in roots)

    _WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    _CHANGES = ("os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.symlink", "os.link", "os.chmod",
                "os.chown", "os.truncate", "os.utime", "shutil.")

    def _file_allowed(event, args):
        if event == "open":
            path, mode, flags = args
            if not isinstance(path, (str, bytes)):  # an open file descriptor
                return True
            path = os.path.realpath(os.fsdecode(path))
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITES)
            return _within(path, _WORK) or (not writes and _within(path, _LIBRARY))
        if event in ("os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes)):
            return _within(os.path.realpath(os.fsdecode(args[0])), _WORK + _LIBRARY)
        if event.startswith(_CHANGES) and args and isinstance(args[0], (str, bytes)):
            return _within(os.path.realpath(os.fsdecode(args[0])), _WORK)
        return True

    _DENIED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
               "os.forkpty", "os.kill", "os.killpg", "ctypes.", "pty.")
    def _deny(event, args):
        if event.startswith(_DENIED) or (event == "import" and args[0] in ("ctypes", "_ctypes")):
            raise PermissionError("sandbox: " + event + " is not allowed")
        if not _KERNEL and not _file_allowed(event, args):
            raise PermissionError("sandbox: " + event + " outside the sandbox's directory is not allowed")
    sys.addaudithook(_deny)
    del resource
    _path = sys.argv[1]
    with open(_path) as _f:
        _code = compile(_f.read(), "program.py", "exec")
    exec(_code, {{"__name__": "__main__"}})
""")


_CHILD_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def file_boundary() -> str:
    """Which file boundary this machine's sandbox gets: "landlock (kernel, ABI n)" or "audit hook
    (Python)" (a kernel without Landlock, or one that refuses it)."""
    with tempfile.TemporaryDirectory(prefix="dsv3-sandbox-") as workdir:
        path = os.path.join(workdir, "program.py")
        open(path, "w").close()
        prelude = _prelude(cpu_s=2, memory_mb=512, kernel=True, report=True)
        out = subprocess.run([sys.executable, "-I", "-c", prelude, path], cwd=workdir, capture_output=True,
                             text=True, timeout=30, env=_CHILD_ENV)
    return out.stderr.strip().splitlines()[0]


def _prelude(cpu_s: int, memory_mb: int, kernel: bool, report: bool = False, writable: tuple[str, ...] = ()) -> str:
    return _PRELUDE.format(memory=memory_mb << 20, cpu_s=cpu_s, kernel=kernel, report=report,
                           writable=repr([str(p) for p in writable]))


def run_python(source: str, timeout_s: float = 2.0, memory_mb: int = 512, kernel_boundary: bool = True,
               writable: tuple[str, ...] = ()) -> SandboxResult:
    """Run `source` in a fresh isolated interpreter (`python -I`, empty temporary cwd) and report how
    it ended. The whole process group is killed at `timeout_s`; CPU time is capped at the same.
    `kernel_boundary=False`: the file boundary by the audit hook even where Landlock exists;
    `writable`: directories the program may use besides its own."""
    cpu_s = max(1, int(timeout_s + 0.999))
    prelude = _prelude(cpu_s, memory_mb, kernel_boundary, writable=writable)
    with tempfile.TemporaryDirectory(prefix="dsv3-sandbox-") as workdir:
        path = os.path.join(workdir, "program.py")
        with open(path, "w") as f:
            f.write(source)
        proc = subprocess.Popen([sys.executable, "-I", "-c", prelude, path], cwd=workdir, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                env=_CHILD_ENV)
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
