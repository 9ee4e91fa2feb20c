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
from fuseflow.sparse import AlignedDist, Sample

IGNORE = -100


class BatchError(ValueError):
    pass


@dataclass
class FusionBatch:
    sample_ids: list[str]
    teachers: list[str]
    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64
    labels: torch.Tensor  # [B, L-1] int64, IGNORE where padding
    loss_mask: torch.Tensor  # [B, L-1] bool
    teacher_ids: torch.Tensor | None  # [N, B, L-1, k] int64
    teacher_logprobs: torch.Tensor | None  # [N, B, L-1, k] float32
    teacher_gold: torch.Tensor | None  # [N, B, L-1] float32
    teacher_aligned: torch.Tensor | None  # [N, B, L-1] bool

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
) -> FusionBatch:
    """Pad ``samples`` (target tokens) and stack each teacher's distributions. ``dists=None`` → CLM only."""
    encs = list(encodings) if encodings is not None else [encode(tokenizer, s.text) for s in samples]
    b = len(samples)
    lengths = [len(e.ids) for e in encs]
    too_short = [s.id for s, n in zip(samples, lengths) if n < 2]
    if too_short:
        raise BatchError(f"samples {too_short} have fewer than 2 target tokens")
    L = max(lengths)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = np.full((b, L), pad, dtype=np.int64)  # [B, L]
    attention = np.zeros((b, L), dtype=np.int64)  # [B, L]
    labels = np.full((b, L - 1), IGNORE, dtype=np.int64)  # [B, L-1]
    mask = np.zeros((b, L - 1), dtype=bool)  # [B, L-1]
    for i, (s, e) in enumerate(zip(samples, encs)):
        n = len(e.ids)
        input_ids[i, :n] = e.ids
        attention[i, :n] = 1
        labels[i, : n - 1] = e.ids[1:]
        mask[i, : n - 1] = loss_positions(e, s.loss_spans)
    out = FusionBatch(
        sample_ids=[s.id for s in samples],
        teachers=list(teachers),
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention),
        labels=torch.from_numpy(labels),
        loss_mask=torch.from_numpy(mask),
        teacher_ids=None,
        teacher_logprobs=None,
        teacher_gold=None,
        teacher_aligned=None,
    )
    if dists is None or not teachers:
        return out
    n_t = len(teachers)
    t_ids = np.zeros((n_t, b, L - 1, top_k), dtype=np.int64)  # [N, B, L-1, k]
    t_lp = np.full((n_t, b, L - 1, top_k), -np.inf, dtype=np.float32)  # [N, B, L-1, k]
    t_gold = np.zeros((n_t, b, L - 1), dtype=np.float32)  # [N, B, L-1]
    t_al = np.zeros((n_t, b, L - 1), dtype=bool)  # [N, B, L-1]
    for i, (s, e, per_teacher) in enumerate(zip(samples, encs, dists)):
        n = len(e.ids) - 1
        for j, name in enumerate(teachers):
            d = per_teacher.get(name)
            if d is None:
                raise BatchError(f"sample {s.id}: no distribution from teacher {name!r}")
            if d.num_positions != n:
                raise BatchError(
                    f"sample {s.id}: teacher {name!r} sent {d.num_positions} positions, the target tokenizer "
                    f"gives {n}: teacher and trainer must use the same target tokenizer"
                )
            kk = min(top_k, d.top_k)
            t_ids[j, i, :n, :kk] = d.ids[:, :kk]
            t_lp[j, i, :n, :kk] = d.logprobs[:, :kk]
            t_gold[j, i, :n] = d.gold_logprobs
            t_al[j, i, :n] = d.aligned
    out.teacher_ids = torch.from_numpy(t_ids)
    out.teacher_logprobs = torch.from_numpy(t_lp)
    out.teacher_gold = torch.from_numpy(t_gold)
    out.teacher_aligned = torch.from_numpy(t_al)
    return out
