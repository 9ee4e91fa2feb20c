"""Project a teacher's top-k predictions onto the target's positions and vocabulary.

Input: the teacher's :class:`~fuseflow.sparse.ScoredText` (its tokens, its vocabulary), a ``pos_map``
(:mod:`fuseflow.align.sequence`) and a vocab map (:mod:`fuseflow.align.vocab`). Output: an
:class:`~fuseflow.sparse.AlignedDist` with one top-k row per target position, in target ids.

Positions the sequence alignment links take the teacher's row there (FuseLLM, FuseChat); positions where a
target token begins inside a longer teacher token get the teacher's conditional by the chain rule over
strings (:func:`chain_rule_rows`, issue 21), so a teacher that predicts whole words still says something
about the target's second and third piece of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fuseflow.align.sequence import SEQUENCE_ALIGNERS, token_starts
from fuseflow.align.vocab import TargetSplits
from fuseflow.sparse import PAD_LOGPROB, AlignedDist, ScoredText

__all__ = ["InnerRows", "align_scored", "chain_rule_rows", "project_to_target"]


@dataclass
class InnerRows:
    """The teacher's distributions at target positions inside one of its tokens (:func:`chain_rule_rows`):
    ``rows [R]`` target positions, ``ids [R, k_src]`` target ids (-1: dropped), ``logprobs [R, k_src]`` the
    teacher's conditional logprobs, ``gold [R]`` its conditional logprob of its own next token there."""

    rows: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    gold: np.ndarray


def chain_rule_rows(
    scored: ScoredText, text: str, target_offsets: np.ndarray, pos_map: np.ndarray, splits: TargetSplits
) -> InnerRows:
    """The teacher's next-target-token distribution where a target token begins strictly inside a source token
    (issue 21): by the chain rule over strings, from the teacher's own top-k at the source token's position.

    Target position ``t`` (``pos_map[t] == -1``) predicts target token ``t+1``, which begins at character ``c``
    inside source token ``q`` (its text ``text[a:b]``, ``a < c < b``), which the teacher predicted at source
    row ``j = q - 1``. The text read so far is ``text[:c]``: of the teacher's candidates ``v`` at row ``j``,
    those whose string starts with ``p = text[a:c]`` and goes on past it, and whose text the target tokenizer
    splits at ``len(p)`` (:class:`TargetSplits`: the target's tokens so far are the ones read), agree with it;
    each puts its mass on the target token its text begins with after ``p``. Grouped by that token and divided
    by the agreeing mass ``Z``, that is the teacher's ``P(next target token | text[:c])`` from one teacher step.
    The teacher's own token ``q`` always agrees (it is the text): its known logprob counts in ``Z`` even where
    the top-k misses it or its split out of context has no boundary at ``c`` (the row then sums to less than 1). Candidates that end exactly at ``c`` say nothing about the
    next target token (that depends on the teacher's next step) and are left out of ``Z``. ``gold`` is
    ``log p(q) - log Z``: the teacher's conditional logprob of its own continuation. Rows where no candidate
    agrees are not returned (the projection falls back to the gold token, as before).

    Vectorised over all (position, candidate) pairs; the prefix comparison gathers ``sum(len(p))`` characters.
    """
    empty = InnerRows(np.zeros(0, np.int64), np.zeros((0, scored.topk_ids.shape[1]), np.int64),
                      np.zeros((0, scored.topk_ids.shape[1])), np.zeros(0, np.float32))
    if scored.offsets is None or target_offsets is None or len(scored.token_ids) < 2:
        return empty
    src_off = np.asarray(scored.offsets, dtype=np.int64)
    s_start = token_starts(src_off)  # [Ls]
    s_end = src_off[:, 1]  # [Ls]
    t_start = token_starts(target_offsets)[1:]  # [T] where target token t+1 begins
    q_all = np.flatnonzero(s_start >= 0)  # [S] source tokens with a start, increasing starts
    q_all = q_all[q_all >= 1]  # token 0 is predicted by no row
    rows = np.flatnonzero((np.asarray(pos_map) < 0) & (t_start >= 0))  # [R0]
    if len(q_all) == 0 or len(rows) == 0:
        return empty
    c = t_start[rows]  # [R0]
    i = np.searchsorted(s_start[q_all], c, side="left") - 1  # [R0] the last source token beginning before c
    q = q_all[np.maximum(i, 0)]
    inside = (i >= 0) & (c < s_end[q])
    rows, c, q = rows[inside], c[inside], q[inside]  # [R]
    j = q - 1  # [R] the source row predicting token q
    a = s_start[q]  # [R]
    o = c - a  # [R] characters of the source token already read (> 0)

    cand = scored.topk_ids[j].astype(np.int64)  # [R, k]
    lp = scored.topk_logprobs[j].astype(np.float64)  # [R, k]
    in_vocab = (cand >= 0) & (cand < splits.size) & np.isfinite(lp)
    v = np.where(in_vocab, cand, 0)
    n_v = splits.lengths[v]  # [R, k]
    ok = in_vocab & (n_v > o[:, None])  # candidates that reach past c
    # Compare each live candidate's first o characters with text[a:c], all pairs in one gather.
    text_codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int32)
    pr, pc = np.nonzero(ok)  # [P]
    n = o[pr]  # [P]
    owner = np.repeat(np.arange(len(pr)), n)  # [sum n]
    within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    same = splits.codes[splits.ptr[v[pr, pc]][owner] + within] == text_codes[np.minimum(a[pr][owner] + within,
                                                                                         len(text_codes) - 1)]
    agree = np.zeros(ok.shape, dtype=bool)
    agree[pr, pc] = np.bincount(owner, weights=~same, minlength=len(pr)) == 0
    nxt = np.where(agree, splits.next_id[np.where(agree, splits.ptr[v] + o[:, None], 0)], -1)  # [R, k]
    keep = agree & (nxt >= 0)
    if not keep.any():
        return empty
    gold_tok = scored.token_ids[q].astype(np.int64)  # [R]
    gold_lp = scored.gold_logprobs[j].astype(np.float64)  # [R]
    own_kept = (keep & (cand == gold_tok[:, None])).any(axis=1)  # [R]
    kept_lp = np.where(keep, lp, -np.inf)
    z = np.logaddexp(np.logaddexp.reduce(kept_lp, axis=1), np.where(own_kept, -np.inf, gold_lp))  # [R]
    has = keep.any(axis=1)
    return InnerRows(
        rows=rows[has],
        ids=np.where(keep, nxt, -1)[has],
        logprobs=(kept_lp - z[:, None])[has],
        gold=(gold_lp - z)[has].astype(np.float32),
    )


