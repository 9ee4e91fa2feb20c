"""Fusion functions: several teachers' aligned sparse top-k distributions → one fused sparse distribution.

FuseLLM (Wan et al., arXiv 2401.10491, §3.3) scores each source's distribution matrix by its cross-entropy
against the gold text and either keeps the best one (MinCE) or averages them with CE-derived weights
(AvgCE). The released code (FuseAI ``FuseLLM/src/utils/trainer.py``, ``DistillTrainer.compute_loss``) fixes
the details this module follows:

- a source's distribution at a position is the softmax of its top-k logits (``data_collator.py``,
  ``DataCollatorForDistill``), so every teacher row is renormalised over its k entries here first;
- a source's score is its reward ``1 / exp(CE)`` (``align_reward_*``, ``base_reward``), CE being the mean
  per-token cross-entropy of the gold text (``forward_for_logits.py``, ``metric_ce``);
- MinCE keeps the distribution of the source with the largest reward (``distill_greater_as_gt``);
- AvgCE weights the sources by ``softmax(reward)`` over the sources (``distill_weighted_as_gt``).

Input convention for a batch with N teachers (stacked ``fuseflow.sparse.AlignedDist`` records):

- ``ids``      ``[N, B, T, k]`` target vocab ids
- ``logprobs`` ``[N, B, T, k]`` descending, ``-inf`` padding
- ``gold``     ``[N, B, T]`` each teacher's logprob of the gold next text at t (meaningless where not aligned)
- ``aligned``  ``[N, B, T]`` bool
- ``mask``     ``[B, T]`` bool: positions that count (not padding; assistant tokens for chat)
- ``segments`` ``[B, T]`` int64, optional: the sample each position belongs to when a row packs several
  samples end to end (``fuseflow.packing``); without it each row is one sample. Sequence-level fusions
  (MinCE, AvgCE) score teachers per sample either way.

CE is taken over the positions that are both counted (``mask``) and aligned for that teacher, since the
gold logprob means nothing elsewhere. A teacher with no such position in a sequence cannot be scored: it is
never chosen by MinCE (unless no teacher can be scored, then teacher 0 is) and gets weight 0 in AvgCE
(uniform weights if no teacher can be scored). Where a teacher is not aligned its row is already the
one-hot gold fallback (``AlignedDist``), so no other special case is needed. When the target model is one
of the teachers its own distribution is simply one more candidate, as ``distill_with_ref_model`` does.

Every fusion returns ``(ids [B, T, k2], logprobs [B, T, k2])``: sorted descending, ``-inf`` / id 0 padding,
distinct ids per row, ``k2 = top_k`` if given, else the teachers' k. Logprobs are the fused probabilities' logs
*without* renormalising after truncation to k2 (the mass kept stays visible).

Two options change what FuseLLM's released code does (issue 11, docs/quality.md):

- ``renormalise=False`` keeps every teacher row as the teacher gave it (its top-k probabilities, summing to
  less than 1) instead of renormalising it over its k entries first; the fused rows then carry the teachers'
  mass outside their top-k, which the tail KL (``fusion_loss(tail=True)``, config ``fusion.kl: tail``) keeps.
- ``ce`` ``[N, B, T]``: the per-sample CE to rank teachers by, given by the caller instead of the mean over a
  teacher's aligned positions. The trainer passes each teacher's whole-text nll over the sample's target
  positions (config ``fusion.criterion: text``): the same text for every teacher, so the ranking no longer
  depends on how much text one aligned token covers. Sequence-level fusions only.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch

from fuseflow.registry import Registry

__all__ = [
    "FUSIONS",
    "SAMPLE_CE_FUSIONS",
    "FusionFn",
    "avg_ce",
    "avg_ce_token",
    "ce_weights",
    "choice_weights",
    "fusion",
    "get_fusion",
    "merge_duplicate_ids",
    "min_ce",
    "min_ce_token",
    "segment_ce",
    "sequence_ce",
    "token_ce",
]


class FusionFn(Protocol):
    def __call__(
        self,
        ids: torch.Tensor,
        logprobs: torch.Tensor,
        gold: torch.Tensor,
        aligned: torch.Tensor,
        mask: torch.Tensor,
        *,
        top_k: int | None = None,
        segments: torch.Tensor | None = None,
        renormalise: bool = True,
        ce: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


FUSIONS: Registry[FusionFn] = Registry("fusion function", field="fusion.function")
# The fusions that rank teachers per sample, so that a caller's per-sample ``ce`` applies (``fusion.criterion``).
SAMPLE_CE_FUSIONS = ("min_ce", "avg_ce")


def fusion(name: str) -> Callable[[FusionFn], FusionFn]:
    """Register a fusion function under ``name`` (the value of the run config's ``fusion`` field)."""
    return FUSIONS.register(name)


def get_fusion(name: str) -> FusionFn:
    return FUSIONS.lookup(name)


# ----------------------------------------------------------------------------------------------------------
# Building blocks (pure tensor functions).
# ----------------------------------------------------------------------------------------------------------


def merge_duplicate_ids(ids: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge repeated ids within each row of a sparse distribution by summing their probabilities.

    ``ids [..., m]`` (integer), ``probs [..., m]`` (≥ 0) → ``(ids [..., m], probs [..., m])`` with each id at
    most once per row, sorted by probability descending (ties by id ascending); freed slots hold id 0 and
    probability 0. Vectorised: sort by id, mark segment starts, ``scatter_add`` each segment into its slot.
    """
    if ids.shape != probs.shape:
        raise ValueError(f"ids shape {tuple(ids.shape)} != probs shape {tuple(probs.shape)}")
    shape = ids.shape
    m = shape[-1]
    flat_ids = ids.reshape(-1, m)  # [R, m]
    flat_probs = probs.reshape(-1, m)  # [R, m]
    sorted_ids, order = flat_ids.sort(dim=-1, stable=True)  # [R, m]
    sorted_probs = flat_probs.gather(-1, order)  # [R, m]
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)  # [R, m]
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    segment = starts.cumsum(-1) - 1  # [R, m] slot of each entry's id within its row
    merged_probs = torch.zeros_like(sorted_probs).scatter_add_(-1, segment, sorted_probs)  # [R, m]
    # Every entry of a segment writes the same id, so the scatter's write order does not matter.
    merged_ids = torch.zeros_like(sorted_ids).scatter_(-1, segment, sorted_ids)  # [R, m]
    out_probs, by_prob = merged_probs.sort(dim=-1, descending=True, stable=True)  # [R, m]
    out_ids = merged_ids.gather(-1, by_prob)  # [R, m]
    out_ids = torch.where(out_probs > 0, out_ids, torch.zeros_like(out_ids))
    return out_ids.reshape(shape), out_probs.reshape(shape)


def sequence_ce(gold: torch.Tensor, aligned: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean CE of the gold text per teacher and sequence: ``[N, B, T]`` → ``[N, B]``; ``inf`` where no position
    is both counted and aligned (the teacher cannot be scored on that sequence)."""
    counted = aligned & mask.unsqueeze(0)  # [N, B, T]
    nll = torch.where(counted, -gold.float(), torch.zeros((), device=gold.device)).sum(-1)  # [N, B]
    n = counted.sum(-1)  # [N, B]
    return torch.where(n > 0, nll / n.clamp(min=1), torch.full_like(nll, math.inf))


def segment_ce(gold: torch.Tensor, aligned: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """:func:`sequence_ce` per sample of a packed batch, broadcast back to positions: ``[N, B, T]``.

    ``segments [B, T]`` (int, ``>= 0``) names the sample of each position; every position of a sample gets
    the sample's mean CE (``inf`` where the teacher has no counted, aligned position in it).
    """
    if segments.shape != mask.shape or segments.dtype.is_floating_point:
        raise ValueError(f"segments must be integer [B, T] = {tuple(mask.shape)}, got {tuple(segments.shape)}")
    n = gold.shape[0]
    flat = segments.reshape(-1).long()  # [B*T]
    num = int(flat.max()) + 1 if flat.numel() else 0
    counted = (aligned & mask.unsqueeze(0)).reshape(n, -1)  # [N, B*T]
    nll = torch.where(counted, -gold.float().reshape(n, -1), torch.zeros((), device=gold.device))  # [N, B*T]
    sums = torch.zeros((n, num), dtype=torch.float32, device=gold.device).index_add_(1, flat, nll)  # [N, S]
    counts = torch.zeros((n, num), dtype=torch.float32, device=gold.device).index_add_(1, flat, counted.float())
    ce = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, math.inf))  # [N, S]
    return ce[:, flat].reshape(gold.shape)  # [N, B, T]


def token_ce(gold: torch.Tensor, aligned: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CE of the gold text per teacher and position: ``[N, B, T]``; ``inf`` where not counted or not aligned."""
    counted = aligned & mask.unsqueeze(0)  # [N, B, T]
    return torch.where(counted, -gold.float(), torch.full((), math.inf, device=gold.device))


def ce_weights(ce: torch.Tensor) -> torch.Tensor:
    """AvgCE weights over teachers (dim 0): ``softmax(1 / exp(CE))`` as FuseLLM's ``distill_weighted_as_gt``.

    Teachers with ``CE = inf`` (unscored) get weight 0; where every teacher is unscored the weights are uniform.
    Note the released code takes the softmax of the *rewards* ``exp(-CE) ∈ (0, 1]``, not of ``-CE``, so the
    weights of scored teachers differ by at most a factor e.
    """
    scored = torch.isfinite(ce)  # [N, ...]
    reward = torch.exp(-ce)  # [N, ...]
    logits = torch.where(scored, reward, torch.full_like(reward, -math.inf))
    any_scored = scored.any(0, keepdim=True)  # [1, ...]
    logits = torch.where(any_scored, logits, torch.zeros_like(logits))
    return torch.softmax(logits, dim=0)


def _renormalised_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last dim with ``-inf`` entries excluded; an all ``-inf`` row stays all ``-inf``."""
    logprobs = logprobs.float()
    lse = torch.logsumexp(logprobs, dim=-1, keepdim=True)  # [..., 1]
    return logprobs - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def _resize_k(ids: torch.Tensor, logprobs: torch.Tensor, k2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first ``k2`` entries of descending rows, padding with id 0 / ``-inf`` when there are fewer."""
    k = ids.shape[-1]
    if k2 <= k:
        return ids[..., :k2].contiguous(), logprobs[..., :k2].contiguous()
    pad = (*ids.shape[:-1], k2 - k)
    return (
        torch.cat([ids, ids.new_zeros(pad)], dim=-1),
        torch.cat([logprobs, logprobs.new_full(pad, -math.inf)], dim=-1),
    )


def _sample_ce(gold, aligned, mask, segments, ce=None) -> torch.Tensor:
    """Per-sample CE shaped to broadcast over ``[N, B, T]``: ``[N, B, 1]`` (one sample per row) or
    ``[N, B, T]`` (packed rows, or the caller's ``ce``)."""
    if ce is not None:
        if ce.shape != gold.shape:
            raise ValueError(f"ce shape {tuple(ce.shape)} != gold shape [N, B, T] = {tuple(gold.shape)}")
        return ce.float()
    if segments is None:
        return sequence_ce(gold, aligned, mask).unsqueeze(-1)  # [N, B, 1]
    return segment_ce(gold, aligned, mask, segments)  # [N, B, T]


def _check_inputs(ids, logprobs, gold, aligned, mask, top_k) -> None:
    if ids.dim() != 4:
        raise ValueError(f"ids must be [N teachers, B, T, k], got shape {tuple(ids.shape)}")
    n, b, t, _ = ids.shape
    if logprobs.shape != ids.shape:
        raise ValueError(f"logprobs shape {tuple(logprobs.shape)} != ids shape {tuple(ids.shape)}")
    if gold.shape != (n, b, t) or aligned.shape != (n, b, t):
        raise ValueError(
            f"gold {tuple(gold.shape)} and aligned {tuple(aligned.shape)} must be [N, B, T] = {(n, b, t)}"
        )
    if mask.shape != (b, t):
        raise ValueError(f"mask shape {tuple(mask.shape)} != [B, T] = {(b, t)}")
    if ids.dtype.is_floating_point or aligned.dtype != torch.bool or mask.dtype != torch.bool:
        raise ValueError(f"ids must be integer and aligned/mask bool, got {ids.dtype}, {aligned.dtype}, {mask.dtype}")
    if n == 0:
        raise ValueError("fusion needs at least one teacher (N = 0); list them in the config field 'sources'")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k} (config field 'fusion.top_k')")


def _no_sample_ce(ce, name: str) -> None:
    if ce is not None:
        raise ValueError(f"{name} ranks teachers per position by their gold logprob; a per-sample ce (config "
                         "'fusion.criterion: text') applies to min_ce and avg_ce only")


def _select_teacher(
    ids: torch.Tensor, logprobs: torch.Tensor, best: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick, at every (b, t), the row of teacher ``best[b, t]``: ``[N, B, T, k]`` → ``[B, T, k]``."""
    _, b, t, k = ids.shape
    index = best.expand(b, t).reshape(1, b, t, 1).expand(1, b, t, k)  # [1, B, T, k]
    return ids.gather(0, index).squeeze(0), logprobs.gather(0, index).squeeze(0)


def _teacher_rows(logprobs: torch.Tensor, renormalise: bool) -> torch.Tensor:
    """The teachers' rows as the fusion reads them: renormalised over their k entries (FuseLLM) or as given."""
    return _renormalised_logprobs(logprobs) if renormalise else logprobs.float()


def _weighted_union(
    ids: torch.Tensor, logprobs: torch.Tensor, weights: torch.Tensor, k2: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_n weights[n] · p_n`` over the union of the teachers' ids, top ``k2`` kept.

    ``weights`` broadcasts to ``[N, B, T]``; returns ``(ids [B, T, k2], logprobs [B, T, k2])``.
    """
    n, b, t, k = ids.shape
    probs = logprobs.float().exp() * weights.expand(n, b, t).unsqueeze(-1)  # [N, B, T, k]
    union_ids = ids.permute(1, 2, 0, 3).reshape(b, t, n * k)  # [B, T, N*k]
    union_probs = probs.permute(1, 2, 0, 3).reshape(b, t, n * k)  # [B, T, N*k]
    merged_ids, merged_probs = merge_duplicate_ids(union_ids, union_probs)  # [B, T, N*k]
    return _resize_k(merged_ids, merged_probs.log(), k2)


def choice_weights(
    function: str, gold: torch.Tensor, aligned: torch.Tensor, mask: torch.Tensor, *,
    segments: torch.Tensor | None = None, ce: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``[N, B, T]``: the weight each teacher's row has at each position under the fusion ``function``
    (one-hot where MinCE picks a teacher, the CE weights of AvgCE): what the trainer reports as each teacher's
    share of the samples (issue 21). ``None`` for a fusion registered from outside, whose rule is its own.
    The selections are those of the fusion functions below: the same criterion (``_sample_ce`` or
    ``token_ce``), ``argmin`` or ``ce_weights``."""
    n, b, t = gold.shape
    if function in ("min_ce", "min_ce_token"):
        crit = _sample_ce(gold, aligned, mask, segments, ce) if function == "min_ce" else token_ce(gold, aligned, mask)
        best = crit.argmin(0).expand(b, t)  # [B, T]
        return torch.nn.functional.one_hot(best, n).permute(2, 0, 1).float()  # [N, B, T]
    if function in ("avg_ce", "avg_ce_token"):
        crit = _sample_ce(gold, aligned, mask, segments, ce) if function == "avg_ce" else token_ce(gold, aligned, mask)
        return ce_weights(crit).expand(n, b, t)
    return None


# ----------------------------------------------------------------------------------------------------------
# The registry.
# ----------------------------------------------------------------------------------------------------------


@fusion("min_ce")
def min_ce(ids, logprobs, gold, aligned, mask, *, top_k=None, segments=None, renormalise=True, ce=None):
    """MinCE (FuseLLM §3.3): per sequence, the distribution matrix of the teacher with the lowest CE.

    Released code: ``distill_greater_as_gt`` — ``argmax`` of the reward ``1/exp(CE)`` over the sources, i.e.
    ``argmin`` CE; ties go to the first teacher, as ``torch.argmax`` does there.
    """
    _check_inputs(ids, logprobs, gold, aligned, mask, top_k)
    best = _sample_ce(gold, aligned, mask, segments, ce).argmin(0)  # [B, 1] or [B, T]
    fused_ids, fused = _select_teacher(ids, _teacher_rows(logprobs, renormalise), best)
    return _resize_k(fused_ids, fused, top_k or ids.shape[-1])


@fusion("avg_ce")
def avg_ce(ids, logprobs, gold, aligned, mask, *, top_k=None, segments=None, renormalise=True, ce=None):
    """AvgCE (FuseLLM §3.3): per sequence, the CE-weighted average of the teachers' distribution matrices.

    Weights ``softmax_n(1/exp(CE_n))`` as the released ``distill_weighted_as_gt`` (see ``ce_weights``); the
    average is taken over the union of the teachers' ids (duplicates summed) and its top ``top_k`` kept.
    """
    _check_inputs(ids, logprobs, gold, aligned, mask, top_k)
    weights = ce_weights(_sample_ce(gold, aligned, mask, segments, ce))  # [N, B, 1] or [N, B, T]
    return _weighted_union(ids, _teacher_rows(logprobs, renormalise), weights, top_k or ids.shape[-1])


@fusion("min_ce_token")
def min_ce_token(ids, logprobs, gold, aligned, mask, *, top_k=None, segments=None, renormalise=True, ce=None):
    """MinCE at token granularity: at each position, the row of the aligned teacher with the lowest CE there.

    The CE of a position is ``-gold``. FuseLLM's ``forward_for_logits.py --save_per_token_metric`` keeps
    per-token CEs, but its ``packing.py`` still reduces them to one CE per block, so this variant is ours.
    Where no teacher is aligned every row is the one-hot gold fallback and teacher 0's is kept.
    """
    _check_inputs(ids, logprobs, gold, aligned, mask, top_k)
    _no_sample_ce(ce, "min_ce_token")
    del segments  # per position: packed rows need nothing more
    best = token_ce(gold, aligned, mask).argmin(0)  # [B, T]
    fused_ids, fused = _select_teacher(ids, _teacher_rows(logprobs, renormalise), best)
    return _resize_k(fused_ids, fused, top_k or ids.shape[-1])


@fusion("avg_ce_token")
def avg_ce_token(ids, logprobs, gold, aligned, mask, *, top_k=None, segments=None, renormalise=True, ce=None):
    """AvgCE at token granularity: weights ``softmax_n(exp(gold_n[t]))`` over the teachers aligned at t.

    The per-position analogue of ``avg_ce`` (reward ``1/exp(CE)`` with CE ``= -gold``); not in FuseLLM's
    released trainer (see ``min_ce_token``). Where no teacher is aligned the weights are uniform.
    """
    _check_inputs(ids, logprobs, gold, aligned, mask, top_k)
    _no_sample_ce(ce, "avg_ce_token")
    del segments  # per position: packed rows need nothing more
    weights = ce_weights(token_ce(gold, aligned, mask))  # [N, B, T]
    return _weighted_union(ids, _teacher_rows(logprobs, renormalise), weights, top_k or ids.shape[-1])
