"""Fixtures of the wire tests: random aligned distributions (the Redis-protocol server is in tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest

from fuseflow.sparse import AlignedDist


@pytest.fixture(scope="session")
def make_dist():
    """Factory of random, well-formed AlignedDists: ``make_dist(T, k, seed, pad_frac=0.2, meta=None)``."""
    return random_dist


def random_dist(t: int, k: int, seed: int, pad_frac: float = 0.2, meta: dict | None = None) -> AlignedDist:
    """A well-formed AlignedDist: rows descending, some -inf padding (id 0), some unaligned rows."""
    rng = np.random.default_rng(seed)
    logprobs = -np.sort(rng.exponential(4.0, size=(t, k)), axis=1).astype(np.float32)  # [T, k] descending
    ids = rng.integers(1, 100_000, size=(t, k)).astype(np.int32)  # [T, k]
    pad = rng.random((t, k)) < pad_frac
    pad[:, 0] = False
    pad = np.maximum.accumulate(pad, axis=1)  # padding only at the tail of a row
    logprobs[pad] = -np.inf
    ids[pad] = 0
    gold = -rng.exponential(2.0, size=t).astype(np.float32)  # [T]
    aligned = rng.random(t) < 0.8  # [T]
    return AlignedDist(
        ids=ids,
        logprobs=logprobs,
        gold_logprobs=np.where(aligned, gold, np.float32(0)),  # [T]: 0 where not aligned (the convention)
        aligned=aligned,
        meta=meta if meta is not None else {"seed": seed},
    )
