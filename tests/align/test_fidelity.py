"""Fidelity of aligned rows (fuseflow/align/fidelity.py) against a per-position loop."""

from __future__ import annotations

import math

import pytest
import torch

from fuseflow.align.fidelity import fidelity_summary, row_fidelity


def _reference(ids, logprobs, aligned, gold_ids, mask):
    positions = covered = missed = p_sum = 0.0
    for t in range(ids.shape[0]):
        if not mask[t]:
            continue
        positions += 1
        if not aligned[t]:
            continue
        covered += 1
        row = [(int(i), float(lp)) for i, lp in zip(ids[t], logprobs[t]) if lp > -math.inf]
        z = sum(math.exp(lp) for _, lp in row)
        p = sum(math.exp(lp) / z for i, lp in row if i == int(gold_ids[t]))
        missed += p == 0
        p_sum += p
    return [positions, covered, missed, p_sum]


@pytest.mark.parametrize("seed", range(4))
def test_row_fidelity_matches_a_loop(seed):
    g = torch.Generator().manual_seed(seed)
    n, t, k, v = 3, 40, 5, 9
    ids = torch.randint(0, v, (n, t, k), generator=g)
    logprobs = torch.randn(n, t, k, generator=g).log_softmax(-1) - torch.rand(n, t, 1, generator=g)
    logprobs[torch.rand(n, t, k, generator=g) < 0.2] = -math.inf  # padding (and a few all-padding rows)
    aligned = torch.rand(n, t, generator=g) < 0.7
    gold = torch.randint(0, v, (t,), generator=g)
    mask = torch.rand(t, generator=g) < 0.8
    got = row_fidelity(ids, logprobs, aligned, gold, mask)  # [N, 4]
    for i in range(n):
        torch.testing.assert_close(got[i], torch.tensor(_reference(ids[i], logprobs[i], aligned[i], gold, mask),
                                                        dtype=torch.float64))
    s = fidelity_summary(got[0])
    ref = _reference(ids[0], logprobs[0], aligned[0], gold, mask)
    assert s == pytest.approx({"coverage": ref[1] / ref[0], "miss_rate": ref[2] / ref[1], "p_gold": ref[3] / ref[1],
                               "positions": ref[0]})


def test_fidelity_of_nothing_is_zero():
    assert fidelity_summary([0, 0, 0, 0]) == {"coverage": 0.0, "miss_rate": 0.0, "p_gold": 0.0, "positions": 0}