def project_to_target(
    scored: ScoredText, pos_map: np.ndarray, vocab_map: np.ndarray, target_ids: np.ndarray, k: int,
    inner: InnerRows | None = None,
) -> AlignedDist:
    """The source's distributions at the target positions, in target ids, as sorted top-``k`` rows.

    Row ``t`` takes the source row ``pos_map[t]``, maps its ids through ``vocab_map`` (``[V_src] int32``),
    drops unmapped (-1) entries, merges entries that landed on the same target id by summing their
    probabilities (logsumexp) and keeps the ``k`` largest, descending. ``inner`` (:func:`chain_rule_rows`)
    gives the rows of target positions inside a source token, already in target ids. A row with neither, or
    whose entries all dropped, is the one-hot gold next target token ``target_ids[t+1]`` with
    ``aligned=False`` (FuseLLM, arXiv 2401.10491 §3.3: unaligned positions fall back to the gold token).
    ``gold_logprobs[t]`` is the source's logprob of its own next token at the aligned position (0 elsewhere;
    inner rows: ``InnerRows.gold``).

    Vectorised over all rows: one sort by (row, target id), segment reductions (``reduceat``) for the
    merge, one sort by logprob. Shapes: ``T = len(target_ids) - 1``; source rows ``[Ls-1, k_src]``.
    """
    target_ids = np.asarray(target_ids)
    pos_map = np.asarray(pos_map)
    t_len = max(len(target_ids) - 1, 0)
    if pos_map.shape != (t_len,):
        raise ValueError(f"pos_map has shape {pos_map.shape}; the target text has {t_len} predicted positions")
    if k <= 0:
        raise ValueError(f"top-k must be positive, got {k}")
    n_src_rows, k_src = scored.topk_ids.shape
    if pos_map.size and int(pos_map.max(initial=-1)) >= n_src_rows:
        raise ValueError(f"pos_map points at source row {int(pos_map.max())}; the teacher scored {n_src_rows} rows")

    has_src = pos_map >= 0  # [T]
    rows = np.where(has_src, pos_map, 0)  # [T]
    if n_src_rows == 0:
        has_src[:] = False
        src_ids = np.zeros((t_len, k_src), dtype=np.int64)  # [T, k_src]
        src_lp = np.full((t_len, k_src), PAD_LOGPROB, dtype=np.float64)
    else:
        src_ids = scored.topk_ids[rows].astype(np.int64)  # [T, k_src]
        src_lp = scored.topk_logprobs[rows].astype(np.float64)  # [T, k_src]
    in_vocab = (src_ids >= 0) & (src_ids < len(vocab_map))
    tgt = np.where(in_vocab, vocab_map[np.clip(src_ids, 0, max(len(vocab_map) - 1, 0))], -1).astype(np.int64)
    tgt[~has_src] = -1
    gold = np.zeros(t_len, dtype=np.float32)  # [T]
    if n_src_rows:
        gold[has_src] = scored.gold_logprobs[rows[has_src]]
    if inner is not None and len(inner.rows):
        if inner.ids.shape[1] != k_src:
            raise ValueError(f"inner rows have {inner.ids.shape[1]} candidates, the source rows {k_src}")
        tgt[inner.rows] = inner.ids
        src_lp[inner.rows] = inner.logprobs
        gold[inner.rows] = inner.gold
    keep = (tgt >= 0) & np.isfinite(src_lp)  # [T, k_src]
    out_ids, out_lp, aligned = _merge_rows(tgt, src_lp, keep, k)

    gold_next = target_ids[1:].astype(np.int32)  # [T]
    out_ids[~aligned] = 0
    out_ids[~aligned, 0] = gold_next[~aligned]
    out_lp[~aligned] = PAD_LOGPROB
    out_lp[~aligned, 0] = 0.0
    gold[~aligned] = 0.0
    return AlignedDist(ids=out_ids, logprobs=out_lp, gold_logprobs=gold, aligned=aligned)


