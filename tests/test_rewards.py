"""Rule-based rewards (post/rewards.py): exact final answers, and code run against its tests in the
sandbox, which must score every way a program can end without harming the caller."""

import tempfile
from fractions import Fraction
import time
from pathlib import Path

import numpy as np
import pytest

from dsv3_jax.post.expressions import Parsed, parse_expression
from dsv3_jax.post.rewards import REWARDS, file_boundary, run_python
from dsv3_jax.post.tasks import TASKS, Problem, held_out

TIMEOUT_S = 1.5


@pytest.mark.parametrize("completion, reward", [
    ("148", 1.0), (" 148", 1.0), ("is 148", 1.0), ("148.", 1.0),
    ("147", 0.0), ("1480", 0.0), ("148 or 149", 0.0), ("", 0.0), ("one hundred", 0.0),
])
def test_exact_answer_reads_the_final_number(completion, reward):
    assert REWARDS["exact_answer"](completion, Problem("85+63=", "148", "148")) == reward


@pytest.mark.parametrize("body, status", [
    ("def f(x):\n    return 3 * x + 1\nassert f(2) == 7\n", "passed"),
    ("def f(x):\n    return 3 * x\nassert f(2) == 7\n", "failed"),  # wrong answer
    ("while True:\n    pass\n", "timeout"),  # never ends
    ("raise RuntimeError('boom')\n", "failed"),  # crashes
    ("import faulthandler\nfaulthandler._sigsegv()\n", "killed"),  # a segfault in C code
    ("x = bytearray(4 << 30)\n", "failed"),  # over the memory limit: MemoryError
    ("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", "failed"),  # no network
    ("import os\nos.system('true')\n", "failed"),  # no processes
    ("import ctypes\n", "failed"),
    ("x = bytearray(2 << 30)\n", "failed"),  # 2 GB: over the 512 MB address-space limit
    ("import os\nwhile True:\n    os.fork()\n", "failed"),  # a fork bomb: no new processes
    ("import subprocess\nsubprocess.run(['true'])\n", "failed"),
])
def test_sandbox_scores_each_ending_within_its_time_limit(body, status):
    start = time.perf_counter()
    result = run_python(body, timeout_s=TIMEOUT_S)
    elapsed = time.perf_counter() - start
    assert result.status == status, result
    assert elapsed < TIMEOUT_S + 2.0  # the interpreter's start-up is the rest
    if body.startswith(("import socket", "import os")):
        assert "sandbox" in result.detail


