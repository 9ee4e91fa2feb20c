"""Joint reranking of candidate segments: every source scores every candidate, a rule combines the scores.

Each rule takes, for ``S`` scoring sources and ``C`` candidates, the summed log-likelihood of each
candidate's tokens given the shared prefix in each source's own tokenization (``logprob_sums`` [S, C],
natural log), the number of those tokens (``token_counts`` [S, C]) and the candidate's length in UTF-8
bytes (``byte_counts`` [C]); it returns one score per candidate, higher is better. The decoder keeps the
argmax (ties: the first candidate, i.e. the earliest source in the config).

Per-token averages differ in meaning across tokenizers (a 262k-vocabulary token covers more text than a
49k one); ``mean_bits_per_byte`` normalises by text length instead, which every source agrees on.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fuseflow.registry import Registry

RerankFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
RERANKERS: Registry[RerankFn] = Registry("rerank method", field="decoding.rerank")

# exp() of a per-token NLL above this is inf in float64; such a candidate is hopeless anyway.
_MAX_LOG_PPL = 700.0


def _per_token_nll(logprob_sums: np.ndarray, token_counts: np.ndarray) -> np.ndarray:
    counts = np.maximum(np.asarray(token_counts, dtype=np.float64), 1.0)  # [S, C]
    return -np.asarray(logprob_sums, dtype=np.float64) / counts  # [S, C]


@RERANKERS.register("mean_perplexity")
def mean_perplexity(logprob_sums: np.ndarray, token_counts: np.ndarray, byte_counts: np.ndarray) -> np.ndarray:
    """Cool-Fusion's rule (arXiv 2407.19807, joint reranking by perplexity): each source computes the perplexity of
    each candidate segment in its own tokens, and the candidate with the lowest perplexity averaged over the
    sources wins. Returns minus the mean perplexity, [C]."""
    ppl = np.exp(np.minimum(_per_token_nll(logprob_sums, token_counts), _MAX_LOG_PPL))  # [S, C]
    return -ppl.mean(axis=0)


@RERANKERS.register("mean_logprob")
def mean_logprob(logprob_sums: np.ndarray, token_counts: np.ndarray, byte_counts: np.ndarray) -> np.ndarray:
    """Mean over sources of the mean per-token log-likelihood (= minus the log of the geometric mean of
    the sources' perplexities): less swayed than ``mean_perplexity`` by one source that finds a candidate
    very unlikely. Returns [C]."""
    return -_per_token_nll(logprob_sums, token_counts).mean(axis=0)


@RERANKERS.register("mean_bits_per_byte")
def mean_bits_per_byte(logprob_sums: np.ndarray, token_counts: np.ndarray, byte_counts: np.ndarray) -> np.ndarray:
    """Mean over sources of minus the bits per UTF-8 byte of the candidate: a length normalisation that does
    not depend on how finely each tokenizer splits the text. Returns [C]."""
    nbytes = np.maximum(np.asarray(byte_counts, dtype=np.float64), 1.0)  # [C]
    bits = -np.asarray(logprob_sums, dtype=np.float64) / np.log(2.0) / nbytes[None, :]  # [S, C]
    return -bits.mean(axis=0)


@RERANKERS.register("mixture_likelihood")
def mixture_likelihood(logprob_sums: np.ndarray, token_counts: np.ndarray, byte_counts: np.ndarray) -> np.ndarray:
    """Log-likelihood of the candidate under the uniform mixture of the sources, ``log mean_j p_j(segment)``,
    not normalised by length: the candidates are alternatives for the same next stretch of text, each ending
    on a boundary every source shares, so their probabilities compare directly. The mixture is a proper
    density (the one ``eval-ensemble``'s bits per byte reports), and a source that is sure of its candidate
    carries it: where the sources lead in different languages (issue 16's next-word task), the one that
    knows the language decides, instead of the other vetoing its words as an average of perplexities or of
    log-probabilities lets it. Returns [C]."""
    sums = np.asarray(logprob_sums, dtype=np.float64)  # [S, C]
    top = sums.max(axis=0)  # [C]
    return top + np.log(np.exp(sums - top).mean(axis=0))


def rerank(
    method: str, logprob_sums: np.ndarray, token_counts: np.ndarray, byte_counts: np.ndarray
) -> tuple[int, np.ndarray]:
    """Scores [C] of the candidates under ``method`` and the index of the winner."""
    rule = RERANKERS.lookup(method)
    sums = np.asarray(logprob_sums, dtype=np.float64)
    if sums.ndim != 2 or sums.shape[1] == 0:
        raise ValueError(f"logprob_sums must be [sources, candidates] with at least one candidate, got {sums.shape}")
    scores = rule(sums, np.asarray(token_counts), np.asarray(byte_counts))  # [C]
    return int(np.argmax(scores)), scores
