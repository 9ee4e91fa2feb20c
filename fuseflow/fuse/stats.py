"""What a micro-batch says of each teacher, beside the loss: its CE of the gold text, the fidelity of its
aligned rows (:mod:`fuseflow.align.fidelity`) and its share of each sample under the fusion (issue 21).
Computed under ``no_grad`` next to the fusion by the trainer (and by ``bench/train.py``, which times it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fuseflow.align.fidelity import row_fidelity
from fuseflow.fuse.fusion import choice_weights
from fuseflow.fuse.loss import per_teacher_ce

__all__ = ["TeacherStats", "teacher_stats"]


@dataclass
class TeacherStats:
    """``N`` teachers, ``S`` samples: ``ce [N]`` each teacher's CE of the gold text; ``fidelity [N, 4]`` the
    sums of :func:`~fuseflow.align.fidelity.row_fidelity`; ``choice [N, S]`` its share of each sample under
    the fusion (one-hot for MinCE; ``None`` for a fusion without a known rule, or no sample)."""

    ce: torch.Tensor
    fidelity: torch.Tensor
    choice: torch.Tensor | None


def teacher_stats(
    ids: torch.Tensor, logprobs: torch.Tensor, gold: torch.Tensor, aligned: torch.Tensor, labels: torch.Tensor,
    mask: torch.Tensor, function: str, *, segments: torch.Tensor | None = None, num_samples: int | None = None,
    ce: torch.Tensor | None = None,
) -> TeacherStats:
    """:class:`TeacherStats` of a batch laid out as the trainer's (``[N, B, T, k]`` teacher rows, ``labels`` and
    ``mask [B, T]``): one sample per row, or the samples of ``segments [B, T]`` (packed rows; padding carries
    the index ``num_samples``). ``function`` and ``ce`` as given to the fusion."""
    n_samples = mask.shape[0] if num_samples is None else num_samples
    weights = choice_weights(function, gold, aligned, mask, segments=segments, ce=ce)  # [N, B, T]
    choice = None
    if weights is not None and n_samples:
        dev = mask.device
        sample = segments if segments is not None else \
            torch.arange(mask.shape[0], device=dev).unsqueeze(1).expand(mask.shape)  # [B, T]
        flat, counted = sample.reshape(-1), mask.reshape(-1).float()  # [B*T]
        sums = torch.zeros((weights.shape[0], n_samples + 1), dtype=torch.float32, device=dev).index_add_(
            1, flat, weights.reshape(weights.shape[0], -1).float() * counted)[:, :n_samples]  # [N, S]
        counts = torch.zeros(n_samples + 1, device=dev).index_add_(0, flat, counted)[:n_samples]  # [S]
        choice = sums / counts.clamp(min=1)
    return TeacherStats(
        ce=per_teacher_ce(gold, mask, aligned),  # [N]
        fidelity=row_fidelity(ids, logprobs, aligned, labels, mask).sum(1),  # [N, 4]
        choice=choice,
    )
