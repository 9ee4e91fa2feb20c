"""Chunked sparse losses against a dense, unchunked reference: values and gradients w.r.t. the hidden state,
the lm_head weight and bias (both impls); NaN-safety on one-hot fallback rows; the largest tensor the chunked
path makes (the fused path's: test_fused_linear_loss.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fuseflow.fuse.loss as loss_module
from fuseflow.fuse.loss import LOSS_IMPLS, LossParts, clm_loss, fusion_loss, per_teacher_ce, sparse_kl
from loss_reference import dense_reference

B, T, H, V, K = 2, 9, 16, 40, 5


def make_inputs(seed: int, dtype=torch.float32, bias: bool = False, fallback_share: float = 0.25):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H) * 3).to(dtype).requires_grad_()
    lm_bias = (torch.randn(V, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)  # 15 counted positions: padding at the end of row 0, a hole in row 1
    mask[0, -2:] = False
    mask[1, 3] = False
    labels[~mask] = -100  # never read where not counted
    ids = torch.rand(B, T, V, generator=g).argsort(-1)[..., :K]  # [B, T, K] distinct per row
    lps = (torch.randn(B, T, K, generator=g) * 2).log_softmax(-1).sort(-1, descending=True).values
    lps[:, :, -1:] = torch.where(torch.rand(B, T, 1, generator=g) < 0.3, -math.inf, lps[:, :, -1:])
    ids = torch.where(torch.isinf(lps), torch.zeros_like(ids), ids)
    fallback = torch.rand(B, T, generator=g) < fallback_share  # one-hot gold rows [0, -inf, ...]
    ids[fallback] = 0
    ids[..., 0] = torch.where(fallback, labels.clamp(min=0), ids[..., 0])
    lps[fallback] = torch.tensor([0.0] + [-math.inf] * (K - 1))
    return hidden, weight, lm_bias, labels, ids, lps, mask


def grads(loss, tensors):
    return torch.autograd.grad(loss, [x for x in tensors if x is not None])


CASES = {  # (temperature, softcap, bias)
    "plain": (1.0, None, False),
    "temperature+softcap+bias": (2.0, 3.0, True),
    "low-temperature": (0.5, None, True),
}


@pytest.mark.parametrize("impl", LOSS_IMPLS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("chunk_tokens", [1, 4, 7, 1024])
def test_fusion_loss_matches_dense_fp32(case, chunk_tokens, impl):
    temperature, softcap, bias = CASES[case]
    hidden, weight, lm_bias, labels, ids, lps, mask = make_inputs(0, bias=bias)
    assert int(mask.sum()) % 4 and int(mask.sum()) % 7  # the chunk sizes 4 and 7 leave a ragged last chunk
    parts = fusion_loss(hidden, weight, labels, ids, lps, mask, lam=0.7, temperature=temperature,
                        chunk_tokens=chunk_tokens, logit_softcap=softcap, lm_head_bias=lm_bias, impl=impl)
    ref_loss, ref_clm, ref_kl = dense_reference(
        hidden, weight, lm_bias, labels, ids, lps, mask, 0.7, temperature, softcap
    )
    torch.testing.assert_close(parts.loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.clm, ref_clm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.kl, ref_kl, rtol=1e-5, atol=1e-6)
    assert int(parts.n_tokens) == int(mask.sum())
    assert float(parts.kl.detach()) > 1e-3  # the KL term is exercised, not vanishing
    for got, want in zip(grads(parts.loss, [hidden, weight, lm_bias]), grads(ref_loss, [hidden, weight, lm_bias])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def with_tail_mass(lps: torch.Tensor, seed: int) -> torch.Tensor:
    """The rows as a teacher's unrenormalised top-k: 5–50 % of each row's mass moved outside its k ids (the one-hot
    fallback rows, logprob 0, keep all of theirs)."""
    g = torch.Generator().manual_seed(seed)
    kept = torch.empty(lps.shape[:-1]).uniform_(0.5, 0.95, generator=g).log().unsqueeze(-1)  # [B, T, 1]
    fallback = lps[..., :1] == 0
    return torch.where(fallback, lps, lps + kept)


@pytest.mark.parametrize("impl", LOSS_IMPLS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("chunk_tokens", [4, 1024])
def test_tail_kl_matches_dense(case, chunk_tokens, impl):
    """``tail=True``: the KL over the k ids plus "the rest", values and gradients, against the dense reference."""
    temperature, softcap, bias = CASES[case]
    hidden, weight, lm_bias, labels, ids, lps, mask = make_inputs(3, bias=bias)
    lps = with_tail_mass(lps, 3)
    parts = fusion_loss(hidden, weight, labels, ids, lps, mask, lam=0.4, temperature=temperature,
                        chunk_tokens=chunk_tokens, logit_softcap=softcap, lm_head_bias=lm_bias, impl=impl, tail=True)
    ref_loss, ref_clm, ref_kl = dense_reference(
        hidden, weight, lm_bias, labels, ids, lps, mask, 0.4, temperature, softcap, tail=True
    )
    renormalised = fusion_loss(hidden, weight, labels, ids, lps, mask, lam=0.4, temperature=temperature,
                               chunk_tokens=chunk_tokens, logit_softcap=softcap, lm_head_bias=lm_bias, impl=impl)
    assert abs(float(renormalised.kl.detach()) - float(ref_kl.detach())) > 1e-2  # the tail changes the objective
    torch.testing.assert_close(parts.loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.kl, ref_kl, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads(parts.loss, [hidden, weight, lm_bias]), grads(ref_loss, [hidden, weight, lm_bias])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_tail_kl_is_zero_when_the_student_matches_the_teacher_everywhere():
    """The renormalised KL is > 0 for a student equal to the teacher (it asks for the teacher's top-k mass to
    be blown up to 1); the tail KL is 0 there, and > 0 for a student that drops the tail."""
    teacher = torch.tensor([0.5, 0.2, 0.1, 0.2]).log()  # a full distribution over V = 4
    ids, lps = torch.tensor([0, 1]), teacher[:2]  # its top-2: 70 % of the mass
    same = sparse_kl(teacher[ids], lps, tail=True)
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    assert float(sparse_kl(teacher[ids], lps)) > 0.3  # log(1/0.7) ≈ 0.357
    squeezed = torch.tensor([5 / 7, 2 / 7]).log()  # all the mass on the two ids, as the renormalised KL wants
    assert float(sparse_kl(squeezed, lps)) == pytest.approx(0.0, abs=1e-6)
    assert float(sparse_kl(squeezed.clamp(max=-1e-3), lps, tail=True)) > 1.0


@pytest.mark.parametrize("impl", LOSS_IMPLS)
@pytest.mark.parametrize("chunk_tokens", [3, 1024])
def test_fusion_loss_matches_dense_bf16(chunk_tokens, impl):
    hidden, weight, lm_bias, labels, ids, lps, mask = make_inputs(1, dtype=torch.bfloat16, bias=True)
    parts = fusion_loss(hidden, weight, labels, ids, lps, mask, lam=0.9, temperature=2.0,
                        chunk_tokens=chunk_tokens, logit_softcap=3.0, lm_head_bias=lm_bias, impl=impl)
    assert parts.loss.dtype == torch.float32  # the log-softmax ran in fp32
    ref_loss, _, _ = dense_reference(hidden, weight, lm_bias, labels, ids, lps, mask, 0.9, 2.0, 3.0)
    torch.testing.assert_close(parts.loss, ref_loss, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads(parts.loss, [hidden, weight, lm_bias]), grads(ref_loss, [hidden, weight, lm_bias])):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-3)


def test_scale_by_t2_is_configurable():
    hidden, weight, _, labels, ids, lps, mask = make_inputs(2)
    scaled = fusion_loss(hidden, weight, labels, ids, lps, mask, temperature=2.0)
    unscaled = fusion_loss(hidden, weight, labels, ids, lps, mask, temperature=2.0, scale_by_t2=False)
    torch.testing.assert_close(scaled.kl, 4 * unscaled.kl)
    _, _, ref_kl = dense_reference(hidden, weight, None, labels, ids, lps, mask, 0.9, 2.0, None, scale_by_t2=False)
    torch.testing.assert_close(unscaled.kl, ref_kl)


def test_one_hot_fallback_rows_give_no_nan():
    hidden, weight, _, labels, ids, lps, mask = make_inputs(3, fallback_share=1.0)
    assert torch.isinf(lps[..., 1:]).all()
    parts = fusion_loss(hidden, weight, labels, ids, lps, mask, lam=0.5, temperature=2.0, chunk_tokens=4)
    assert torch.isfinite(parts.loss)
    # A one-hot teacher at the gold token makes KL the CE at the labels (scaled by τ², at temperature τ).
    ref_loss, _, ref_kl = dense_reference(hidden, weight, None, labels, ids, lps, mask, 0.5, 2.0, None)
    torch.testing.assert_close(parts.kl, ref_kl)
    for g in grads(parts.loss, [hidden, weight]):
        assert torch.isfinite(g).all()


def test_clm_loss_is_the_lambda_one_objective():
    hidden, weight, _, labels, ids, lps, mask = make_inputs(4)
    clm = clm_loss(hidden, weight, labels, mask, chunk_tokens=4)
    full = fusion_loss(hidden, weight, labels, ids, lps, mask, lam=1.0, chunk_tokens=4)
    _, ref_clm, _ = dense_reference(hidden, weight, None, labels, ids, lps, mask, 1.0, 1.0, None)
    torch.testing.assert_close(clm.loss, ref_clm)
    torch.testing.assert_close(full.loss, ref_clm)
    assert float(clm.kl) == 0.0
    torch.testing.assert_close(clm.clm, F.cross_entropy((hidden @ weight.T)[mask], labels[mask]))


def test_no_teacher_is_the_clm_objective():
    hidden, weight, _, labels, _, _, mask = make_inputs(4)
    parts = fusion_loss(hidden, weight, labels, None, None, mask, lam=1.0, chunk_tokens=4)
    torch.testing.assert_close(parts.loss, clm_loss(hidden, weight, labels, mask).loss)
    with pytest.raises(ValueError, match="lam"):
        fusion_loss(hidden, weight, labels, None, None, mask, lam=0.9)


def test_empty_mask_is_zero_and_backward_works():
    hidden, weight, _, labels, ids, lps, mask = make_inputs(5)
    parts = fusion_loss(hidden, weight, labels, ids, lps, torch.zeros_like(mask))
    assert isinstance(parts, LossParts) and int(parts.n_tokens) == 0 and float(parts.loss.detach()) == 0.0
    parts.loss.backward()
    assert hidden.grad is not None and float(hidden.grad.abs().sum()) == 0.0


def test_out_of_vocab_label_at_counted_position_is_reported():
    hidden, weight, _, labels, ids, lps, mask = make_inputs(6)
    labels = labels.clone()
    labels[0, 0] = V  # counted (mask[0, 0] is True)
    with pytest.raises(ValueError, match=r"batch row 0, position 0"):
        fusion_loss(hidden, weight, labels, ids, lps, mask)
    with pytest.raises(ValueError, match="'fusion.temperature'"):
        fusion_loss(hidden, weight, labels, ids, lps, mask, temperature=0.0)


def test_no_grad_path_matches():
    hidden, weight, _, labels, ids, lps, mask = make_inputs(7)
    with torch.no_grad():
        eval_parts = fusion_loss(hidden, weight, labels, ids, lps, mask, chunk_tokens=3)
    train_parts = fusion_loss(hidden, weight, labels, ids, lps, mask, chunk_tokens=3)
    torch.testing.assert_close(eval_parts.loss, train_parts.loss.detach())


# ----------------------------------------------------------------------------------------------------------
# sparse_kl and per_teacher_ce on their own.
# ----------------------------------------------------------------------------------------------------------


def test_sparse_kl_with_full_support_is_the_true_kl():
    g = torch.Generator().manual_seed(8)
    teacher = torch.randn(6, V, generator=g).log_softmax(-1)  # k = V: nothing truncated
    student_logits = torch.randn(6, V, generator=g)
    for tau in (1.0, 2.0):
        student = (student_logits / tau).log_softmax(-1)
        want = F.kl_div(student, (teacher / tau).log_softmax(-1), log_target=True, reduction="none").sum(-1)
        torch.testing.assert_close(sparse_kl(student, teacher, tau, scale_by_t2=False), want)
    same = sparse_kl(teacher, teacher, 1.0)
    torch.testing.assert_close(same, torch.zeros(6), atol=1e-6, rtol=0)


def test_sparse_kl_is_nonnegative_on_truncated_rows():
    g = torch.Generator().manual_seed(9)
    student = torch.randn(50, V, generator=g).log_softmax(-1)
    ids = torch.rand(50, V, generator=g).argsort(-1)[:, :K]
    teacher = torch.randn(50, K, generator=g).log_softmax(-1)
    assert (sparse_kl(student.gather(-1, ids), teacher, 1.5) >= -1e-6).all()


def test_per_teacher_ce_matches_loop_reference():
    g = torch.Generator().manual_seed(10)
    gold = -3 * torch.rand(3, B, T, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7
    aligned = torch.rand(3, B, T, generator=g) < 0.6
    aligned[2] = False
    got_all = per_teacher_ce(gold, mask)
    got_aligned = per_teacher_ce(gold, mask, aligned)
    for n in range(3):
        cells = [(b, t) for b, t in itertools.product(range(B), range(T)) if mask[b, t]]
        assert float(got_all[n]) == pytest.approx(sum(-float(gold[n, b, t]) for b, t in cells) / len(cells), rel=1e-6)
        kept = [(b, t) for b, t in cells if aligned[n, b, t]]
        if kept:
            want = sum(-float(gold[n, b, t]) for b, t in kept) / len(kept)
            assert float(got_aligned[n]) == pytest.approx(want, rel=1e-6)
        else:
            assert math.isnan(float(got_aligned[n]))


# ----------------------------------------------------------------------------------------------------------
# Memory: the largest tensor created in forward and backward.
# ----------------------------------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) any ATen op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor):
                self.numel = max(self.numel, x.numel())
        return out


class SavedForBackward:
    """Sums the distinct tensors autograd keeps from the forward for the backward: what stays alive between them."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, x):
        self.storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes() // x.element_size()
        return x

    @property
    def numel(self) -> int:
        return sum(self.storages.values())


