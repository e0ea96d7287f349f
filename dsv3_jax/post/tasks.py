"""Tasks for post-training: problem generators whose answers a rule can check.

A task samples problems from a seeded generator, splits them into disjoint train and held-out
sets (so held-out accuracy measures what the model learned, not what it saw), writes a worked
response for each (the SFT data), and names the reward (post/rewards.py) that scores a completion's
correctness, and optionally a separate format reward (a well-formed answer, right or wrong). A task
may also have an "ood" split: problems from outside the train distribution (longer operands, larger
targets), to see whether what was learned carries over. Register new ones with `@register_task`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from collections.abc import Callable

import numpy as np

from dsv3_jax.post.expressions import parse_expression

Split = str  # "train", "eval" (held out from the train distribution) or "ood" (outside it)


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
    format_reward: str = ""  # a name in REWARDS scoring the answer's form alone ("": none)
    has_ood: bool = False  # whether sample() accepts split="ood"


TASKS: dict[str, Task] = {}


def register_task(name: str, reward: str, max_new_tokens: int, format_reward: str = "", has_ood: bool = False):
    def register(sample: Callable[[np.random.Generator, Split], Problem]):
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        description = ((sample.__doc__ or "").strip().splitlines() or [""])[0]
        TASKS[name] = Task(name, reward, sample, max_new_tokens, description, format_reward, has_ood)
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


@register_task("arithmetic", reward="exact_answer", max_new_tokens=8, has_ood=True)
def arithmetic(rng: np.random.Generator, split: Split) -> Problem:
    """Addition "a+b=" -> the sum (a in 0..99, b in 0..9; ood: a in 100..999), scored on the exact final number."""
    if split == "ood":
        a, b = int(rng.integers(100, 1000)), int(rng.integers(0, 10))
    else:
        a, b = _sample_until(rng, split, lambda: (int(rng.integers(0, 100)), int(rng.integers(0, 10))))
    return Problem(prompt=f"{a}+{b}=", answer=str(a + b), response=str(a + b))


# Countdown: reach the target from the given numbers, each used once, with + - * / and brackets.
# Many expressions reach a target (orders, commutations, other operations): the reward accepts any
# (post/rewards.py countdown), the SFT data shows one. Problems come from a random expression over
# the numbers, so every problem has a solution; the split is by (sorted numbers, target).
COUNTDOWN_NUMBERS = 3
COUNTDOWN_TARGETS = {"train": (1, 49), "eval": (1, 49), "ood": (50, 99)}  # ood: never trained on
_SHAPES = ("{0}{o0}{1}{o1}{2}", "({0}{o0}{1}){o1}{2}", "{0}{o0}({1}{o1}{2})")


@register_task("countdown", reward="countdown", format_reward="countdown_format", max_new_tokens=12, has_ood=True)
def countdown(rng: np.random.Generator, split: Split) -> Problem:
    """Countdown "3,5,7:26=" -> an expression of 3, 5 and 7, each once, worth 26 (+ - * / and brackets)."""
    while True:
        numbers = [int(n) for n in rng.integers(1, 10, COUNTDOWN_NUMBERS)]
        order = [numbers[i] for i in rng.permutation(COUNTDOWN_NUMBERS)]
        o0, o1 = (str(o) for o in rng.choice(list("+-*/"), 2))
        expression = _SHAPES[int(rng.integers(len(_SHAPES)))].format(*order, o0=o0, o1=o1)
        value = parse_expression(expression).value
        low, high = COUNTDOWN_TARGETS[split]
        if value is None or value.denominator != 1 or not low <= value <= high:
            continue
        target = int(value)
        if split == "ood" or in_eval_split(*sorted(numbers), target) == (split == "eval"):
            return Problem(prompt=f"{','.join(map(str, numbers))}:{target}=", answer=str(target), response=expression)


@register_task("python_linear", reward="python_tests", max_new_tokens=16)
def python_linear(rng: np.random.Generator, split: Split) -> Problem:
    """Complete `def f(x): return ...` from its docstring; scored by running asserts in a sandbox."""
    m, c = _sample_until(rng, split, lambda: (int(rng.integers(1, 10)), int(rng.integers(0, 10))))
    prompt = f'def f(x):\n    """Return {m} times x plus {c}."""\n    return'
    tests = "\n".join(f"assert f({x}) == {m * x + c}" for x in (0, 1, 5, -3))
    return Problem(prompt=prompt, answer="", response=f" {m} * x + {c}\n", tests=tests)


def held_out(task: Task, n: int, seed: int = 1234, split: Split = "eval") -> list[Problem]:
    """A fixed held-out set of n problems from the task's eval split (or its ood split)."""
    if split == "ood" and not task.has_ood:
        raise ValueError(f"task {task.name!r} has no ood split")
    rng = np.random.default_rng(seed)
    return [task.sample(rng, split) for _ in range(n)]


def sft_examples(task: Task, n: int, seed: int = 0) -> list[dict]:
    """n worked examples from the task's train split, as SFT jsonl records."""
    rng = np.random.default_rng(seed)
    return [{"prompt": p.prompt, "response": p.response} for p in (task.sample(rng, "train") for _ in range(n))]
