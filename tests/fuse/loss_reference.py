"""The fusion objective written out densely, the slow reference of the loss tests (not a test module)."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F


def dense_reference(
    hidden, weight, bias, labels, ids, lps, mask, lam, temperature, softcap, scale_by_t2=True, dtype=torch.float32,
    tail=False,
):
    """``(loss, clm, kl)`` from full ``[B, T, V]`` logits in ``dtype``; the teacher scattered into a dense
    ``[B, T, V]`` p in Python loops. With ``tail`` the teacher is not renormalised: its mass outside the ids is
    one more outcome, tempered with them, and the student's is its full-vocabulary mass off those ids."""
    b_, t_ = mask.shape
    v_ = weight.shape[0]
    logits = F.linear(hidden, weight, bias).to(dtype)  # [B, T, V]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logq = F.log_softmax(logits, -1)
    logq_t = F.log_softmax(logits / temperature, -1)
    p = torch.zeros(b_, t_, v_, dtype=dtype)
    r = torch.zeros(b_, t_, dtype=dtype)
    on_ids = torch.zeros(b_, t_, v_, dtype=torch.bool)
    for b, t in itertools.product(range(b_), range(t_)):
        finite = [(int(i), float(lp) / temperature) for i, lp in zip(ids[b, t], lps[b, t]) if lp > -math.inf]
        rest = max(0.0, 1.0 - sum(math.exp(float(lp)) for lp in lps[b, t])) if tail else 0.0
        rest_scaled = math.exp(math.log(rest) / temperature) if rest > 0 else 0.0
        z = sum(math.exp(s) for _, s in finite) + rest_scaled
        for i, s in finite:
            p[b, t, i] += math.exp(s) / z
            on_ids[b, t, i] = True
        r[b, t] = rest_scaled / z if z > 0 else 0.0
    log_p = torch.where(p > 0, p.log(), torch.zeros(()))
    kl_pos = (p * (log_p - logq_t)).sum(-1)  # [B, T]
    if tail:
        student_rest = torch.where(on_ids, torch.zeros(()), logq_t.exp()).sum(-1)  # [B, T]
        kl_pos = kl_pos + torch.where(r > 0, r * (r.log() - student_rest.log()), torch.zeros(()))
    kl_pos = kl_pos * (temperature**2 if scale_by_t2 else 1.0)
    ce_pos = -logq.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T]
    m = mask.to(dtype)
    clm = (ce_pos * m).sum() / m.sum()
    kl = (kl_pos * m).sum() / m.sum()
    return lam * clm + (1 - lam) * kl, clm, kl
