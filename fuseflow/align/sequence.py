"""Sequence alignment: which source position's prediction serves each target position.

Both methods return ``pos_map: np.ndarray [Lt-1] int32``: target position ``t`` predicts target token
``t+1``; ``pos_map[t] = j`` means source position ``j`` (which predicts source token ``j+1``) makes its
prediction at the same point of the text, ``-1`` that the source has none there. Positions are paired by
the token they PREDICT, not the token they read (the reference FuseLLM code pairs input tokens and so
takes each distribution from one step off: FuseLLM issue #27). Special tokens (BOS, zero-width spans)
are never predicted targets.

- ``offsets``  — exact, from the fast tokenizers' character spans (:func:`align_offsets`);
- ``mined-dp`` — FuseLLM's DTW over token strings with edit-distance cost, for tokenizers without offsets
  (:func:`align_mined_dp`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from fuseflow.align.levenshtein import levenshtein_indexed
from fuseflow.registry import Registry
from fuseflow.align.tokens import as_numpy_strings, code_points

__all__ = ["SEQUENCE_ALIGNERS", "sequence_aligner", "align_offsets", "align_mined_dp", "token_starts"]

SequenceAlignerFn = Callable[..., np.ndarray]
SEQUENCE_ALIGNERS: Registry[SequenceAlignerFn] = Registry("sequence alignment", field="align.sequence")


def sequence_aligner(name: str):
    """Register ``fn(*, src_offsets, tgt_offsets, src_tokens, tgt_tokens) -> pos_map [Lt-1] int32``
    (each method reads the inputs it needs; the others may be ``None``)."""
    return SEQUENCE_ALIGNERS.register(name)


# ----------------------------------------------------------------------------------------------------------
# Offsets.
# ----------------------------------------------------------------------------------------------------------


def _check_offsets(offsets: np.ndarray, side: str) -> np.ndarray:
    offsets = np.asarray(offsets)
    if offsets.ndim != 2 or offsets.shape[1] != 2:
        raise ValueError(f"{side} offsets must have shape [L, 2], got {offsets.shape}")
    return offsets.astype(np.int64)


def token_starts(offsets: np.ndarray) -> np.ndarray:
    """``[L] int64``: the character at which each token's text begins, or -1 if the token begins nowhere.

    A token begins where the text covered so far ends: at the largest ``end`` of the non-empty spans before
    it. This is what makes the start independent of whether a tokenizer's span of ``"▁world"`` includes
    its leading space (``(5, 11)``) or not (``(6, 11)``): either way the previous span ends at 5, and the
    prediction of that token was made having read exactly ``text[:5]``.

    Not a start (-1): zero-width spans (special tokens such as BOS, at ``(0, 0)``), and tokens whose span
    begins inside text already covered — the 2nd and 3rd byte pieces of one character (byte-level BPE
    ``'Ġæ' (26, 28)``, ``'Ŀ' (27, 28)``; SentencePiece ``<0xE6><0x9D><0xB1>``), and a SentencePiece
    prefix ``▁`` that shares the first character's span: the first token of such a group is the start.

    Why not "the first non-space character of the span": Gemma-3 splits ``" Hello  world"`` as
    ``▁Hello | ▁▁ | world`` and SmolLM2 as ``ĠHello | Ġ | Ġworld``. ``world`` and ``Ġworld`` have the same
    first non-space character but are predicted after different texts (two spaces read, or one), and
    linking them would teach the target ``world`` where its gold token is ``Ġworld``.
    Limitation: a tokenizer that trims the TRAILING space off a span (``"Hello▁"`` as ``(0, 5)``) would
    move the next start one character early; no tokenizer we know of does.
    """
    offsets = _check_offsets(offsets, "token")
    start, end = offsets[:, 0], offsets[:, 1]  # [L]
    real = end > start  # [L]
    covered = np.maximum.accumulate(np.where(real, end, 0))  # [L] text covered up to and including each token
    prev_end = np.concatenate([[0], covered[:-1]]) if len(covered) else covered  # [L]
    is_start = real & (start >= prev_end)
    return np.where(is_start, prev_end, -1)


def align_offsets(src_offsets: np.ndarray, tgt_offsets: np.ndarray) -> np.ndarray:
    """``pos_map [Lt-1] int32`` from character spans (``[Ls, 2]`` / ``[Lt, 2]``, as fast tokenizers return
    with ``return_offsets_mapping=True`` on the same text): target position ``t`` takes source position
    ``j`` iff target token ``t+1`` and source token ``j+1`` begin at the same character (:func:`token_starts`).

    Exact; ``np.searchsorted`` over the source starts (strictly increasing), no loop over tokens.
    """
    src_start = token_starts(_check_offsets(src_offsets, "source"))[1:]  # [Ls-1] start of token j+1
    tgt_start = token_starts(_check_offsets(tgt_offsets, "target"))[1:]  # [Lt-1] start of token t+1
    valid = np.flatnonzero(src_start >= 0)  # [S] source positions with a start
    values = src_start[valid]  # [S] strictly increasing
    if len(values) == 0 or len(tgt_start) == 0:
        return np.full(len(tgt_start), -1, dtype=np.int32)
    pos = np.minimum(np.searchsorted(values, tgt_start), len(values) - 1)  # [Lt-1]
    hit = (tgt_start >= 0) & (values[pos] == tgt_start)
    return np.where(hit, valid[pos], -1).astype(np.int32)


@sequence_aligner("offsets")
def _offsets(*, src_offsets=None, tgt_offsets=None, **_) -> np.ndarray:
    """Exact alignment on the tokens' character spans (fuseflow; fixes FuseLLM issue #27's off-by-one)."""
    if src_offsets is None or tgt_offsets is None:
        side = "source" if src_offsets is None else "target"
        raise ValueError(
            f"sequence alignment 'offsets' needs character offsets from the {side} tokenizer, which gave none; "
            "set align.sequence: mined-dp"
        )
    return align_offsets(src_offsets, tgt_offsets)


# ----------------------------------------------------------------------------------------------------------
# MinED dynamic programming (DTW).
# ----------------------------------------------------------------------------------------------------------

_INF = np.int64(1) << 40
_WHITESPACE_BYTES = np.frombuffer(b" \t\n\r\x0b\x0c", dtype=np.uint8)
_DIAG, _UP, _LEFT = 0, 1, 2


def _utf8_table(strings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of each string, padded: ``[N, W] uint8`` and lengths ``[N]``. Lone surrogates (partial
    characters, tokens.py) become their byte again, so byte-level pieces and whole characters spell the
    same bytes."""
    enc = np.char.encode(strings, "utf-8", "surrogateescape")  # [N] bytes_
    width = max(enc.dtype.itemsize, 1)
    table = np.frombuffer(np.ascontiguousarray(enc).tobytes(), dtype=np.uint8).reshape(len(enc), width)
    return table, np.char.str_len(enc).astype(np.int64)


