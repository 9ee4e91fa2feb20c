r"""Where a text segment may end so that every source can take it up: common token boundaries.

Cool-Fusion (Liu et al., arXiv 2407.19807) lets each source generate "until the tokens can be decoded into
a text segment that ends at word boundaries common to all source LLMs". Here that is made exact: a segment
may end at character position ``p`` only if

- ``p`` is the end of a prefix of the generating source's own tokens (the segment is exactly what it
  generated, so it can keep those ids), and
- ``p`` is a token boundary in EVERY source's tokenization of the full text so far + the segment: some
  token ends at ``p`` and none spans across it.

Then every source sees the segment as a whole number of its own tokens, and its likelihood under each
source is well defined. Byte-level BPE (``Ġ``) and SentencePiece (``▁``) both attach a space to the token
after it, so common boundaries fall just before spaces and punctuation, as word boundaries do. Small
vocabularies also share boundaries inside words (``t|wo`` in both): the ``word`` rule (the paper's, and the
default) also excludes positions between two word characters (``\w``); the ``token`` rule keeps them (for
scripts written without spaces). Under both rules a position right after whitespace is excluded
(:func:`space_boundary_mask`: whitespace joins the next word). Past ``decoding.segment_max_tokens`` the
decoder keeps only the common token rule (the max-segment guard), so a long segment is still never cut
inside any source's token.

Pure functions over offset arrays; the tokenizer calls that produce the offsets live in
:mod:`fuseflow.ensemble.sources`.
"""

from __future__ import annotations

import re

import numpy as np

_INSIDE_WORD = re.compile(r"(?<=\w)(?=\w)")


def token_boundary_mask(offsets: np.ndarray, start: int, length: int) -> np.ndarray:
    """Token boundaries of one tokenization inside the window ``[start, start + length]`` of its text.

    ``offsets`` [L, 2] are the tokens' character spans in the full text. Returns ``mask`` [length + 1]
    bool, ``mask[p]`` true when a token ends at ``start + p`` and no token spans across it. Empty spans
    (special tokens such as BOS, ``(0, 0)``) are ignored. Several tokens sharing one span (a character
    split into byte tokens) end at the same position, which stays a boundary.
    """
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2) - start  # [L, 2], window coordinates
    off = off[off[:, 1] > off[:, 0]]  # [L', 2] tokens that cover text
    mask = np.zeros(length + 1, dtype=bool)  # [length + 1]
    ends = off[:, 1]
    mask[ends[(ends >= 0) & (ends <= length)]] = True
    # Positions strictly inside a span (start < p < end): +1 at start + 1, -1 at end, running sum > 0.
    lo = np.clip(off[:, 0] + 1, 0, length + 1)
    hi = np.clip(off[:, 1], 0, length + 1)
    keep = lo < hi
    delta = np.zeros(length + 2, dtype=np.int64)  # [length + 2]
    np.add.at(delta, lo[keep], 1)
    np.add.at(delta, hi[keep], -1)
    inside = np.cumsum(delta)[: length + 1] > 0  # [length + 1]
    return mask & ~inside


def own_token_mask(char_ends: np.ndarray, length: int) -> np.ndarray:
    """``mask`` [length + 1]: the positions where a prefix of the generator's own tokens ends.

    ``char_ends`` [M] is, for each prefix of ``m + 1`` generated tokens, the length of its decoded text, or
    -1 when that prefix does not decode to a prefix of the segment (a character cut between byte tokens).
    """
    ends = np.asarray(char_ends, dtype=np.int64)  # [M]
    mask = np.zeros(length + 1, dtype=bool)
    mask[ends[(ends >= 0) & (ends <= length)]] = True
    return mask


def word_boundary_mask(text: str) -> np.ndarray:
    """``mask`` [len(text) + 1]: false between two word characters (``\\w``: letters, digits, ``_``)."""
    mask = np.ones(len(text) + 1, dtype=bool)
    inside = np.fromiter((m.start() for m in _INSIDE_WORD.finditer(text)), dtype=np.int64)  # [I]
    mask[inside] = False
    return mask


def space_boundary_mask(text: str) -> np.ndarray:
    """``mask`` [len(text) + 1]: false right after a whitespace character, except at the end of ``text``.

    Whitespace joins the word after it (issue 16): a space or a newline is never the end of a segment, as
    both byte-level BPE and SentencePiece attach a space to the token after it. A lone ``" "`` before a
    digit (SmolLM2 splits digits from the space) would otherwise be a whole propose-and-rerank step. The
    end stays allowed: a source that stops after a newline ends there.
    """
    mask = np.ones(len(text) + 1, dtype=bool)
    spaces = np.fromiter((i + 1 for i, ch in enumerate(text[:-1]) if ch.isspace()), dtype=np.int64)  # [W]
    mask[spaces] = False
    return mask


def common_boundary_mask(masks: np.ndarray) -> np.ndarray:
    """Positions that are boundaries in every mask: ``masks`` [S, n + 1] → [n + 1]."""
    return np.logical_and.reduce(np.asarray(masks, dtype=bool), axis=0)


def first_boundary(mask: np.ndarray, min_chars: int = 1, include_end: bool = False) -> int | None:
    """The first position ``p >= max(1, min_chars)`` where ``mask`` [n + 1] is true, or ``None``.

    The end of the window (``p == n``) only counts when ``include_end``: every tokenization ends at the
    end of its text, so without look-ahead the end is not evidence of a boundary — it is one only when the
    segment is final (the source stopped there).
    """
    n = len(mask) - 1
    hits = np.flatnonzero(mask[: n + 1 if include_end else n])  # [h]
    hits = hits[hits >= max(1, min_chars)]
    return int(hits[0]) if hits.size else None


def cut_at_token(offsets: np.ndarray, start: int, count: int) -> int | None:
    """Window position where the first ``count`` tokens ending after ``start`` end (for ``max_tokens``).

    ``offsets`` [L, 2] of a tokenization of the full text; returns ``None`` if fewer tokens follow.
    """
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # [L, 2]
    ends = off[off[:, 1] > start, 1] - start  # [N] ends of the tokens after the window start
    if count <= 0:
        return 0
    return int(ends[count - 1]) if ends.size >= count else None