def test_a_timed_out_program_is_stopped_not_left_running(tmp_path):
    marker = tmp_path / "alive"
    body = f"import time\nwhile True:\n    open({str(marker)!r}, 'w').write(str(time.time()))\n    time.sleep(0.05)\n"
    assert run_python(body, timeout_s=0.5, writable=(str(tmp_path),)).status == "timeout"
    before = marker.stat().st_mtime
    time.sleep(0.3)
    assert marker.stat().st_mtime == before


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel-where-it-can", "audit-hook"])
def test_files_outside_the_sandbox_directory_are_neither_written_nor_read(tmp_path, kernel):
    """Writes only in its own directory, reads only there and in the standard library: by Landlock
    where the kernel has it (file_boundary() says), by the audit hook otherwise (or when asked)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("x")
    escaped = f"dsv3-escaped-{kernel}-{time.time_ns()}.txt"  # beside the sandbox's own directory
    cases = {f"open('../{escaped}', 'w').write('x')": "failed", f"open({str(secret)!r}).read()": "failed",
             f"open({str(outside / 'new.txt')!r}, 'w')": "failed", "open('/etc/passwd').read()": "failed",
             f"import os\nos.remove({str(secret)!r})": "failed",
             "open('mine.txt', 'w').write('x')\nassert open('mine.txt').read() == 'x'": "passed",
             "import fractions, json\nassert json.loads('[1]') == [1]": "passed"}  # the library is readable
    by_kernel = kernel and file_boundary().startswith("landlock")
    for body, status in cases.items():
        result = run_python(body, timeout_s=5, kernel_boundary=kernel)
        assert result.status == status, (body, result)
        if status == "failed":
            assert "PermissionError" in result.detail, (body, result)
            assert ("sandbox:" not in result.detail) == by_kernel, (body, result)  # the kernel's EACCES, not the hook
    assert secret.read_text() == "x" and not (outside / "new.txt").exists()
    assert not (Path(tempfile.gettempdir()) / escaped).exists()
    assert file_boundary() == "audit hook (Python)" or file_boundary().startswith("landlock (kernel, ABI ")


def test_code_reward_on_the_python_task():
    task = TASKS["python_linear"]
    problem = held_out(task, 1)[0]
    reward = REWARDS[task.reward]
    assert reward(problem.response, problem) == 1.0
    assert reward(" x\n", problem) == 0.0
    assert reward(" (\n", problem) == 0.0  # a syntax error
    start = time.perf_counter()
    assert reward(" x\nwhile True: pass\n", problem) == 0.0  # loops before its tests: a timeout scores 0
    assert time.perf_counter() - start < 6.0


@pytest.mark.parametrize("task_name", ["arithmetic", "countdown"])
def test_task_splits_are_disjoint_and_seeded(task_name):
    task = TASKS[task_name]
    rng = np.random.default_rng(0)
    train = {p.prompt for p in (task.sample(rng, "train") for _ in range(2000))}
    held, ood = {p.prompt for p in held_out(task, 200)}, {p.prompt for p in held_out(task, 200, split="ood")}
    assert not train & held and not train & ood and not held & ood
    assert [p.prompt for p in held_out(task, 20)] == [p.prompt for p in held_out(task, 20)]
    reward = REWARDS[task.reward]
    for p in held_out(task, 50) + held_out(task, 50, split="ood"):
        assert reward(p.response, p) == 1.0  # the worked response is rewarded


# "8,3,2:13=": 8, 3 and 2, each once, worth 13.
COUNTDOWN = Problem("8,3,2:13=", "13", "8+3+2")


@pytest.mark.parametrize("completion, correct, well_formed", [
    ("8+3+2", 1, 1), ("2+3+8", 1, 1), ("(8-3)*2+3", 0, 0), ("8*2-3", 1, 1), ("  2 * 8 - 3 ", 1, 1),  # any order
    ("8/(3-3)+2", 0, 0),  # division by zero (and 3 used twice)
    ("2/(8-8)", 0, 0),
    ("8*3/2+1", 0, 0),  # 1 is not given
    ("8+3", 0, 0),  # 2 left out
    ("8+3+3", 0, 0),  # a number used twice
    ("8+3+2=13", 0, 0), ("8+3+2 is 13", 0, 0), ("8+3+2)", 0, 0), ("(8+3+2", 0, 0),  # extra or missing tokens
    ("13", 0, 0), ("", 0, 0), ("8++3+2", 0, 0), ("-8+3+2", 0, 0), ("8+3+2.0", 0, 0),  # not an expression of them
    ("8+3*2", 0, 1),  # well-formed, the wrong value (precedence: 14)
    ("8/2*3", 0, 1),  # 12
    ("(8+2)/2*3-2", 0, 0),  # too many numbers
    ("3/2*8+1", 0, 0),
    ("8*3/2", 0, 1),  # 12
    ("8/3*2", 0, 1),  # 16/3: exact fractions, not rounded to an integer
])
def test_countdown_reward_parses_and_checks_the_expression(completion, correct, well_formed):
    assert REWARDS["countdown"](completion, COUNTDOWN) == correct
    assert REWARDS["countdown_format"](completion, COUNTDOWN) == well_formed


def test_countdown_values_are_exact_fractions():
    problem = Problem("8,3,3:8=", "8", "")
    assert REWARDS["countdown"]("8/3*3", problem) == 1.0  # 8/3 is not rounded
    assert REWARDS["countdown"]("8/(3*3)", problem) == 0.0
    assert parse_expression("7/2") == Parsed(Fraction(7, 2), (7, 2))
    assert parse_expression("(1+2)*(3") is None and parse_expression("import os") is None
    assert parse_expression("4/(2-2)") == Parsed(None, (4, 2, 2))
    zero = Problem("4,4,3:3=", "3", "")
    assert REWARDS["countdown"]("3/(4-4)", zero) == 0.0 and REWARDS["countdown_format"]("3/(4-4)", zero) == 1.0
