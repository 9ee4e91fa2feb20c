"""Collate samples and their teachers' aligned distributions into one padded training batch.

Position ``t`` predicts token ``t + 1`` (see ``fuseflow/sparse.py``): a sample of ``L`` target tokens has
``L - 1`` predicting positions, and every teacher's :class:`AlignedDist` has exactly that many rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from fuseflow.models import Encoded, encode
from fuseflow.packing import pack_rows, row_capacity, row_layout
from fuseflow.sparse import AlignedDist, Sample

IGNORE = -100


class BatchError(ValueError):
    pass


@dataclass
class FusionBatch:
    """One micro-batch in rows: a row holds one sample (padded layout) or several laid end to end (packed
    layout, :mod:`fuseflow.packing`). Position ``p`` of a row predicts token ``p + 1`` of the same row; a
    position whose next token belongs to another sample (or padding) has ``loss_mask`` False."""

    sample_ids: list[str]
    teachers: list[str]
    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor | None  # [B, L] int64 (padded layout); None when packed
    labels: torch.Tensor  # [B, L-1] int64, IGNORE where nothing is predicted
    loss_mask: torch.Tensor  # [B, L-1] bool
    teacher_ids: torch.Tensor | None  # [N, B, L-1, k] int64
    teacher_logprobs: torch.Tensor | None  # [N, B, L-1, k] float32
    teacher_gold: torch.Tensor | None  # [N, B, L-1] float32
    teacher_aligned: torch.Tensor | None  # [N, B, L-1] bool
    # [N, B, L-1] float32: each teacher's nll of its sample's whole text per target position, on every position
    # of the sample (fusion.criterion 'text'); None when a teacher's distribution carries no nll (meta "nll")
    teacher_text_ce: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None  # [B, L] int64, restarting at each sample (packed layout only)
    segment_ids: torch.Tensor | None = None  # [B, L-1] int64, the sample of each position (packed layout only)

    @property
    def num_tokens(self) -> int:
        """Predicting positions that count toward the loss."""
        return int(self.loss_mask.sum())


def loss_positions(enc: Encoded, spans: Sequence[tuple[int, int]] | None) -> np.ndarray:
    """[L-1] bool: positions whose predicted token starts inside one of ``spans`` (all when ``None``).

    FuseChat applies the loss to assistant tokens only; for chat samples ``spans`` are the assistant turns.
    """
    n = len(enc.ids) - 1
    if spans is None:
        return np.ones(n, dtype=bool)
    starts = enc.offsets[1:, 0]  # [L-1] start of each predicted token
    keep = np.zeros(n, dtype=bool)
    for a, b in spans:  # a handful of turns per sample
        keep |= (starts >= a) & (starts < b)
    return keep


def collate(
    samples: Sequence[Sample],
    tokenizer,
    dists: Sequence[Mapping[str, AlignedDist]] | None,
    teachers: Sequence[str],
    top_k: int,
    encodings: Sequence[Encoded] | None = None,
    *,
    pack: bool = False,
    attn_implementation: str | None = None,
) -> FusionBatch:
    """Lay ``samples`` (target tokens) out in rows and stack each teacher's distributions the same way.
    ``dists=None`` → CLM only. Each sample's encoding is its own (``Sample.encoding``) unless ``encodings`` are
    given; ``dists`` are checked already (one row per target position: the ready feed's ``check_ready``), and a
    distribution that does not fit its sample raises :class:`BatchError`.

    ``pack=False``: one sample per row, right-padded, with an attention mask. ``pack=True``: samples are
    packed first-fit-decreasing into rows (:func:`fuseflow.packing.row_capacity` for
    ``attn_implementation``: one row for varlen kernels, rows no longer than the longest sample otherwise)
    with restarted ``position_ids`` and no attention mask, so no FLOP goes to padding.
    """
    if encodings is None:  # each sample's own (issue 25: made once, where it was cut or received)
        encodings = [s.encoding if s.encoding is not None else encode(tokenizer, s.text) for s in samples]
    encs = list(encodings)
    lengths = np.array([len(e.ids) for e in encs], dtype=np.int64)  # [S]
    too_short = [s.id for s, n in zip(samples, lengths) if n < 2]
    if too_short:
        raise BatchError(f"samples {too_short} have fewer than 2 target tokens")
    if pack and len(samples) > 1:
        # Varlen kernels get the whole micro-batch as one row (flash-attention reads packed position ids only
        # from a batch of one row); dense masks get rows no longer than the longest sample.
        rows = pack_rows(lengths, row_capacity(lengths, attn_implementation, int(lengths.sum())))
    else:
        rows = [[i] for i in range(len(samples))]
    b = len(rows)
    placed = np.array([i for row in rows for i in row], dtype=np.int64)  # [S] samples in row-major order
    row_of = np.empty(len(samples), dtype=np.int64)  # [S]
    offset = np.empty(len(samples), dtype=np.int64)  # [S] where each sample starts in its row
    for r, row in enumerate(rows):  # loops over samples, never tokens
        row_of[row] = r
        offset[row] = np.cumsum(lengths[row]) - lengths[row]
    real, positions = row_layout(lengths[placed], [len(row) for row in rows])  # [B, L] each
    L = real.shape[1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = np.full((b, L), pad, dtype=np.int64)  # [B, L]
    labels = np.full((b, L - 1), IGNORE, dtype=np.int64)  # [B, L-1]
    mask = np.zeros((b, L - 1), dtype=bool)  # [B, L-1]
    for i, (s, e) in enumerate(zip(samples, encs)):
        r, o, n = row_of[i], offset[i], len(e.ids)
        input_ids[r, o : o + n] = e.ids
        labels[r, o : o + n - 1] = e.ids[1:]
        mask[r, o : o + n - 1] = loss_positions(e, s.loss_spans)
    packed = any(len(row) > 1 for row in rows)
    position_ids = segment_ids = None
    if packed:
        position_ids = torch.from_numpy(positions)  # restarts mark the samples (and each row's padding tail)
        # Sample index per predicting position, for per-sample fusion (MinCE/AvgCE); padding gets its own.
        segments = np.full((b, L), len(samples), dtype=np.int64)  # [B, L]
        segments[real] = np.repeat(placed, lengths[placed])
        segment_ids = torch.from_numpy(segments[:, :-1])
    out = FusionBatch(
        sample_ids=[s.id for s in samples],
        teachers=list(teachers),
        input_ids=torch.from_numpy(input_ids),
        attention_mask=None if packed else torch.from_numpy(real.astype(np.int64)),
        labels=torch.from_numpy(labels),
        loss_mask=torch.from_numpy(mask),
        teacher_ids=None,
        teacher_logprobs=None,
        teacher_gold=None,
        teacher_aligned=None,
        position_ids=position_ids,
        segment_ids=segment_ids,
    )
    if dists is None or not teachers:
        return out
    n_t = len(teachers)
    t_ids = np.zeros((n_t, b, L - 1, top_k), dtype=np.int64)  # [N, B, L-1, k]
    t_lp = np.full((n_t, b, L - 1, top_k), -np.inf, dtype=np.float32)  # [N, B, L-1, k]
    t_gold = np.zeros((n_t, b, L - 1), dtype=np.float32)  # [N, B, L-1]
    t_al = np.zeros((n_t, b, L - 1), dtype=bool)  # [N, B, L-1]
    t_text = np.zeros((n_t, b, L - 1), dtype=np.float32)  # [N, B, L-1]
    with_nll = all("nll" in d.meta for per_teacher in dists for d in per_teacher.values())
    for i, per_teacher in enumerate(dists):
        r, o, n = row_of[i], offset[i], lengths[i] - 1
        for j, name in enumerate(teachers):
            try:
                d = per_teacher[name]
                kk = min(top_k, d.top_k)
                # reshape, not broadcasting: rows that are not the sample's n positions raise ValueError
                t_ids[j, r, o : o + n, :kk] = d.ids[:, :kk].reshape(n, kk)
                t_lp[j, r, o : o + n, :kk] = d.logprobs[:, :kk].reshape(n, kk)
                t_gold[j, r, o : o + n] = d.gold_logprobs.reshape(n)
                t_al[j, r, o : o + n] = d.aligned.reshape(n)
            except (KeyError, ValueError) as e:
                # The ready feed's check (check_ready) counted the positions, once; a caller that skipped it gets
                # this instead of numpy's error.
                raise BatchError(_unfit(samples[i].id, name, per_teacher.get(name), n)) from e
            if with_nll:
                t_text[j, r, o : o + n] = float(d.meta["nll"]) / n
    out.teacher_ids = torch.from_numpy(t_ids)
    out.teacher_logprobs = torch.from_numpy(t_lp)
    out.teacher_gold = torch.from_numpy(t_gold)
    out.teacher_aligned = torch.from_numpy(t_al)
    out.teacher_text_ce = torch.from_numpy(t_text) if with_nll else None
    return out


def _unfit(sample_id: str, teacher: str, dist: AlignedDist | None, positions: int) -> str:
    if dist is None:
        return f"sample {sample_id}: no distribution from teacher {teacher!r}"
    return (f"sample {sample_id}: teacher {teacher!r} sent {dist.num_positions} positions, the target tokenizer gives "
            f"{positions}: teacher and trainer must use the same target tokenizer")
