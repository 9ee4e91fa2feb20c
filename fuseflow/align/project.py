"""Project a teacher's top-k predictions onto the target's positions and vocabulary.

Input: the teacher's :class:`~fuseflow.sparse.ScoredText` (its tokens, its vocabulary), a ``pos_map``
(:mod:`fuseflow.align.sequence`) and a vocab map (:mod:`fuseflow.align.vocab`). Output: an
:class:`~fuseflow.sparse.AlignedDist` with one top-k row per target position, in target ids.
"""

from __future__ import annotations

import numpy as np

from fuseflow.align.sequence import SEQUENCE_ALIGNERS
from fuseflow.sparse import PAD_LOGPROB, AlignedDist, ScoredText

__all__ = ["project_to_target", "align_scored"]


def project_to_target(
    scored: ScoredText, pos_map: np.ndarray, vocab_map: np.ndarray, target_ids: np.ndarray, k: int
) -> AlignedDist:
    """The source's distributions at the target positions, in target ids, as sorted top-``k`` rows.

    Row ``t`` takes the source row ``pos_map[t]``, maps its ids through ``vocab_map`` (``[V_src] int32``),
    drops unmapped (-1) entries, merges entries that landed on the same target id by summing their
    probabilities (logsumexp) and keeps the ``k`` largest, descending. A row with no source position, or
    whose entries all dropped, is the one-hot gold next target token ``target_ids[t+1]`` with
    ``aligned=False`` (FuseLLM, arXiv 2401.10491 §3.3: unaligned positions fall back to the gold token).
    ``gold_logprobs[t]`` is the source's logprob of its own next token at the aligned position (0 elsewhere).

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
    keep = has_src[:, None] & (tgt >= 0) & np.isfinite(src_lp)  # [T, k_src]

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

    aligned = n_seg > 0  # [T]
    gold_next = target_ids[1:].astype(np.int32)  # [T]
    out_ids[~aligned] = 0
    out_ids[~aligned, 0] = gold_next[~aligned]
    out_lp[~aligned] = PAD_LOGPROB
    out_lp[~aligned, 0] = 0.0
    gold = np.zeros(t_len, dtype=np.float32)  # [T]
    if n_src_rows:
        gold[aligned] = scored.gold_logprobs[rows[aligned]]
    return AlignedDist(ids=out_ids, logprobs=out_lp, gold_logprobs=gold, aligned=aligned)


def align_scored(
    scored: ScoredText,
    target_ids: np.ndarray,
    target_offsets: np.ndarray | None,
    target_tokens: list[str] | None,
    vocab_map: np.ndarray,
    method: str,
    k: int,
) -> AlignedDist:
    """Sequence-align ``scored`` to the target tokenization of the same text with ``method``
    (:data:`~fuseflow.align.sequence.SEQUENCE_ALIGNERS`, config ``align.sequence``), then
    :func:`project_to_target`. ``target_tokens`` (normalised strings) are needed by ``mined-dp`` only,
    ``target_offsets`` by ``offsets``."""
    pos_map = SEQUENCE_ALIGNERS.lookup(method)(
        src_offsets=scored.offsets, tgt_offsets=target_offsets, src_tokens=scored.tokens, tgt_tokens=target_tokens
    )
    dist = project_to_target(scored, pos_map, vocab_map, target_ids, k)
    dist.meta["sequence_method"] = method
    return dist
