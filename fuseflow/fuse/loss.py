"""The training objective ``λ·CLM + (1−λ)·KL(fused ‖ student)`` on sparse top-k teacher rows.

FuseLLM (arXiv 2401.10491, Eq. 5) trains on ``λ·L_CLM + (1−λ)·L_Fusion`` (λ = 0.9 in its scripts,
``--lm_loss_weight 0.9``). Its released trainer materialises a dense ``[B, T, V]`` bf16 teacher tensor and
the full ``[B, T, V]`` logits; here neither exists at once:

- the teacher side stays sparse: k target ids and logprobs per position;
- the student's logits are computed from the last hidden state and the lm_head weight in chunks of
  ``chunk_tokens`` counted positions, one chunk's ``[chunk, V]`` logits alive at a time, in both passes (the
  vocabulary no longer limits the batch size, activations do);
- log-softmax is in fp32 whatever the input dtype (fp64 stays fp64): the reference's fp16 CE produced NaNs.

Two implementations of the same numbers (``impl``):

- ``"chunked"``: each chunk under ``torch.utils.checkpoint``; the backward recomputes the chunk's logits
  (4 head matmuls per chunk: forward, recompute, two gradient products) and autograd differentiates them;
- ``"fused"`` (the default): Liger-Kernel's fused linear cross-entropy (Hsu et al. 2024, "Liger Kernel:
  Efficient Triton Kernels for LLM Training", arXiv 2410.10989) extended to the sparse KL term: the forward
  walks the chunks once and computes, per chunk, the loss sums *and* their analytic gradient w.r.t. the
  chunk's logits, which it multiplies straight into the gradients of the hidden rows, the weight and the bias
  (3 head matmuls per chunk); the backward only scales those by the incoming gradient. Its cost: those
  gradients, in fp32, live from the forward to the backward (``[V, H]`` + ``[n, H]`` + ``[V]``).

All losses are means over the counted positions (``mask``) of this call; a data-parallel trainer that wants a
global token mean weights each rank by ``n_tokens``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

__all__ = ["LOSS_IMPLS", "LossParts", "clm_loss", "fusion_loss", "per_teacher_ce", "sparse_kl", "student_gold"]

LOSS_IMPLS = ("chunked", "fused")


@dataclass
class LossParts:
    """Scalar tensors: ``loss = lam·clm + (1−lam)·kl``; ``n_tokens`` (int64) is the count they average over."""

    loss: torch.Tensor
    clm: torch.Tensor
    kl: torch.Tensor
    n_tokens: torch.Tensor


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or fp64 if it is fp64 (the tests' exact checks): the loss math never runs below fp32."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _teacher_distribution(
    teacher_logprobs: torch.Tensor, temperature: float, tail: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log p [..., k], p [..., k], log r [...], r [...])`` (≥ fp32): the teacher's distribution over its k
    entries and, with ``tail``, one more outcome ``r`` for the rest of the vocabulary.

    Without ``tail`` (FuseLLM): ``p = softmax(teacher_logprobs / τ)`` over the k entries and ``r = 0``. With
    ``tail``: the k logprobs are read as the teacher's *unrenormalised* probabilities, ``r = 1 − Σ_k
    exp(logprobs)`` (clamped at 0: fp16 on the wire can round the sum above 1) is the mass outside them, and
    ``(p, r) = softmax((logprobs, log r) / τ)`` over the k + 1 outcomes (exact at τ = 1; at τ ≠ 1 the tail is
    tempered as one outcome, an approximation: the teacher's tail logits are unknown). ``-inf`` entries get
    ``p = 0`` and ``log p = 0`` (so that ``p · log p`` is 0, not NaN); likewise ``r = 0``."""
    lp = _at_least_fp32(teacher_logprobs)  # [..., k]
    if tail:
        rest = (1.0 - lp.exp().sum(-1, keepdim=True)).clamp_min(0.0)  # [..., 1]
        lp = torch.cat([lp, rest.log()], dim=-1)  # [..., k+1]
    scaled = lp / temperature  # [..., k(+1)]
    lse = torch.logsumexp(scaled, dim=-1, keepdim=True)  # [..., 1]
    log_p = scaled - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # [..., k(+1)]
    present = torch.isfinite(log_p)  # [..., k(+1)]
    # Zero the absent entries before any product: 0 · (-inf) would be NaN, in the forward and the backward.
    log_p = torch.where(present, log_p, torch.zeros_like(log_p))
    p = torch.where(present, log_p.exp(), torch.zeros_like(log_p))
    if tail:
        return log_p[..., :-1], p[..., :-1], log_p[..., -1], p[..., -1]
    zero = p.new_zeros(p.shape[:-1])
    return log_p, p, zero, zero


