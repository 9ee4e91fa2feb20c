"""plan_batches: every request once, padded budget and batch size respected, padding small when sorted."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuseflow.score.batching import padded_tokens, plan_batches


def _check_plan(lengths, budget, max_size, batches):
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths))), "every index exactly once"
    for b in batches:
        assert b, "no empty batch"
        assert len(b) <= max_size
        cost = len(b) * max(lengths[i] for i in b)
        if len(b) > 1:
            assert cost <= budget, (b, cost, budget)
    # Longest first: the plan walks the requests in non-increasing length.
    ordered = [lengths[i] for i in flat]
    assert all(x >= y for x, y in zip(ordered, ordered[1:]))
    # Greedy: a batch is closed only when the next request could not have joined it.
    for prev, nxt in zip(batches, batches[1:]):
        full = len(prev) == max_size
        over = (len(prev) + 1) * max(lengths[i] for i in prev) > budget
        assert full or over, (prev, nxt)


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 300), max_size=60),
    budget=st.integers(1, 1200),
    max_size=st.integers(1, 16),
)
def test_plan_properties(lengths, budget, max_size):
    batches = plan_batches(lengths, budget, max_size)
    _check_plan(lengths, budget, max_size, batches)


def test_longest_first_and_greedy_fill():
    lengths = [3, 10, 5, 10, 1, 7]
    # sorted (stable, longest first): 1(10) 3(10) 5(7) 2(5) 0(3) 4(1)
    assert plan_batches(lengths, max_batch_tokens=20, max_batch_size=8) == [[1, 3], [5, 2], [0, 4]]
    assert plan_batches(lengths, max_batch_tokens=100, max_batch_size=4) == [[1, 3, 5, 2], [0, 4]]
    assert plan_batches(lengths, max_batch_tokens=100, max_batch_size=1) == [[1], [3], [5], [2], [0], [4]]


def test_request_longer_than_budget_is_alone():
    assert plan_batches([50, 4, 4], max_batch_tokens=16, max_batch_size=8) == [[0], [1, 2]]


def test_sorting_keeps_padding_small():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 512, size=400)
    batches = plan_batches(lengths, max_batch_tokens=4096, max_batch_size=64)
    _check_plan(lengths.tolist(), 4096, 64, batches)
    # Reference: the same budget in request order, no sorting; sorting must waste far less.
    unsorted, cur = [], []
    for i, n in enumerate(lengths):
        if cur and (len(cur) + 1) * max(lengths[cur + [i]]) > 4096:
            unsorted.append(cur)
            cur = []
        cur.append(i)
    unsorted.append(cur)
    real = int(lengths.sum())
    waste_sorted = padded_tokens(lengths, batches) - real
    waste_unsorted = padded_tokens(lengths, unsorted) - real
    assert waste_sorted < 0.05 * real
    assert waste_sorted < waste_unsorted / 5


@pytest.mark.parametrize("budget,size", [(0, 4), (8, 0)])
def test_rejects_bad_limits(budget, size):
    with pytest.raises(ValueError):
        plan_batches([1, 2], budget, size)


def test_rejects_negative_length():
    with pytest.raises(ValueError, match="index 1"):
        plan_batches([1, -2], 8, 4)
