"""Tasks for post-training: problem generators whose answers a rule can check.

A task samples problems from a seeded generator, splits them into disjoint train and held-out
sets (so held-out accuracy measures what the model learned, not what it saw), writes a worked
response for each (the SFT data), and names the reward (post/rewards.py) that scores a completion.
Register new ones with `@register_task`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from collections.abc import Callable

import numpy as np

Split = str  # "train" or "eval"


@dataclass(frozen=True)
class Problem:
    prompt: str  # what the model is given
    answer: str  # the reference a rule compares against (a final number; for code, unused)
    response: str  # a correct response (SFT data)
    tests: str = ""  # code tasks: asserts run after the completed program


@dataclass(frozen=True)
class Task:
    name: str
    reward: str  # a name in post/rewards.py REWARDS
    sample: Callable[[np.random.Generator, Split], Problem]
    max_new_tokens: int  # enough for a correct response and its EOS
    description: str


TASKS: dict[str, Task] = {}


def register_task(name: str, reward: str, max_new_tokens: int):
    def register(sample: Callable[[np.random.Generator, Split], Problem]):
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        TASKS[name] = Task(name, reward, sample, max_new_tokens, ((sample.__doc__ or "").strip().splitlines() or [""])[0])
        return sample
    return register


def in_eval_split(*key: int) -> bool:
    """A fixed 1-in-8 share of a task's problem space is held out (a hash, not the sampling seed)."""
    return zlib.crc32(repr(key).encode()) % 8 == 0


def _sample_until(rng: np.random.Generator, split: Split, draw: Callable[[], tuple[int, ...]]) -> tuple[int, ...]:
    while True:
        key = draw()
        if in_eval_split(*key) == (split == "eval"):
            return key


@register_task("arithmetic", reward="exact_answer", max_new_tokens=8)
def arithmetic(rng: np.random.Generator, split: Split) -> Problem:
    """Addition "a+b=" -> the sum (a in 0..99, b in 0..9), scored on the exact final number."""
    a, b = _sample_until(rng, split, lambda: (int(rng.integers(0, 100)), int(rng.integers(0, 10))))
    return Problem(prompt=f"{a}+{b}=", answer=str(a + b), response=str(a + b))


@register_task("python_linear", reward="python_tests", max_new_tokens=16)
def python_linear(rng: np.random.Generator, split: Split) -> Problem:
    """Complete `def f(x): return ...` from its docstring; scored by running asserts in a sandbox."""
    m, c = _sample_until(rng, split, lambda: (int(rng.integers(1, 10)), int(rng.integers(0, 10))))
    prompt = f'def f(x):\n    """Return {m} times x plus {c}."""\n    return'
    tests = "\n".join(f"assert f({x}) == {m * x + c}" for x in (0, 1, 5, -3))
    return Problem(prompt=prompt, answer="", response=f" {m} * x + {c}\n", tests=tests)


def held_out(task: Task, n: int, seed: int = 1234) -> list[Problem]:
    """A fixed held-out set of n problems from the task's eval split."""
    rng = np.random.default_rng(seed)
    return [task.sample(rng, "eval") for _ in range(n)]


def sft_examples(task: Task, n: int, seed: int = 0) -> list[dict]:
    """n worked examples from the task's train split, as SFT jsonl records."""
    rng = np.random.default_rng(seed)
    return [{"prompt": p.prompt, "response": p.response} for p in (task.sample(rng, "train") for _ in range(n))]
