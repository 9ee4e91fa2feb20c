"""Stop strings, as OpenAI's ``stop``: generation ends where one first appears, and it is not returned.

When streaming, the tail of the text that could still grow into a stop string is held back until the
next segment decides it.
"""

from __future__ import annotations

from collections.abc import Sequence


def find_stop(text: str, stops: Sequence[str], search_from: int = 0) -> int | None:
    """Index of the earliest occurrence of any stop string in ``text`` that ends after ``search_from``
    (text before that was already checked), or ``None``."""
    if not stops:
        return None
    longest = max(len(s) for s in stops)
    start = max(0, search_from - longest + 1)
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Number of trailing characters of ``text`` that are a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
