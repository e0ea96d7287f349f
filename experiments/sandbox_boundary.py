"""Which file boundary the code sandbox gets on this machine, and what it refuses (post/rewards.py).

Command:   uv run python experiments/sandbox_boundary.py
Runtime:   a few seconds.
Writes:    experiments/results/sandbox_boundary.md (tests/test_rewards.py asserts the same cases).
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

from dsv3_jax.post.rewards import file_boundary, run_python

RESULTS = Path(__file__).parent / "results" / "sandbox_boundary.md"
PROGRAMS = ["open('../escaped.txt', 'w').write('x')", "open('/etc/passwd').read()", "import os; os.listdir('/')",
            "open('mine.txt', 'w').write('x'); assert open('mine.txt').read() == 'x'", "import json, fractions"]


def main() -> None:
    cell = lambda r: r.status + (f": {r.detail[:70]}" if r.detail else "")  # noqa: E731
    lines = ["# The code sandbox's file boundary (post/rewards.py)", "",
             f"`uv run python experiments/sandbox_boundary.py` ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
             f"Linux {platform.release()}); `file_boundary()`: **{file_boundary()}**. Each program run by "
             "`run_python` with the kernel boundary (the default) and with `kernel_boundary=False` (the audit hook).",
             "", "| program | kernel boundary where available | audit hook |", "|---|---|---|"]
    for body in PROGRAMS:
        kernel, hook = (run_python(body, timeout_s=5, kernel_boundary=k) for k in (True, False))
        lines.append(f"| `{body}` | {cell(kernel)} | {cell(hook)} |")
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
