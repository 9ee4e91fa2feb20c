"""The training objective ``λ·CLM + (1−λ)·KL(fused ‖ student)`` on sparse top-k teacher rows.

FuseLLM (arXiv 2401.10491, Eq. 5) trains on ``λ·L_CLM + (1−λ)·L_Fusion`` (λ = 0.9 in its scripts,
``--lm_loss_weight 0.9``). Its released trainer materialises a dense ``[B, T, V]`` bf16 teacher tensor and
the full ``[B, T, V]`` logits; here neither exists at once:

- the teacher side stays sparse: k target ids and logprobs per position;
- the student's logits are computed from the last hidden state and the lm_head weight in chunks of
  ``chunk_tokens`` counted positions, each chunk under ``torch.utils.checkpoint`` so that its ``[chunk, V]``
  logits are freed after the forward and recomputed in the backward: one chunk's logits alive at a time, in
  both passes (the vocabulary no longer limits the batch size, activations do);
- log-softmax is in fp32 whatever the input dtype: the reference's fp16 CE produced NaNs.

All losses are means over the counted positions (``mask``) of this call; a data-parallel trainer that wants a
global token mean weights each rank by ``n_tokens``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["LossParts", "clm_loss", "fusion_loss", "per_teacher_ce", "sparse_kl"]


@dataclass
class LossParts:
    """Scalar tensors: ``loss = lam·clm + (1−lam)·kl``; ``n_tokens`` (int64) is the count they average over."""

    loss: torch.Tensor
    clm: torch.Tensor
    kl: torch.Tensor
    n_tokens: torch.Tensor


def sparse_kl(
    student_logprobs_at_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: float = 1.0,
    *,
    scale_by_t2: bool = True,
) -> torch.Tensor:
    """``KL(p ‖ q)`` restricted to the teacher's k entries, per row: ``[..., k]`` → ``[...]`` (fp32).

    ``p = softmax(teacher_logprobs / τ)`` over the k entries (``-inf`` entries get ``p = 0`` and contribute
    nothing); ``q`` is the student's *full-vocabulary* ``log_softmax(logits / τ)`` gathered at the teacher's
    ids — the caller applies τ to the student, this function only to the teacher. ``Σ_k p (log p − log q) ≥
    −log Σ_k q ≥ 0``, zero only when the student puts exactly ``p`` on those ids.

    ``scale_by_t2`` multiplies by τ² so that the gradient magnitude does not shrink as 1/τ² (Hinton et al.
    2015, "Distilling the Knowledge in a Neural Network", §2).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (config field 'fusion.temperature')")
    if student_logprobs_at_ids.shape != teacher_logprobs.shape:
        raise ValueError(
            f"student logprobs {tuple(student_logprobs_at_ids.shape)} != teacher logprobs "
            f"{tuple(teacher_logprobs.shape)}"
        )
    scaled = teacher_logprobs.float() / temperature  # [..., k]
    lse = torch.logsumexp(scaled, dim=-1, keepdim=True)  # [..., 1]
    log_p = scaled - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # [..., k]
    present = torch.isfinite(log_p)  # [..., k]
    # Zero the absent entries before the product: 0 · (-inf) would be NaN, in the forward and the backward.
    log_p = torch.where(present, log_p, torch.zeros_like(log_p))
    p = torch.where(present, log_p.exp(), torch.zeros_like(log_p))
    kl = (p * (log_p - student_logprobs_at_ids.float())).sum(-1)  # [...]
    return kl * temperature**2 if scale_by_t2 else kl


