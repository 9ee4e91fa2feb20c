"""Rerank rules against per-candidate reference loops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fuseflow.ensemble.rerank import RERANKERS, rerank


def reference(method: str, sums, counts, nbytes) -> list[float]:
    s, c = len(sums), len(sums[0])
    out = []
    for j in range(c):
        if method == "mean_perplexity":
            out.append(-sum(math.exp(-sums[i][j] / counts[i][j]) for i in range(s)) / s)
        elif method == "mean_logprob":
            out.append(sum(sums[i][j] / counts[i][j] for i in range(s)) / s)
        elif method == "mixture_likelihood":
            out.append(math.log(sum(math.exp(sums[i][j]) for i in range(s)) / s))
        else:
            out.append(sum(sums[i][j] / math.log(2) / nbytes[j] for i in range(s)) / s)
    return out


@pytest.mark.parametrize("method", sorted(RERANKERS))
@pytest.mark.parametrize("seed", range(5))
def test_rerank_matches_reference(method, seed):
    rng = np.random.default_rng(seed)
    s, c = int(rng.integers(1, 4)), int(rng.integers(1, 6))
    counts = rng.integers(1, 8, size=(s, c))
    sums = -rng.uniform(0.1, 4.0, size=(s, c)) * counts
    nbytes = rng.integers(1, 30, size=c)
    win, scores = rerank(method, sums, counts, nbytes)
    ref = reference(method, sums.tolist(), counts.tolist(), nbytes.tolist())
    np.testing.assert_allclose(scores, ref, rtol=1e-10)
    assert win == int(np.argmax(ref))


def test_mean_perplexity_and_mean_logprob_can_disagree():
    # Candidate 0: both sources find it fair. Candidate 1: one loves it, one hates it. The arithmetic mean of
    # perplexities (the paper's rule) punishes the hated one harder than the mean log-probability does.
    sums = np.array([[-2.0, -0.1], [-2.0, -3.5]])
    counts = np.ones((2, 2))
    assert rerank("mean_perplexity", sums, counts, np.ones(2))[0] == 0
    assert rerank("mean_logprob", sums, counts, np.ones(2))[0] == 1


def test_unknown_method_names_the_config_field():
    with pytest.raises(ValueError, match="decoding.rerank"):
        rerank("nope", np.zeros((1, 1)), np.ones((1, 1)), np.ones(1))


def test_mixture_likelihood_lets_the_sure_source_decide_and_does_not_normalise_length():
    # Candidate 0: source 0 is sure of it (p 0.5), source 1 finds it unlikely (p 0.001). Candidate 1: both find
    # it so-so (p 0.05). The mixture keeps candidate 0 (0.25 vs 0.05); averaging log-probabilities vetoes it.
    sums = np.log(np.array([[0.5, 0.05], [0.001, 0.05]]))
    counts = np.ones((2, 2))
    assert rerank("mixture_likelihood", sums, counts, np.ones(2))[0] == 0
    assert rerank("mean_logprob", sums, counts, np.ones(2))[0] == 1
    # No length normalisation: a likelier short candidate beats a long one with cheap tokens after its first.
    sums = np.array([[-1.0, -3.0], [-1.0, -3.0]])
    counts = np.array([[1, 6], [1, 6]])
    assert rerank("mixture_likelihood", sums, counts, np.array([3, 12]))[0] == 0
    assert rerank("mean_perplexity", sums, counts, np.array([3, 12]))[0] == 1
