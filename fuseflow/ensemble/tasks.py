"""Small task sets with checkable answers, generated from a seed: no dataset download, same problems on
every machine. Each task is registered by name (``eval.task``) and gives problems, a few-shot prompt, the
stop strings that end an answer and the answer check.

``arithmetic``: one- and two-step word problems in the style of GSM8K (Cobbe et al. 2021, the benchmark on
which Cool-Fusion reports its largest gains), small numbers, integer answers, few-shot prompt
``Question: … / Answer: N``. ``arithmetic-1step`` keeps the one-step templates only (for small models).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: int


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[[int, int], list[Problem]]  # (n, seed) → problems
    stop: tuple[str, ...]

    def problems(self, n: int, seed: int) -> list[Problem]:
        return self.make(n, seed)

    def shots(self, k: int, seed: int) -> list[Problem]:
        """``k`` solved examples, drawn from a stream disjoint from :meth:`problems`' for the same seed."""
        return self.make(k, seed + 1_000_003) if k else []

    def prompt(self, problem: Problem, shots: list[Problem]) -> str:
        solved = "".join(f"Question: {s.question}\nAnswer: {s.answer}\n\n" for s in shots)
        return f"{solved}Question: {problem.question}\nAnswer:"

    @staticmethod
    def extract(text: str) -> int | None:
        """The first integer in the answer text (``-3``, ``1,200``), or ``None``."""
        m = re.search(r"-?\d[\d,]*", text)
        if m is None:
            return None
        digits = m.group(0).replace(",", "")
        return int(digits) if digits.lstrip("-").isdigit() else None

    def correct(self, text: str, problem: Problem) -> bool:
        return self.extract(text) == problem.answer


TASKS: dict[str, Task] = {}


def register_task(name: str, stop: tuple[str, ...] = ("\n",)):
    def wrap(make: Callable[[int, int], list[Problem]]):
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        TASKS[name] = Task(name, make, stop)
        return make

    return wrap


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (eval.task); choose one of {sorted(TASKS)}")
    return TASKS[name]


# ----------------------------------------------------------------------------------------------------------
# Arithmetic word problems.
# ----------------------------------------------------------------------------------------------------------

_NAMES = ("Tom", "Anna", "Ravi", "Mei", "Lucas", "Sara", "Omar", "Lena", "Kofi", "Ines")
_ITEMS = ("apples", "pencils", "marbles", "stickers", "books", "coins", "cards", "shells")


def _one_step(rng: np.random.Generator, name: str, item: str) -> tuple[str, int]:
    kind = rng.integers(3)
    if kind == 0:
        a, b = (int(x) for x in rng.integers(1, 20, size=2))
        return f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?", a + b
    if kind == 1:
        a = int(rng.integers(5, 30))
        b = int(rng.integers(1, a))
        return f"{name} had {a} {item} and gave {b} away. How many {item} does {name} have left?", a - b
    a, b = (int(x) for x in rng.integers(2, 10, size=2))
    return f"{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?", a * b


def _two_step(rng: np.random.Generator, name: str, item: str) -> tuple[str, int]:
    a, b = (int(x) for x in rng.integers(2, 20, size=2))
    c = int(rng.integers(1, a + b))
    return (
        f"{name} has {a} {item}, buys {b} more and then gives {c} to a friend. How many {item} does {name} have now?",
        a + b - c,
    )


def _arithmetic(n: int, seed: int, two_step_share: float) -> list[Problem]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        name, item = _NAMES[rng.integers(len(_NAMES))], _ITEMS[rng.integers(len(_ITEMS))]
        q, a = (_two_step if rng.random() < two_step_share else _one_step)(rng, name, item)
        out.append(Problem(f"arith-{seed}-{i}", q, a))
    return out


@register_task("arithmetic")
def arithmetic(n: int, seed: int) -> list[Problem]:
    """One-step (+, −, ×) and two-step (+ then −) problems, a third of them two-step."""
    return _arithmetic(n, seed, two_step_share=1 / 3)


@register_task("arithmetic-1step")
def arithmetic_one_step(n: int, seed: int) -> list[Problem]:
    """One-step problems only."""
    return _arithmetic(n, seed, two_step_share=0.0)