def _merge_rows(tgt: np.ndarray, src_lp: np.ndarray, keep: np.ndarray, k: int):
    """Rows of candidate target ids ``tgt [T, K]`` with logprobs ``[T, K]`` (``keep``: live entries) → sorted
    top-``k`` rows with equal ids merged (logsumexp): ``(ids [T, k] int32, logprobs [T, k] float32, any [T])``."""
    t_len, k_src = tgt.shape
    # Sort each row by target id, dropped entries last; equal ids become adjacent segments.
    sentinel = np.int64(np.iinfo(np.int64).max)
    key = np.where(keep, tgt, sentinel)  # [T, k_src]
    order = np.argsort(key, axis=1, kind="stable")
    key = np.take_along_axis(key, order, axis=1).ravel()  # [T * k_src]
    lp = np.where(np.take_along_axis(keep, order, axis=1), np.take_along_axis(src_lp, order, axis=1), -np.inf).ravel()
    valid = key != sentinel  # [T * k_src]
    col = np.tile(np.arange(k_src), t_len)  # [T * k_src]
    seg_start = valid & ((col == 0) | (key != np.roll(key, 1)))
    starts = np.flatnonzero(seg_start)  # [S] one per (row, target id)

    out_ids = np.zeros((t_len, k), dtype=np.int32)  # [T, k]
    out_lp = np.full((t_len, k), PAD_LOGPROB, dtype=np.float32)  # [T, k]
    n_seg = np.zeros(t_len, dtype=np.int64)  # [T] distinct target ids per row
    if len(starts):
        # Dropped entries sit after the last segment of their row with logprob -inf: they add exp(-inf) = 0.
        seg_max = np.maximum.reduceat(lp, starts)  # [S]
        seg_id = np.cumsum(seg_start) - 1  # [T * k_src] segment of each entry (-1 before the first)
        shifted = np.where(seg_id >= 0, lp - seg_max[np.maximum(seg_id, 0)], -np.inf)
        seg_lp = seg_max + np.log(np.add.reduceat(np.exp(shifted), starts))  # [S] logsumexp
        seg_row = starts // k_src  # [S]
        seg_id_val = key[starts]  # [S]
        n_seg = np.bincount(seg_row, minlength=t_len)
        rank = np.arange(len(starts)) - np.searchsorted(seg_row, seg_row, side="left")  # [S] index in row
        merged_lp = np.full((t_len, k_src), -np.inf)  # [T, k_src]
        merged_id = np.zeros((t_len, k_src), dtype=np.int64)
        merged_lp[seg_row, rank] = seg_lp
        merged_id[seg_row, rank] = seg_id_val
        # Descending logprob; ties keep ascending target id (the stable sort above).
        by_lp = np.argsort(-merged_lp, axis=1, kind="stable")[:, :k]  # [T, min(k, k_src)]
        top_lp = np.take_along_axis(merged_lp, by_lp, axis=1)
        top_id = np.take_along_axis(merged_id, by_lp, axis=1)
        width = top_lp.shape[1]
        finite = np.isfinite(top_lp)
        out_lp[:, :width] = np.where(finite, top_lp, PAD_LOGPROB)
        out_ids[:, :width] = np.where(finite, top_id, 0)
    return out_ids, out_lp, n_seg > 0


def align_scored(
    scored: ScoredText,
    target_ids: np.ndarray,
    target_offsets: np.ndarray | None,
    target_tokens: list[str] | None,
    vocab_map: np.ndarray,
    method: str,
    k: int,
    text: str | None = None,
    splits: TargetSplits | None = None,
    pos_map: np.ndarray | None = None,
) -> AlignedDist:
    """Sequence-align ``scored`` to the target tokenization of the same text with ``method``
    (:data:`~fuseflow.align.sequence.SEQUENCE_ALIGNERS`, config ``align.sequence``), then
    :func:`project_to_target`. ``target_tokens`` (normalised strings) are needed by ``mined-dp`` only,
    ``target_offsets`` by ``offsets``. With ``text`` and ``splits`` (config ``align.chain_rule``) the
    positions left unlinked inside a source token get :func:`chain_rule_rows` (both sides need offsets).
    A given ``pos_map`` (the identity, when both sides are one tokenization) is used as it is."""
    aligner = SEQUENCE_ALIGNERS.lookup(method)
    if pos_map is None:
        pos_map = aligner(src_offsets=scored.offsets, tgt_offsets=target_offsets, src_tokens=scored.tokens,
                          tgt_tokens=target_tokens)
    inner = None
    if splits is not None and text is not None:
        inner = chain_rule_rows(scored, text, target_offsets, pos_map, splits)
    dist = project_to_target(scored, pos_map, vocab_map, target_ids, k, inner=inner)
    dist.meta["sequence_method"] = method
    return dist