def per_teacher_ce(gold: torch.Tensor, mask: torch.Tensor, aligned: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE of the gold text per teacher over the batch's counted positions: ``[N, B, T]`` → ``[N]`` (fp32).

    With ``aligned [N, B, T]`` only a teacher's aligned positions count (its gold logprob means nothing
    elsewhere). A teacher with no counted position gets NaN: a metric, not a loss.
    """
    if gold.dim() != 3 or mask.shape != gold.shape[1:]:
        raise ValueError(f"gold must be [N, B, T] and mask [B, T], got {tuple(gold.shape)} and {tuple(mask.shape)}")
    counted = mask.unsqueeze(0).expand_as(gold)  # [N, B, T]
    if aligned is not None:
        counted = counted & aligned
    nll = torch.where(counted, -gold.float(), torch.zeros((), device=gold.device)).sum((1, 2))  # [N]
    return nll / counted.sum((1, 2))


def _chunk_loss_sums(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    fused_ids: torch.Tensor | None,
    fused_logprobs: torch.Tensor | None,
    *,
    temperature: float,
    logit_softcap: float | None,
    scale_by_t2: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE at ``labels`` and summed sparse KL over one chunk of positions (``hidden [c, H]``)."""
    logits = F.linear(hidden, weight, bias).float()  # [c, V]
    if logit_softcap is not None:
        # Gemma's final_logit_softcapping, applied before any softmax as in its modeling code.
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    logq = torch.log_softmax(logits, dim=-1)  # [c, V]
    ce_sum = -logq.gather(-1, labels.unsqueeze(-1)).sum()
    if fused_ids is None:
        return ce_sum, ce_sum.new_zeros(())
    logq_t = logq if temperature == 1.0 else torch.log_softmax(logits / temperature, dim=-1)  # [c, V]
    student = logq_t.gather(-1, fused_ids)  # [c, k]
    kl_sum = sparse_kl(student, fused_logprobs, temperature, scale_by_t2=scale_by_t2).sum()
    return ce_sum, kl_sum


