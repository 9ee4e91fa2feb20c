"""Batched edit distance (fuseflow/align/levenshtein.py) against a textbook DP."""

from __future__ import annotations

import random

import numpy as np

from fuseflow.align.levenshtein import levenshtein, levenshtein_indexed, levenshtein_python
from fuseflow.align.tokens import code_points


def _random_strings(rng: random.Random, n: int, alphabet: str = "ab c\x00é東", max_len: int = 12) -> list[str]:
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len))) for _ in range(n)]


def test_pairs_matchlevenshtein_python():
    rng = random.Random(0)
    a, b = _random_strings(rng, 2000), _random_strings(rng, 2000)
    got = levenshtein(a, b)
    assert got.tolist() == [levenshtein_python(x, y) for x, y in zip(a, b)]


def test_known_values():
    assert levenshtein(["kitten", "", "abc", "flaw"], ["sitting", "abc", "", "lawn"]).tolist() == [3, 3, 3, 2]


def test_indexed_matcheslevenshtein_python():
    rng = random.Random(1)
    left, right = _random_strings(rng, 50, max_len=20), _random_strings(rng, 70, max_len=20)
    ca, la = code_points(left)
    cb, lb = code_points(right)
    ia = np.array([rng.randrange(50) for _ in range(3000)])
    ib = np.array([rng.randrange(70) for _ in range(3000)])
    got = levenshtein_indexed(ca, la, ia, cb, lb, ib)
    assert got.tolist() == [levenshtein_python(left[i], right[j]) for i, j in zip(ia, ib)]