def _without_spaces(codes: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows with the spaces removed (FuseLLM strips the space markers before comparing): ``[N, W]``, ``[N]``."""
    inside = np.arange(codes.shape[1]) < lengths[:, None]  # [N, W]
    space = (codes == 0x20) & inside
    order = np.argsort(space | ~inside, axis=1, kind="stable")  # kept characters first, in order
    kept = np.take_along_axis(codes, order, axis=1)
    new_len = (inside & ~space).sum(axis=1).astype(np.int32)
    kept[np.arange(codes.shape[1]) >= new_len[:, None]] = 0
    return kept, new_len


def _band(src_len: np.ndarray, tgt_len: np.ndarray, band: int) -> tuple[np.ndarray, np.ndarray]:
    """Per source token ``i``, the target tokens ``[lo_i, hi_i)`` whose byte span, rescaled to the source's
    total length, lies within ``band`` bytes of token ``i``'s span. Both bounds are non-decreasing and
    consecutive rows overlap, so a monotone path always exists inside the band."""
    s_end = np.cumsum(src_len)  # [n]
    s_start = s_end - src_len
    scale = s_end[-1] / max(int(np.sum(tgt_len)), 1)
    t_end = np.cumsum(tgt_len) * scale  # [m]
    t_start = t_end - tgt_len * scale
    lo = np.searchsorted(t_end, s_start - band, side="right")  # first j with t_end > s_start - band
    hi = np.searchsorted(t_start, s_end + band, side="left")  # first j with t_start >= s_end + band
    m = len(tgt_len)
    lo = np.clip(lo, 0, m - 1)
    hi = np.clip(hi, 1, m)
    lo[0], hi[-1] = 0, m
    hi = np.maximum.accumulate(hi)
    lo = np.minimum.accumulate(lo[::-1])[::-1]
    hi = np.maximum(hi, lo + 1)
    lo[1:] = np.minimum(lo[1:], hi[:-1])  # each row reaches the row above (a diagonal or downward step)
    return lo.astype(np.int64), hi.astype(np.int64)


def dtw_path(cost_rows: list[np.ndarray], lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost monotone path from ``(0, 0)`` to ``(n-1, m-1)`` (steps diagonal, down, right) through a
    banded cost matrix, as FuseLLM's ``dtw`` (simpledtw; ties prefer diagonal, then down, then right).

    ``cost_rows[i]`` holds ``C[i, lo[i]:hi[i]]``. Each row is one vector step: with ``M[j]`` the best of the
    cells above and above-left, ``D[i, j] = min_k<=j (M[k] + C[k..j])`` = ``S[j] + min.accumulate(M - S_prev)``
    (``S`` the row's cumulative cost) — the rightward chain as a running minimum. The backtrack walks the
    stored step choices (one step per path cell). Returns the path's ``(i, j)`` arrays in order.
    """
    n = len(cost_rows)
    lo_l, hi_l = lo.tolist(), hi.tolist()
    steps = []
    prev = np.zeros(0, dtype=np.int64)
    prev_lo = prev_hi = 0
    for i in range(n):
        lo_i, hi_i = lo_l[i], hi_l[i]
        c = cost_rows[i].astype(np.int64)  # [w]
        up = np.full(hi_i - lo_i, _INF)  # [w] D[i-1, j]
        diag = np.full(hi_i - lo_i, _INF)  # [w] D[i-1, j-1]
        if i == 0:
            diag[0] = 0  # the path starts at (0, 0)
        else:
            a, b = max(lo_i, prev_lo), min(hi_i, prev_hi)
            if b > a:
                up[a - lo_i : b - lo_i] = prev[a - prev_lo : b - prev_lo]
            a, b = max(lo_i, prev_lo + 1), min(hi_i, prev_hi + 1)
            if b > a:
                diag[a - lo_i : b - lo_i] = prev[a - 1 - prev_lo : b - 1 - prev_lo]
        from_up = up < diag
        best_prev = np.minimum(up, diag)  # [w]
        s = np.cumsum(c)  # [w]
        row = s + np.minimum.accumulate(best_prev - (s - c))  # [w]
        step = np.where(row < c + best_prev, _LEFT, np.where(from_up, _UP, _DIAG)).astype(np.int8)
        steps.append(step)
        prev, prev_lo, prev_hi = np.minimum(row, _INF), lo_i, hi_i
    # Backtrack: sequential by nature (each step depends on the last), one scalar step per path cell.
    i, j = n - 1, hi_l[-1] - 1
    path_i, path_j = [], []
    while True:
        path_i.append(i)
        path_j.append(j)
        if i == 0 and j == 0:
            break
        step = steps[i][j - lo_l[i]]
        if step == _DIAG:
            i, j = i - 1, j - 1
        elif step == _UP:
            i -= 1
        else:
            j -= 1
    return np.asarray(path_i[::-1], dtype=np.int64), np.asarray(path_j[::-1], dtype=np.int64)


def align_mined_dp(
    src_tokens: Sequence[str],
    tgt_tokens: Sequence[str],
    src_special: np.ndarray | None = None,
    tgt_special: np.ndarray | None = None,
    band: int | None = None,
) -> np.ndarray:
    """``pos_map [Lt-1] int32`` from token strings alone (FuseLLM, arXiv 2401.10491 §3.3: DTW over the two
    token sequences with edit-distance cost, its ``transform_step_logits``).

    ``src_tokens`` / ``tgt_tokens`` are NORMALISED strings (:func:`fuseflow.align.tokens.token_strings`
    indexed by the ids). Tokens flagged in ``*_special`` (bool ``[L]``) are left out of the DP and never
    predicted targets. The cost of a cell is the edit distance with spaces removed (FuseLLM strips the
    ``Ġ``/``▁`` markers). The band keeps the cells whose byte positions, rescaled by the two total lengths,
    are within ``band`` bytes of each other (default: 1/128 of the text's bytes, clipped to [64, 512]), so
    the cost is O(L · band) instead of O(L²). The DP is exact inside the band; a path that must leave it
    (over ``band`` bytes of local drift, e.g. long runs of ``<unk>``) is not found.

    From the path: blocks of the path (1:1 matches, many-to-one groups) whose two sides spell the same text
    are anchors; inside anchors, and between anchors where both sides spell the same text, a target and a
    source token begin at the same place when their byte offsets agree (:func:`_co_starts`). So on text
    both tokenizers spell faithfully this gives exactly what :func:`align_offsets` gives; DTW matters where
    the spellings differ (``<unk>``), to re-synchronise after them.
    """
    ls, lt = len(src_tokens), len(tgt_tokens)
    pos_map = np.full(max(lt - 1, 0), -1, dtype=np.int32)
    src_keep = np.flatnonzero(~np.asarray(src_special, bool)) if src_special is not None else np.arange(ls)
    tgt_keep = np.flatnonzero(~np.asarray(tgt_special, bool)) if tgt_special is not None else np.arange(lt)
    if len(src_keep) == 0 or len(tgt_keep) == 0:
        return pos_map
    src_full = as_numpy_strings(src_tokens)[src_keep]  # [n]
    tgt_full = as_numpy_strings(tgt_tokens)[tgt_keep]  # [m]
    n, m = len(src_full), len(tgt_full)
    s_codes, s_len = code_points(src_full)  # [n, Ws], [n]
    t_codes, t_len = code_points(tgt_full)  # [m, Wt], [m]
    s_bytes, s_blen = _utf8_table(src_full)  # [n, Bs], [n]
    t_bytes, t_blen = _utf8_table(tgt_full)  # [m, Bt], [m]
    if band is None:  # local drift (from <unk> and the like) grows with the text; 64 bytes suffice for 8k chars
        band = int(np.clip(s_blen.sum() // 128, 64, 512))
    lo, hi = _band(np.maximum(s_blen, 1), np.maximum(t_blen, 1), band)
    s_codes, s_len = _without_spaces(s_codes, s_len)
    t_codes, t_len = _without_spaces(t_codes, t_len)
    widths = hi - lo  # [n]
    rows = np.repeat(np.arange(n), widths)  # [P] every banded cell, row-major
    cols = np.arange(int(widths.sum())) - np.repeat(np.cumsum(widths) - widths, widths) + np.repeat(lo, widths)
    cost = levenshtein_indexed(s_codes, s_len, rows, t_codes, t_len, cols)  # [P]
    cost_rows = np.split(cost, np.cumsum(widths)[:-1])
    pi, pj = dtw_path(cost_rows, lo, hi)  # [K], [K]

    a, b = _co_starts(pi, pj, s_bytes, s_blen, t_bytes, t_blen)
    # Back to full sequences: target token tgt_keep[b] is predicted at t = tgt_keep[b] - 1, source token
    # src_keep[a] at j = src_keep[a] - 1; token 0 is predicted by nobody.
    t_pos = tgt_keep[b] - 1
    s_pos = src_keep[a] - 1
    ok = (t_pos >= 0) & (s_pos >= 0)
    pos_map[t_pos[ok]] = s_pos[ok]
    return pos_map


def _flat_text(table: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tokens' bytes concatenated ``[sum(lengths)]`` and each token's offset into it ``[N+1]``."""
    inside = np.arange(table.shape[1]) < lengths[:, None]  # [N, W]
    return table[inside], np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def _spans_equal(s_flat, s_lo, s_hi, t_flat, t_lo, t_hi) -> np.ndarray:
    """``[B] bool``: ``s_flat[s_lo:s_hi] == t_flat[t_lo:t_hi]`` for every span pair, in one gather."""
    equal = (s_hi - s_lo) == (t_hi - t_lo)  # [B]
    cand = np.flatnonzero(equal)
    n = (s_hi - s_lo)[cand]  # [C]
    owner = np.repeat(np.arange(len(cand)), n)  # [sum n] span of each compared byte
    within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    differs = s_flat[s_lo[cand][owner] + within] != t_flat[t_lo[cand][owner] + within]
    equal[cand] = np.bincount(owner, weights=differs, minlength=len(cand)) == 0
    return equal


def _common_prefix(a: np.ndarray, i: int, b: np.ndarray, j: int) -> int:
    """Length of the longest common prefix of ``a[i:]`` and ``b[j:]``, read in doubling chunks (stops early)."""
    n, done, step = min(len(a) - i, len(b) - j), 0, 256
    while done < n:
        m = min(step, n - done)
        diff = np.flatnonzero(a[i + done : i + done + m] != b[j + done : j + done + m])
        if len(diff):
            return done + int(diff[0])
        done, step = done + m, step * 2
    return max(n, 0)


def _placed_anchors(anchor, s_lo, s_hi, t_lo, t_hi, s_flat, t_flat) -> np.ndarray:
    """The anchors (block indices, in path order) that sit where the text read so far puts them.

    From a synchronised point (the start, then the end of the last anchor kept) both texts agree for the length
    of their common prefix. An anchor inside that equal run is placed right iff it starts at the same distance
    from the point on both sides; one that does not is a repeat DTW paired off by some bytes, and is dropped (the
    run links its tokens as an equal gap would). Past the first difference the next anchor re-synchronises, as
    before. On text both sides spell alike the common prefix is the whole text, so every link is the offsets'.
    """
    keep: list[int] = []
    p_s = p_t = 0
    i, n = 0, len(anchor)
    s_start, t_start = s_lo[anchor], t_lo[anchor]  # [A] each non-decreasing (path order)
    while i < n:
        run = _common_prefix(s_flat, p_s, t_flat, p_t)
        j = int(np.searchsorted(s_start, p_s + run, side="right"))  # anchors starting inside the run
        cand = anchor[i:j]
        placed = (s_lo[cand] - p_s == t_lo[cand] - p_t) & (s_hi[cand] - p_s <= run)
        hits = np.flatnonzero(placed)
        if len(hits):
            keep.extend(cand[hits].tolist())
            last = cand[hits[-1]]
            i = i + int(hits[-1]) + 1
        else:  # a real difference: the first anchor past it on both sides starts afresh
            i = max(i, int(np.searchsorted(s_start, p_s + run)), int(np.searchsorted(t_start, p_t + run)))
            if i >= n:
                break
            last = anchor[i]
            keep.append(int(last))
            i += 1
        p_s, p_t = int(s_hi[last]), int(t_hi[last])
    return np.asarray(keep, dtype=np.int64)


def _co_starts(pi, pj, s_bytes, s_len, t_bytes, t_len) -> tuple[np.ndarray, np.ndarray]:
    """Source / target token pairs ``(a, b)`` that begin at the same place of the text, from a DTW path.

    The path splits into blocks at its diagonal steps: a run of source tokens aligned with a run of target
    tokens (1:1, many-to-one, many-to-many). A block whose two sides spell the same bytes, not all of them
    whitespace, is an anchor.
    Between consecutive anchors lies a gap (the blocks DTW grouped wrongly, typically around a long token:
    ``decorators`` against ``decor|ators`` with a tie broken the other way); a gap whose two sides also
    spell the same bytes is as good as an anchor. Inside an anchor or an equal gap both texts are the same
    bytes from the same starting point, so a source and a target token begin together exactly when their
    byte offsets from that point are equal — the offsets rule, without offsets. Where the texts differ
    (``<unk>``, a SentencePiece prefix space) nothing is linked, and the next anchor starts afresh.
    Equal bytes alone do not place a block: in a run of repeated characters (``*****`` under a heading) DTW may
    pair ``********`` with a ``********`` three bytes further on; :func:`_placed_anchors` keeps the anchors that
    agree with the text read so far (the test that caught it: tests/align/test_sequence.py, mined-dp equals
    offsets, which failed for about one tiny SentencePiece vocabulary in 40).
    """
    k = len(pi)
    is_first = np.ones(k, dtype=bool)  # [K] a block begins at each diagonal step
    is_first[1:] = (pi[1:] == pi[:-1] + 1) & (pj[1:] == pj[:-1] + 1)
    first = np.flatnonzero(is_first)  # [B]
    last = np.concatenate([first[1:], [k]]) - 1  # [B]
    s_flat, s_off = _flat_text(s_bytes, s_len)  # [Ns], [n+1]
    t_flat, t_off = _flat_text(t_bytes, t_len)  # [Nt], [m+1]
    s_lo, s_hi = s_off[pi[first]], s_off[pi[last] + 1]  # [B] byte span of each block
    t_lo, t_hi = t_off[pj[first]], t_off[pj[last] + 1]
    # Whitespace costs nothing once spaces are stripped, so DTW places whitespace-only blocks anywhere
    # inside a run of spaces: they cannot anchor (an equal gap still links them).
    ink = np.concatenate([[0], np.cumsum(~np.isin(s_flat, _WHITESPACE_BYTES))])  # [Ns+1] non-space bytes so far
    anchor = np.flatnonzero(
        _spans_equal(s_flat, s_lo, s_hi, t_flat, t_lo, t_hi) & (ink[s_hi] > ink[s_lo])
    )  # [A]
    anchor = _placed_anchors(anchor, s_lo, s_hi, t_lo, t_hi, s_flat, t_flat)  # [A'] A' <= A
    # Intervals in text order: gap 0, anchor 0, gap 1, …, anchor A-1, gap A (gaps may be empty).
    gs_lo, gs_hi = np.concatenate([[0], s_hi[anchor]]), np.concatenate([s_lo[anchor], [s_off[-1]]])  # [A+1]
    gt_lo, gt_hi = np.concatenate([[0], t_hi[anchor]]), np.concatenate([t_lo[anchor], [t_off[-1]]])
    n_iv = 2 * len(anchor) + 1
    iv_s, iv_t, iv_ok = np.empty(n_iv, np.int64), np.empty(n_iv, np.int64), np.ones(n_iv, bool)  # [I]
    iv_s[0::2], iv_s[1::2] = gs_lo, s_lo[anchor]
    iv_t[0::2], iv_t[1::2] = gt_lo, t_lo[anchor]
    iv_ok[0::2] = _spans_equal(s_flat, gs_lo, gs_hi, t_flat, gt_lo, gt_hi)

    def keys(off: np.ndarray, lengths: np.ndarray, iv_start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tok = np.flatnonzero(lengths > 0)  # [T'] an empty token begins nothing
        # The last interval starting at or before the token: an empty gap yields to the anchor after it.
        iv = np.searchsorted(iv_start, off[tok], side="right") - 1
        ok = iv_ok[iv]
        width = max(int(s_off[-1]), int(t_off[-1])) + 1
        return tok[ok], iv[ok] * width + (off[tok] - iv_start[iv])[ok]  # (interval, offset inside it)

    a_tok, a_key = keys(s_off[:-1], s_len, iv_s)  # non-decreasing keys
    b_tok, b_key = keys(t_off[:-1], t_len, iv_t)
    if len(a_key) == 0:
        return a_tok, a_tok
    pos = np.minimum(np.searchsorted(a_key, b_key, side="left"), len(a_key) - 1)  # first source token wins
    hit = a_key[pos] == b_key
    return a_tok[pos[hit]], b_tok[hit]


@sequence_aligner("mined-dp")
def _mined_dp(*, src_tokens=None, tgt_tokens=None, src_offsets=None, tgt_offsets=None, **_) -> np.ndarray:
    """FuseLLM's MinED DTW (arXiv 2401.10491 §3.3), vectorised and banded; on normalised token strings."""
    if src_tokens is None or tgt_tokens is None:
        side = "source" if src_tokens is None else "target"
        raise ValueError(f"sequence alignment 'mined-dp' needs the {side} token strings (align.sequence)")
    # Where spans exist, zero-width ones are special tokens: keep them out of the DP.
    src_special = (np.asarray(src_offsets)[:, 1] <= np.asarray(src_offsets)[:, 0]) if src_offsets is not None else None
    tgt_special = (np.asarray(tgt_offsets)[:, 1] <= np.asarray(tgt_offsets)[:, 0]) if tgt_offsets is not None else None
    return align_mined_dp(src_tokens, tgt_tokens, src_special, tgt_special)
