"""Reuse the KV cache of a recent generation for a prompt that starts the same way.

Cool-Fusion (``fuseflow.ensemble``) asks every source to continue a context that grows by one accepted segment
per step: without reuse each proposal re-reads the whole context, so a step costs ``O(context)`` per source
and a completion ``O(context²)``. Keeping the KV cache of each generation (prompt + generated tokens) and, for
the next prompt, cropping the entry with the longest common token prefix to that prefix means only the new
tokens are run. The idea of vLLM's automatic prefix caching and SGLang's RadixAttention, kept to a few
whole-sequence entries, as one engine serves one or a few conversations at a time.

Entries are taken out while in use (a cache is mutated by the forward that extends it) and put back with
the ids they now cover, most recent first. Cropping can fail (a sliding-window layer that already dropped the
states to crop back to): then the entry is dropped and the prompt runs from scratch, which is always correct.

A run on a cached prefix computes the same numbers in another order, so logprobs can differ from a full run
in the last fp32 bits (≤ 1e-6 on the test models); greedy tokens differ only where two logits tie to that
precision.
"""

from __future__ import annotations

import copy as copy_module

import numpy as np


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two 1-D id arrays."""
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])  # [d]
    return int(diff[0]) if diff.size else m


class PrefixCache:
    """At most ``size`` (ids, KV cache) entries of one model; ``size = 0`` keeps nothing."""

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"engine option prefix_cache must be >= 0, got {size}")
        self.size = int(size)
        self._entries: list[tuple[np.ndarray, object]] = []  # most recent first
        self.reused_tokens = 0  # prompt tokens not recomputed, for metrics and tests

    def take(self, prompt: np.ndarray, copy: bool = False) -> tuple[object | None, int]:
        """``(cache, n)``: a KV cache holding exactly ``prompt[:n]``, or ``(None, 0)``. ``n < len(prompt)``
        always, so the caller runs at least the last prompt token and gets its logits.

        ``copy``: leave the entry in place and return a copy (Cool-Fusion's candidate scoring runs on the
        context without spending the generation's longer entry, which the next proposal reuses)."""
        best, best_n = -1, 0
        for i, (ids, _) in enumerate(self._entries):
            n = min(common_prefix_length(ids, prompt), len(prompt) - 1)
            if n > best_n:
                best, best_n = i, n
        if best < 0:
            return None, 0
        if copy:
            ids, cache = self._entries[best]
            cache = copy_module.deepcopy(cache)
        else:
            ids, cache = self._entries.pop(best)
        try:
            if len(ids) > best_n:
                cache.crop(best_n - len(ids))  # a negative count: the tokens to drop from the end
        except (RuntimeError, ValueError):  # a layer that cannot roll back (sliding window already full)
            return None, 0
        if cache.get_seq_length() != best_n:
            return None, 0
        self.reused_tokens += best_n
        return cache, best_n

    def put(self, ids: np.ndarray, cache) -> None:
        """Keep ``cache``, which holds exactly ``ids``; the oldest entry goes beyond ``size``."""
        if self.size == 0 or cache is None:
            return
        self._entries.insert(0, (np.asarray(ids, dtype=np.int64), cache))
        del self._entries[self.size :]

    def clear(self) -> None:
        self._entries.clear()
