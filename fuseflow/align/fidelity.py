"""How faithfully a teacher's aligned rows carry what the target must predict (issue 21).

Per teacher, over the target positions that count: **coverage** (share with a teacher row rather than the
one-hot gold fallback), **miss rate** (share of those rows without the gold next target token) and **mean
p(gold)** (the gold token's probability in the row renormalised over its k entries, 0 where missing). The
same three figures for the target's own top-k (the target listed as a source) are the yardstick: a row that
misses the gold token more often than the target's own teaches the target nothing it does not know.
Reported by the trainer's metrics, ``report.json`` and ``bench/align.py``.
"""

from __future__ import annotations

import torch

__all__ = ["FIDELITY_FIELDS", "row_fidelity", "fidelity_summary"]

FIDELITY_FIELDS = ("positions", "covered", "missed", "p_gold")


def row_fidelity(
    ids: torch.Tensor, logprobs: torch.Tensor, aligned: torch.Tensor, gold_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Sums over the positions (the dim before ``k``): ``[..., 4]`` float64 = (positions counted, positions
    with a teacher row, rows missing the gold token, Σ p(gold) over the rows).

    ``ids``/``logprobs [..., T, k]`` (``-inf`` padding), ``aligned [..., T]``, ``gold_ids [..., T]`` (the
    target's next token), ``mask [..., T]`` (positions that count); leading dims broadcast (``[N, B, T, k]``
    teacher rows against ``[B, T]`` labels).
    """
    lp = logprobs.double()
    finite = torch.isfinite(lp)
    lse = torch.logsumexp(torch.where(finite, lp, torch.full_like(lp, -torch.inf)), dim=-1, keepdim=True)
    probs = torch.where(finite, (lp - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))).exp(),
                        torch.zeros_like(lp))  # [..., T, k] renormalised over the row
    hit = (ids == gold_ids.unsqueeze(-1)) & finite  # [..., T, k]
    p_gold = (probs * hit).sum(-1)  # [..., T]
    mask = mask.expand(aligned.shape)
    counted = aligned & mask
    out = torch.stack([
        mask.sum(-1).double(),
        counted.sum(-1).double(),
        (counted & ~hit.any(-1)).sum(-1).double(),
        torch.where(counted, p_gold, torch.zeros_like(p_gold)).sum(-1),
    ], dim=-1)  # [..., 4]
    return out


def fidelity_summary(sums) -> dict:
    """``{coverage, miss_rate, p_gold, positions}`` from summed :func:`row_fidelity` (a sequence of 4)."""
    positions, covered, missed, p_gold = (float(x) for x in sums)
    return {
        "coverage": covered / positions if positions else 0.0,
        "miss_rate": missed / covered if covered else 0.0,
        "p_gold": p_gold / covered if covered else 0.0,
        "positions": int(positions),
    }