def _chunked_loss(
    hidden, lm_head_weight, labels, fused_ids, fused_logprobs, mask, *, lam, temperature, chunk_tokens,
    logit_softcap, lm_head_bias, scale_by_t2,
) -> LossParts:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    b, t, h = hidden.shape
    v = lm_head_weight.shape[0]
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != h:
        raise ValueError(f"lm_head_weight must be [V, H={h}], got {tuple(lm_head_weight.shape)}")
    if lm_head_bias is not None and lm_head_bias.shape != (v,):
        raise ValueError(f"lm_head_bias must be [V={v}], got {tuple(lm_head_bias.shape)}")
    if labels.shape != (b, t) or mask.shape != (b, t) or mask.dtype != torch.bool:
        raise ValueError(
            f"labels {tuple(labels.shape)} and mask {tuple(mask.shape)} ({mask.dtype}) must be [B, T] = {(b, t)}, "
            "mask bool"
        )
    if fused_ids is not None and (fused_ids.shape[:2] != (b, t) or fused_logprobs.shape != fused_ids.shape):
        raise ValueError(
            f"fused_ids {tuple(fused_ids.shape)} and fused_logprobs {tuple(fused_logprobs.shape)} must be [B, T, k] "
            f"with B, T = {(b, t)}"
        )
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam} (config field 'fusion.lam')")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (config field 'fusion.temperature')")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens} (config field 'train.loss_chunk_tokens')")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be > 0 or None, got {logit_softcap}")

    rows = mask.reshape(-1).nonzero().squeeze(-1)  # [n] flat indices of the counted positions
    n = rows.numel()
    n_tokens = torch.tensor(n, dtype=torch.int64, device=hidden.device)
    if n == 0:
        # Still connected to the graph so that every rank can call backward() on an empty batch.
        zero = (hidden.sum() * 0).float() + (lm_head_weight.sum() * 0).float()
        return LossParts(loss=zero, clm=zero.detach(), kl=zero.detach(), n_tokens=n_tokens)

    flat_hidden = hidden.reshape(-1, h).index_select(0, rows).to(lm_head_weight.dtype)  # [n, H]
    flat_labels = labels.reshape(-1).index_select(0, rows).long()  # [n]
    bad = (flat_labels < 0) | (flat_labels >= v)  # [n]
    if fused_ids is not None:
        k = fused_ids.shape[-1]
        flat_ids = fused_ids.reshape(-1, k).index_select(0, rows).long()  # [n, k]
        flat_lps = fused_logprobs.reshape(-1, k).index_select(0, rows)  # [n, k]
        bad = bad | ((flat_ids < 0) | (flat_ids >= v)).any(-1)
    else:
        flat_ids = flat_lps = None
    if bad.any():
        where = rows[bad.nonzero()[0, 0]].item()
        raise ValueError(
            f"labels / fused ids at counted position (batch row {where // t}, position {where % t}) fall outside "
            f"the target vocabulary [0, {v}): check that mask excludes padding and that the teachers were aligned "
            "to this target model's tokenizer"
        )

    step = functools.partial(
        _chunk_loss_sums, temperature=temperature, logit_softcap=logit_softcap, scale_by_t2=scale_by_t2
    )
    recompute = torch.is_grad_enabled() and (
        flat_hidden.requires_grad or lm_head_weight.requires_grad
        or (lm_head_bias is not None and lm_head_bias.requires_grad)
    )
    ce_sums, kl_sums = [], []
    for start in range(0, n, chunk_tokens):
        part = slice(start, start + chunk_tokens)
        args = (
            flat_hidden[part], lm_head_weight, lm_head_bias, flat_labels[part],
            None if flat_ids is None else flat_ids[part], None if flat_lps is None else flat_lps[part],
        )
        if recompute:
            ce_sum, kl_sum = checkpoint(step, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            ce_sum, kl_sum = step(*args)
        ce_sums.append(ce_sum)
        kl_sums.append(kl_sum)
    clm = torch.stack(ce_sums).sum() / n
    kl = torch.stack(kl_sums).sum() / n
    return LossParts(loss=lam * clm + (1.0 - lam) * kl, clm=clm, kl=kl, n_tokens=n_tokens)


def fusion_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    fused_ids: torch.Tensor | None,
    fused_logprobs: torch.Tensor | None,
    mask: torch.Tensor,
    lam: float = 0.9,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    logit_softcap: float | None = None,
    lm_head_bias: torch.Tensor | None = None,
    *,
    scale_by_t2: bool = True,
) -> LossParts:
    """``lam·CLM + (1−lam)·KL(fused ‖ student)``, means over the counted positions, chunked and recomputed.

    - ``hidden [B, T, H]``: the student's last hidden state (after the final norm), position t predicting t+1;
    - ``lm_head_weight [V, H]`` (+ ``lm_head_bias [V]``): the output projection (the tied embedding if tied);
    - ``labels [B, T]``: the target id *predicted* at t (already shifted, as ``fused_ids``);
    - ``fused_ids [B, T, k]`` / ``fused_logprobs [B, T, k]``: a fusion's output (``fuseflow.fuse.fusion``);
    - ``mask [B, T]`` bool: the positions that count; labels and ids elsewhere are never read.

    ``fused_ids = fused_logprobs = None`` with ``lam = 1`` is ``clm_loss`` (no teacher in the batch).

    CLM is the CE at ``labels`` of ``log_softmax(logits)`` (no temperature); KL is ``sparse_kl`` with the
    student at ``log_softmax(logits / temperature)`` and the τ² factor unless ``scale_by_t2=False``.
    ``logit_softcap`` applies Gemma's ``cap · tanh(logits / cap)`` first.
    """
    if (fused_ids is None) != (fused_logprobs is None):
        raise ValueError("fusion_loss needs both fused_ids and fused_logprobs, or neither (CLM only, lam = 1)")
    if fused_ids is None and lam != 1.0:
        raise ValueError(f"no fused teacher distribution given but lam = {lam}: the KL term needs teachers")
    return _chunked_loss(
        hidden, lm_head_weight, labels, fused_ids, fused_logprobs, mask, lam=lam, temperature=temperature,
        chunk_tokens=chunk_tokens, logit_softcap=logit_softcap, lm_head_bias=lm_head_bias, scale_by_t2=scale_by_t2,
    )


def clm_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    chunk_tokens: int = 1024,
    logit_softcap: float | None = None,
    lm_head_bias: torch.Tensor | None = None,
) -> LossParts:
    """The CLM objective alone (λ = 1) on the same chunked path: the CLM-only baseline and eval perplexity
    (``exp(clm)``). ``kl`` is 0; no teacher input is read."""
    return _chunked_loss(
        hidden, lm_head_weight, labels, None, None, mask, lam=1.0, temperature=1.0, chunk_tokens=chunk_tokens,
        logit_softcap=logit_softcap, lm_head_bias=lm_head_bias, scale_by_t2=True,
    )