def _memory_probe(chunk_tokens: int, v: int = 4096, h: int = 8, b: int = 4, t: int = 16, k: int = 8):
    """(largest tensor in the forward, largest in the backward, elements kept for the backward, n tokens)."""
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(b, t, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (b, t), generator=g)
    ids = torch.randint(0, v, (b, t, k), generator=g)
    lps = torch.randn(b, t, k, generator=g).log_softmax(-1).sort(-1, descending=True).values
    mask = torch.ones(b, t, dtype=torch.bool)
    saved = SavedForBackward()
    with LargestTensor() as forward, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda x: x):
        parts = fusion_loss(hidden, weight, labels, ids, lps, mask, temperature=2.0, chunk_tokens=chunk_tokens,
                            impl="chunked")
    with LargestTensor() as backward:
        parts.loss.backward()
    return forward.numel, backward.numel, saved.numel, b * t


def test_chunked_path_holds_one_chunk_of_logits_at_a_time(monkeypatch):
    v, h, chunk = 4096, 8, 16
    forward, backward, saved, n = _memory_probe(chunk, v=v, h=h)
    assert v * h <= chunk * v < n * v  # sizes chosen so that a [V, H] weight gradient is not the largest
    # Transient: no op makes anything larger than one chunk's [chunk, V] logits, in either pass.
    assert forward <= chunk * v and backward <= chunk * v
    assert backward == chunk * v  # the backward recomputes a chunk's logits: the probe sees the backward
    # Kept between forward and backward: the weight and the [n, H] hidden rows, no logits.
    assert saved <= v * h + 4 * n * h
    # Controls, so that both probes are known to see what they guard against:
    forward_unchunked, _, _, _ = _memory_probe(n, v=v, h=h)
    assert forward_unchunked == n * v
    monkeypatch.setattr(loss_module, "checkpoint", lambda fn, *args, **kwargs: fn(*args))
    _, _, saved_without_recompute, _ = _memory_probe(chunk, v=v, h=h)
    assert saved_without_recompute >= n * v