# Below this student mass outside the teacher's ids, the tail term's log and gradient are clamped (fp32 cannot
# resolve 1 − Σ q any finer near 1).
_MIN_STUDENT_TAIL = 1e-6


def _student_tail(student_at_ids: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, 1 − Q)`` ``[...]`` each: the student's mass ``Q = Σ q`` on the teacher's present ids (``p > 0``; the
    ids of a row are distinct, as every fusion's output is) and the rest, clamped at ``_MIN_STUDENT_TAIL``."""
    q = torch.where(p > 0, _at_least_fp32(student_at_ids).exp(), torch.zeros_like(p))  # [..., k]
    mass = q.sum(-1)  # [...]
    return mass, (1.0 - mass).clamp_min(_MIN_STUDENT_TAIL)


def sparse_kl(
    student_logprobs_at_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: float = 1.0,
    *,
    scale_by_t2: bool = True,
    tail: bool = False,
) -> torch.Tensor:
    """``KL(p ‖ q)`` on the teacher's k entries (and, with ``tail``, the rest of the vocabulary), per row:
    ``[..., k]`` → ``[...]`` (≥ fp32).

    ``q`` is the student's *full-vocabulary* ``log_softmax(logits / τ)`` gathered at the teacher's ids — the
    caller applies τ to the student, this function only to the teacher (:func:`_teacher_distribution`).

    - ``tail=False`` (FuseLLM's ``DistillTrainer``): ``p`` is renormalised over the k entries and the KL is
      ``Σ_k p (log p − log q) ≥ −log Σ_k q ≥ 0``, zero only when the student puts *all* its mass on those ids
      exactly as ``p``: with k = 10 it asks the student to drop the 25–33 % a real teacher keeps outside its
      top 10 (docs/quality.md).
    - ``tail=True``: the KL over k + 1 outcomes, the k ids and "any other id", ``Σ_k p (log p − log q) + r (log r
      − log(1 − Σ_k q))`` with the teacher's own tail mass ``r``; zero when the student matches the teacher on
      the k ids *and* keeps the teacher's mass elsewhere (issue 11). Needs distinct ids per row.

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
    log_p, p, log_r, r = _teacher_distribution(teacher_logprobs, temperature, tail)  # [..., k] ×2, [...] ×2
    kl = (p * (log_p - _at_least_fp32(student_logprobs_at_ids))).sum(-1)  # [...]
    if tail:
        _, rest = _student_tail(student_logprobs_at_ids, p)  # [...]
        kl = kl + r * (log_r - rest.log())
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


# ----------------------------------------------------------------------------------------------------------
# One chunk of positions: the loss sums (both impls) and their gradient w.r.t. the logits (fused).
# ----------------------------------------------------------------------------------------------------------


def _head_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, logit_softcap: float | None
) -> torch.Tensor:
    """≥ fp32 logits ``[c, V]`` of ``hidden [c, H]`` (the matmul in the weight's dtype), soft-capped if asked."""
    logits = _at_least_fp32(F.linear(hidden, weight, bias))  # [c, V]
    if logit_softcap is not None:
        # Gemma's final_logit_softcapping, applied before any softmax as in its modeling code.
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return logits


@torch.no_grad()
def student_gold(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
    chunk_tokens: int = 1024, logit_softcap: float | None = None, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, T]``: the student's logprob of ``labels`` (``log_softmax(logits)``, no gradient) at the counted
    positions (``mask``; 0 elsewhere): its CE as a fusion candidate (config ``fusion.student_candidate``).
    ``[B, T, V]`` logits never exist: the head is applied by chunks of ``chunk_tokens`` counted positions."""
    gold = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    where = mask.nonzero(as_tuple=True)
    rows, want = hidden[where], labels[where]  # [M, H], [M]
    for start in range(0, rows.shape[0], chunk_tokens):
        sel = slice(start, start + chunk_tokens)
        logits = _head_logits(rows[sel], weight, bias, logit_softcap)  # [c, V]
        picked = tuple(w[sel] for w in where)
        gold[picked] = logits.gather(-1, want[sel].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return gold


def _sums_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    fused_ids: torch.Tensor | None,
    fused_logprobs: torch.Tensor | None,
    *,
    temperature: float,
    scale_by_t2: bool,
    tail: bool,
    reuse_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(CE sum, KL sum, log_softmax(logits) [c, V], log_softmax(logits / τ) [c, V] or None)``.

    ``reuse_logits`` (outside autograd only) divides ``logits`` by τ in place instead of in a new block."""
    logq = torch.log_softmax(logits, dim=-1)  # [c, V]
    ce_sum = -logq.gather(-1, labels.unsqueeze(-1)).sum()
    if fused_ids is None:
        return ce_sum, ce_sum.new_zeros(()), logq, None
    if temperature == 1.0:
        logq_t = logq
    else:
        scaled = logits.div_(temperature) if reuse_logits else logits / temperature  # [c, V]
        logq_t = torch.log_softmax(scaled, dim=-1)  # [c, V]
    student = logq_t.gather(-1, fused_ids)  # [c, k]
    kl_sum = sparse_kl(student, fused_logprobs, temperature, scale_by_t2=scale_by_t2, tail=tail).sum()
    return ce_sum, kl_sum, logq, logq_t


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
    tail: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE at ``labels`` and summed sparse KL over one chunk of positions (``hidden [c, H]``)."""
    logits = _head_logits(hidden, weight, bias, logit_softcap)  # [c, V]
    ce_sum, kl_sum, _, _ = _sums_from_logits(
        logits, labels, fused_ids, fused_logprobs, temperature=temperature, scale_by_t2=scale_by_t2, tail=tail
    )
    return ce_sum, kl_sum


def _chunk_loss_sums_and_logit_grad(
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
    tail: bool,
    ce_weight: float,
    kl_weight: float,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(CE sum, KL sum, ∂L/∂z [c, V] fp32 or None)`` for ``L = ce_weight·CE sum + kl_weight·KL sum`` and
    ``z = hidden @ weightᵀ + bias`` the chunk's raw logits.

    With ``y`` the (soft-capped) logits, ``s = softmax(y)``, ``s_τ = softmax(y / τ)`` and ``P`` the teacher's
    ``p`` scattered at its ids (``Σ P = Σ_k p``: 1, or 0 on a row whose entries are all ``-inf``):

    - ``∂CE/∂y = s − onehot(label)``;
    - ``∂KL/∂y = c·(Σ_k p · s_τ − P)`` with ``c = τ`` (``τ² · 1/τ``) or ``1/τ`` without the τ² scale;
    - with ``tail`` (teacher tail mass ``r``, student mass ``Q = Σ_k q`` on the ids, ``S`` = ``s_τ`` on the ids and
      0 elsewhere, ``ρ = r / (1 − Q)``): ``∂KL/∂y = c·((Σ_k p − ρ·Q) · s_τ − P + ρ·S)``, since
      ``∂(−log(1 − Q))/∂y = (S − Q·s_τ) / (τ·(1 − Q))``;
    - ``∂y/∂z = 1 − tanh²(z / cap) = 1 − (y / cap)²`` under the soft cap, 1 without.

    Everything is in place on the chunk's ``[c, V]`` blocks (the logits, their two log-softmaxes): at most
    three alive at once, where the chunked path's forward holds four (``logits / τ`` besides) and its
    backward more.
    """
    logits = _head_logits(hidden, weight, bias, logit_softcap)  # [c, V]
    ce_sum, kl_sum, logq, logq_t = _sums_from_logits(
        logits, labels, fused_ids, fused_logprobs, temperature=temperature, scale_by_t2=scale_by_t2, tail=tail,
        reuse_logits=True,
    )
    y_scale = 1.0 if logq_t is None or logq_t is logq else temperature  # logits now holds y / y_scale
    if not with_grad:
        return ce_sum, kl_sum, None
    kl_coef = kl_weight * (temperature if scale_by_t2 else 1.0 / temperature)
    with_kl = fused_ids is not None and kl_coef != 0.0
    if with_kl:
        _, p, _, r = _teacher_distribution(fused_logprobs, temperature, tail)  # [c, k], [c]
        p_mass = p.sum(-1, keepdim=True)  # [c, 1]
        if tail:
            q_ids = logq_t.gather(-1, fused_ids)  # [c, k]: before logq_t is overwritten below
            q_mass, rest = _student_tail(q_ids, p)  # [c] each
            # ρ = r / (1 − Q), 0 where the student's rest is clamped (the forward's log is constant there)
            rho = torch.where(1.0 - q_mass > _MIN_STUDENT_TAIL, r / rest, torch.zeros_like(r)).unsqueeze(-1)  # [c, 1]
            p_mass = p_mass - rho * q_mass.unsqueeze(-1)
            p = p - rho * torch.where(p > 0, q_ids.exp(), torch.zeros_like(p))  # [c, k]: −P + ρ·S, negated below
    grad = logq.exp_()  # [c, V] s; logq is spent (and so is logq_t when τ = 1: it is the same tensor)
    if with_kl and logq_t is logq:
        grad.mul_(ce_weight + kl_coef * p_mass)  # s_τ = s
    elif with_kl:
        grad.mul_(ce_weight).add_(logq_t.exp_().mul_(kl_coef * p_mass))
    else:
        grad.mul_(ce_weight)
    if with_kl:
        # scatter_add: repeated ids add up, as in gather's gradient
        grad.scatter_add_(-1, fused_ids, p.to(grad.dtype).mul_(-kl_coef))
    if ce_weight != 0.0:
        grad.scatter_add_(-1, labels.unsqueeze(-1), grad.new_full((labels.numel(), 1), -ce_weight))
    if logit_softcap is not None:
        grad.mul_(logits.mul_(y_scale / logit_softcap).square_().neg_().add_(1.0))  # 1 − tanh²(z / cap)
    return ce_sum, kl_sum, grad


# ----------------------------------------------------------------------------------------------------------
# All chunks: the two implementations over the same selected rows.
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Rows:
    """The counted positions, flattened: ``hidden [n, H]`` (weight dtype), ``labels [n]``, ``ids / lps [n, k]``."""

    hidden: torch.Tensor
    labels: torch.Tensor
    fused_ids: torch.Tensor | None
    fused_logprobs: torch.Tensor | None

    @property
    def n(self) -> int:
        return self.labels.numel()

    def chunk(self, part: slice) -> tuple:
        return (
            self.labels[part],
            None if self.fused_ids is None else self.fused_ids[part],
            None if self.fused_logprobs is None else self.fused_logprobs[part],
        )


@dataclass(frozen=True)
class _Options:
    lam: float
    temperature: float
    chunk_tokens: int
    logit_softcap: float | None
    scale_by_t2: bool
    tail: bool = False


def _chunked_sums(rows: _Rows, weight, bias, opt: _Options) -> tuple[torch.Tensor, torch.Tensor]:
    """Total CE and KL over the rows, chunk by chunk, each chunk recomputed in the backward."""
    step = functools.partial(
        _chunk_loss_sums, temperature=opt.temperature, logit_softcap=opt.logit_softcap, scale_by_t2=opt.scale_by_t2,
        tail=opt.tail,
    )
    recompute = torch.is_grad_enabled() and (
        rows.hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    ce_sums, kl_sums = [], []
    for start in range(0, rows.n, opt.chunk_tokens):
        part = slice(start, start + opt.chunk_tokens)
        args = (rows.hidden[part], weight, bias, *rows.chunk(part))
        if recompute:
            ce_sum, kl_sum = checkpoint(step, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            ce_sum, kl_sum = step(*args)
        ce_sums.append(ce_sum)
        kl_sums.append(kl_sum)
    return torch.stack(ce_sums).sum(), torch.stack(kl_sums).sum()


def _fused_sums_and_grads(
    rows: _Rows, weight, bias, opt: _Options, need_hidden: bool, need_weight: bool, need_bias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(CE total, KL total, ∂loss/∂hidden [n, H], ∂loss/∂weight [V, H], ∂loss/∂bias [V])`` in one walk
    over the chunks; a gradient nobody needs is ``None`` and never computed. The gradients are fp32 accumulators
    (fp64 for fp64 weights); each chunk's products run in the weight's dtype (as autograd's would), the fp32
    logit gradients cast to it."""
    n = rows.n
    with_grad = need_hidden or need_weight or need_bias
    acc = torch.promote_types(weight.dtype, torch.float32)
    grad_hidden = rows.hidden.new_zeros(rows.hidden.shape, dtype=acc) if need_hidden else None  # [n, H]
    grad_weight = weight.new_zeros(weight.shape, dtype=acc) if need_weight else None  # [V, H]
    grad_bias = weight.new_zeros(weight.shape[:1], dtype=acc) if need_bias else None  # [V]
    step = functools.partial(
        _chunk_loss_sums_and_logit_grad,
        temperature=opt.temperature, logit_softcap=opt.logit_softcap, scale_by_t2=opt.scale_by_t2, tail=opt.tail,
        ce_weight=opt.lam / n, kl_weight=(1.0 - opt.lam) / n, with_grad=with_grad,
    )
    ce_sums, kl_sums = [], []
    for start in range(0, n, opt.chunk_tokens):
        part = slice(start, start + opt.chunk_tokens)
        h = rows.hidden[part]  # [c, H]
        ce_sum, kl_sum, grad_logits = step(h, weight, bias, *rows.chunk(part))  # grad_logits [c, V] fp32
        ce_sums.append(ce_sum)
        kl_sums.append(kl_sum)
        if grad_logits is None:
            continue
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0)
        g = grad_logits.to(weight.dtype)  # [c, V]: no copy when the weight is fp32
        if grad_hidden is not None:
            grad_hidden[part] = g @ weight  # [c, H]
        if grad_weight is not None:
            if g.dtype == grad_weight.dtype:
                grad_weight.addmm_(g.T, h)
            else:
                grad_weight += g.T @ h  # [V, H] in the weight's dtype, accumulated in fp32
        del grad_logits, g  # before the next chunk's blocks exist: one chunk's [c, V] blocks at a time
    return torch.stack(ce_sums).sum(), torch.stack(kl_sums).sum(), grad_hidden, grad_weight, grad_bias


class _FusedLinearLoss(torch.autograd.Function):
    """``(loss, CE total, KL total)`` of the selected rows; only ``loss`` is differentiable, and its gradients
    are computed in the forward (:func:`_fused_sums_and_grads`), so the backward holds no ``[chunk, V]`` block
    and does no matmul: it scales the stored gradients by the incoming one."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, fused_ids, fused_logprobs, opt: _Options):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        rows = _Rows(hidden, labels, fused_ids, fused_logprobs)
        ce, kl, grad_hidden, grad_weight, grad_bias = _fused_sums_and_grads(
            rows, weight, bias, opt, need_hidden, need_weight, need_bias
        )
        clm, kl = ce / rows.n, kl / rows.n
        loss = opt.lam * clm + (1.0 - opt.lam) * kl
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(clm, kl)
        return loss, clm, kl

    @staticmethod
    @once_differentiable  # the stored gradients are constants: no double backward
    def backward(ctx, grad_loss, _grad_clm, _grad_kl):
        # The product in fp32, written (rounded once) straight into a tensor of the input's dtype: no second
        # fp32 [V, H]; never in place, so that a retained graph's second backward sees the same gradients.
        scaled = [
            None if grad is None else torch.mul(grad, grad_loss, out=torch.empty_like(grad, dtype=dtype))
            for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes)
        ]
        return (*scaled, None, None, None, None)


def _fused_loss_parts(rows: _Rows, weight, bias, opt: _Options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, clm, kl)``; ``clm`` and ``kl`` are detached metrics. Without grad mode, or with nothing that
    requires a gradient, no gradient is computed at all."""
    tracked = torch.is_grad_enabled() and (
        rows.hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if tracked:
        return _FusedLinearLoss.apply(
            rows.hidden, weight, bias, rows.labels, rows.fused_ids, rows.fused_logprobs, opt
        )
    ce, kl, _, _, _ = _fused_sums_and_grads(rows, weight, bias, opt, False, False, False)
    clm, kl = ce / rows.n, kl / rows.n
    return opt.lam * clm + (1.0 - opt.lam) * kl, clm, kl


# ----------------------------------------------------------------------------------------------------------
# Validation and row selection, shared by both implementations.
# ----------------------------------------------------------------------------------------------------------


def _validate(hidden, lm_head_weight, labels, fused_ids, fused_logprobs, mask, lm_head_bias, opt: _Options, impl):
    if impl not in LOSS_IMPLS:
        raise ValueError(f"impl must be one of {LOSS_IMPLS}, got {impl!r} (config field 'train.loss_impl')")
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
    if not 0.0 <= opt.lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {opt.lam} (config field 'fusion.lam')")
    if not opt.temperature > 0:
        raise ValueError(f"temperature must be > 0, got {opt.temperature} (config field 'fusion.temperature')")
    if opt.chunk_tokens < 1:
        raise ValueError(
            f"chunk_tokens must be >= 1, got {opt.chunk_tokens} (config field 'train.loss_chunk_tokens')"
        )
    if opt.logit_softcap is not None and not opt.logit_softcap > 0:
        raise ValueError(f"logit_softcap must be > 0 or None, got {opt.logit_softcap}")


def _select_rows(hidden, lm_head_weight, labels, fused_ids, fused_logprobs, mask) -> _Rows:
    """The counted positions, flattened (``index_select`` keeps the gradient path to ``hidden [B, T, H]``); a
    label or id outside ``[0, V)`` at a counted position is a ValueError."""
    t, h = hidden.shape[1:]
    v = lm_head_weight.shape[0]
    index = mask.reshape(-1).nonzero().squeeze(-1)  # [n] flat indices of the counted positions
    flat_hidden = hidden.reshape(-1, h).index_select(0, index).to(lm_head_weight.dtype)  # [n, H]
    flat_labels = labels.reshape(-1).index_select(0, index).long()  # [n]
    bad = (flat_labels < 0) | (flat_labels >= v)  # [n]
    if fused_ids is not None:
        k = fused_ids.shape[-1]
        flat_ids = fused_ids.reshape(-1, k).index_select(0, index).long()  # [n, k]
        flat_lps = fused_logprobs.reshape(-1, k).index_select(0, index)  # [n, k]
        bad = bad | ((flat_ids < 0) | (flat_ids >= v)).any(-1)
    else:
        flat_ids = flat_lps = None
    if bad.any():
        where = index[bad.nonzero()[0, 0]].item()
        raise ValueError(
            f"labels / fused ids at counted position (batch row {where // t}, position {where % t}) fall outside "
            f"the target vocabulary [0, {v}): check that mask excludes padding and that the teachers were aligned "
            "to this target model's tokenizer"
        )
    return _Rows(flat_hidden, flat_labels, flat_ids, flat_lps)


def _loss(
    hidden, lm_head_weight, labels, fused_ids, fused_logprobs, mask, *, lam, temperature, chunk_tokens,
    logit_softcap, lm_head_bias, scale_by_t2, impl, tail=False,
) -> LossParts:
    opt = _Options(lam, temperature, chunk_tokens, logit_softcap, scale_by_t2, tail)
    _validate(hidden, lm_head_weight, labels, fused_ids, fused_logprobs, mask, lm_head_bias, opt, impl)
    rows = _select_rows(hidden, lm_head_weight, labels, fused_ids, fused_logprobs, mask)
    n = rows.n
    n_tokens = torch.tensor(n, dtype=torch.int64, device=hidden.device)
    if n == 0:
        # Still connected to the graph so that every rank can call backward() on an empty batch.
        zero = (hidden.sum() * 0).float() + (lm_head_weight.sum() * 0).float()
        return LossParts(loss=zero, clm=zero.detach(), kl=zero.detach(), n_tokens=n_tokens)
    if impl == "fused":
        loss, clm, kl = _fused_loss_parts(rows, lm_head_weight, lm_head_bias, opt)
        return LossParts(loss=loss, clm=clm, kl=kl, n_tokens=n_tokens)
    ce, kl = _chunked_sums(rows, lm_head_weight, lm_head_bias, opt)
    clm, kl = ce / n, kl / n
    return LossParts(loss=lam * clm + (1.0 - lam) * kl, clm=clm, kl=kl, n_tokens=n_tokens)


# ----------------------------------------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------------------------------------


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
    impl: str = "fused",
    tail: bool = False,
) -> LossParts:
    """``lam·CLM + (1−lam)·KL(fused ‖ student)``, means over the counted positions, by chunks of positions.

    - ``hidden [B, T, H]``: the student's last hidden state (after the final norm), position t predicting t+1;
    - ``lm_head_weight [V, H]`` (+ ``lm_head_bias [V]``): the output projection (the tied embedding if tied);
    - ``labels [B, T]``: the target id *predicted* at t (already shifted, as ``fused_ids``);
    - ``fused_ids [B, T, k]`` / ``fused_logprobs [B, T, k]``: a fusion's output (``fuseflow.fuse.fusion``);
    - ``mask [B, T]`` bool: the positions that count; labels and ids elsewhere are never read.

    ``fused_ids = fused_logprobs = None`` with ``lam = 1`` is ``clm_loss`` (no teacher in the batch).

    CLM is the CE at ``labels`` of ``log_softmax(logits)`` (no temperature); KL is ``sparse_kl`` with the
    student at ``log_softmax(logits / temperature)`` and the τ² factor unless ``scale_by_t2=False``; ``tail``
    (config ``fusion.kl: tail``) keeps the teacher's mass outside its k ids as one more outcome (``sparse_kl``):
    ``fused_logprobs`` are then read unrenormalised, as the fusions give them with ``renormalise=False``.
    ``logit_softcap`` applies Gemma's ``cap · tanh(logits / cap)`` first.

    ``impl`` (one of ``LOSS_IMPLS``): ``"fused"`` (the default) computes the gradients in the forward,
    ``"chunked"`` recomputes each chunk's logits in the backward (module docstring). Same values and
    gradients; with ``"fused"`` only ``loss`` carries a gradient (``clm`` and ``kl`` are detached metrics).
    """
    if (fused_ids is None) != (fused_logprobs is None):
        raise ValueError("fusion_loss needs both fused_ids and fused_logprobs, or neither (CLM only, lam = 1)")
    if fused_ids is None and lam != 1.0:
        raise ValueError(f"no fused teacher distribution given but lam = {lam}: the KL term needs teachers")
    return _loss(
        hidden, lm_head_weight, labels, fused_ids, fused_logprobs, mask, lam=lam, temperature=temperature,
        chunk_tokens=chunk_tokens, logit_softcap=logit_softcap, lm_head_bias=lm_head_bias, scale_by_t2=scale_by_t2,
        impl=impl, tail=tail,
    )


def clm_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    chunk_tokens: int = 1024,
    logit_softcap: float | None = None,
    lm_head_bias: torch.Tensor | None = None,
    *,
    impl: str = "fused",
) -> LossParts:
    """The CLM objective alone (λ = 1) on the same chunked path: the CLM-only baseline and eval perplexity
    (``exp(clm)``). ``kl`` is 0; no teacher input is read. ``impl`` as in :func:`fusion_loss`."""
    return _loss(
        hidden, lm_head_weight, labels, None, None, mask, lam=1.0, temperature=1.0, chunk_tokens=chunk_tokens,
        logit_softcap=logit_softcap, lm_head_bias=lm_head_bias, scale_by_t2=True, impl=impl,
    )
