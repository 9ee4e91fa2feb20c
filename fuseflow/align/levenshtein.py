"""Levenshtein (edit) distances for many string pairs at once, in numpy.

The distance is the one ``editdistance.eval`` computes (unit insert / delete / substitute), which FuseLLM
uses for MinED vocabulary mapping and for its DTW sequence alignment. Pairs are processed row by row of
the dynamic-programming table, all pairs of a batch at once; the within-row insertion chain is a running
minimum (``D[i, j] = j + min_{k<=j}(M[k] - k)``), so the only Python loop is over characters of the
longest string in a batch, never over pairs.
"""

from __future__ import annotations

import numpy as np

from fuseflow.align.tokens import code_points

# Pairs per numpy batch: bounds the [P, W] working arrays to a few MiB.
_BATCH_PAIRS = 1 << 17


def levenshtein_python(a: str, b: str) -> int:
    """The textbook dynamic program on one pair, row by row in plain Python: the slow reference the tests check
    the array versions against, and the per-pair cost FuseLLM's own alignment pays (``bench/align.py``)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def levenshtein_padded(a: np.ndarray, la: np.ndarray, b: np.ndarray, lb: np.ndarray) -> np.ndarray:
    """Edit distance of each row pair: ``a [P, Wa]`` / ``b [P, Wb]`` code points with lengths ``la``/``lb [P]``.

    Padding beyond a row's length may hold anything: the distance of a prefix never reads past it.
    Returns ``[P] int32``.
    """
    p = a.shape[0]
    out = np.zeros(p, dtype=np.int32)  # [P]
    if p == 0:
        return out
    for s in range(0, p, _BATCH_PAIRS):
        sl = slice(s, min(s + _BATCH_PAIRS, p))
        out[sl] = _levenshtein_batch(a[sl], la[sl], b[sl], lb[sl])
    return out


def _levenshtein_batch(a, la, b, lb) -> np.ndarray:
    wa = int(la.max(initial=0))
    wb = int(lb.max(initial=0))
    a = a[:, :wa]  # [P, Wa]
    b = b[:, :wb]  # [P, Wb]
    p = a.shape[0]
    dtype = np.int16 if max(wa, wb) < 16_000 else np.int32
    cols = np.arange(wb + 1, dtype=dtype)  # [Wb+1]
    rows = np.arange(p)
    row = np.broadcast_to(cols, (p, wb + 1)).copy()  # [P, Wb+1]: D[0, j] = j
    out = lb.astype(np.int32).copy()  # distance to the empty string, for la == 0
    for i in range(1, wa + 1):
        sub = row[:, :-1] + (a[:, i - 1 : i] != b)  # [P, Wb]  substitute (or match)
        dele = row[:, 1:] + 1  # [P, Wb]  delete a[i-1]
        best = np.empty_like(row)  # [P, Wb+1]
        best[:, 0] = i
        np.minimum(sub, dele, out=best[:, 1:])
        best -= cols
        np.minimum.accumulate(best, axis=1, out=best)  # insertions: running minimum along the row
        best += cols
        row = best
        done = la == i
        if done.any():
            out[done] = row[rows[done], lb[done]]
    return out


def levenshtein(pairs_a, pairs_b) -> np.ndarray:
    """Edit distance between ``pairs_a[i]`` and ``pairs_b[i]`` (two equal-length sequences of strings)."""
    if len(pairs_a) != len(pairs_b):
        raise ValueError(f"levenshtein: {len(pairs_a)} strings on the left, {len(pairs_b)} on the right")
    a, la = code_points(pairs_a)
    b, lb = code_points(pairs_b)
    return levenshtein_padded(a, la, b, lb)


def levenshtein_indexed(
    codes_a: np.ndarray, len_a: np.ndarray, idx_a: np.ndarray, codes_b: np.ndarray, len_b: np.ndarray, idx_b: np.ndarray
) -> np.ndarray:
    """Edit distance between ``a[idx_a[p]]`` and ``b[idx_b[p]]`` for every pair ``p``, where ``a``/``b`` are
    padded code-point tables (:func:`fuseflow.align.tokens.code_points`).

    Pairs are grouped by length before batching so that a batch pads to its own longest string, not to the
    longest token of the vocabulary. Returns ``[P] int32``.
    """
    p = len(idx_a)
    out = np.zeros(p, dtype=np.int32)  # [P]
    if p == 0:
        return out
    la = len_a[idx_a]  # [P]
    lb = len_b[idx_b]  # [P]
    order = np.lexsort((lb, la))  # [P] short strings first, so each batch has a tight width
    for s in range(0, p, _BATCH_PAIRS):
        sel = order[s : s + _BATCH_PAIRS]
        wa = max(int(la[sel].max()), 1)
        wb = max(int(lb[sel].max()), 1)
        out[sel] = _levenshtein_batch(
            codes_a[idx_a[sel], :wa], la[sel], codes_b[idx_b[sel], :wb], lb[sel]
        )
    return out
