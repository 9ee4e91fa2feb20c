"""``impl="fused"`` (gradients computed in the forward, Liger-style) against ``impl="chunked"`` (checkpointed
chunks, autograd) and a dense reference (full logits, ``F.log_softmax``, a loop-built dense teacher): loss,
metrics and the gradients w.r.t. the hidden state, the lm_head weight and bias; partial ``requires_grad``,
``no_grad``, bf16; the number of head matmuls, the largest tensors of each pass and the peak of live ones."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fuseflow.fuse.loss import LOSS_IMPLS, clm_loss, fusion_loss
from fuseflow.measure import PeakTensorBytes
from loss_reference import dense_reference

B, T, H, V, K = 2, 9, 6, 23, 5


def make_inputs(seed: int, dtype=torch.float64, bias: bool = True):
    """A trunk output ``[B, T + 1, H]`` whose ``[:, :-1]`` slice is the loss input (as in the trainer); 15 counted
    positions (padding at the end of row 0, a hole in row 1); teacher rows with ``-inf`` entries, an all-``-inf``
    row, a one-hot row and a row whose absent entry repeats a present id."""
    g = torch.Generator().manual_seed(seed)
    trunk = torch.randn(B, T + 1, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 1.5).to(dtype).requires_grad_()
    lm_bias = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -2:] = False
    mask[1, 3] = False
    labels[~mask] = -100  # never read where not counted
    ids = torch.rand(B, T, V, generator=g).argsort(-1)[..., :K]  # [B, T, K]
    lps = (torch.randn(B, T, K, generator=g, dtype=torch.float64) * 2).log_softmax(-1)
    lps = lps.sort(-1, descending=True).values
    lps[:, :, -2:] = torch.where(torch.rand(B, T, 1, generator=g) < 0.4, -math.inf, lps[:, :, -2:])
    lps[0, 1] = -math.inf  # no teacher mass at all: KL 0, no gradient
    lps[1, 0] = torch.tensor([0.0] + [-math.inf] * (K - 1))  # one-hot
    ids[1, 2, -1] = ids[1, 2, 0]  # an id repeated by an absent entry (as fusions pad their rows)
    lps[1, 2, -1] = -math.inf
    return trunk, weight, lm_bias, labels, ids, lps.to(dtype), mask


def loss_and_grads(impl, inputs, *, lam, temperature, softcap, chunk_tokens, scale_by_t2=True):
    trunk, weight, lm_bias, labels, ids, lps, mask = inputs
    hidden = trunk[:, :-1]  # [B, T, H]: the trainer's slice, not contiguous
    if impl == "dense":
        loss, clm, kl = dense_reference(
            hidden, weight, lm_bias, labels, ids, lps, mask, lam, temperature, softcap, scale_by_t2,
            dtype=torch.float64,
        )
        n = mask.sum()
    else:
        parts = fusion_loss(hidden, weight, labels, ids, lps, mask, lam=lam, temperature=temperature,
                            chunk_tokens=chunk_tokens, logit_softcap=softcap, lm_head_bias=lm_bias,
                            scale_by_t2=scale_by_t2, impl=impl)
        loss, clm, kl, n = parts.loss, parts.clm, parts.kl, parts.n_tokens
    leaves = [x for x in (trunk, weight, lm_bias) if x is not None and x.requires_grad]
    grads = torch.autograd.grad(loss, leaves) if leaves else ()
    return loss.detach(), clm.detach(), kl.detach(), int(n), grads


def assert_same(got, want, rtol, atol):
    g_loss, g_clm, g_kl, g_n, g_grads = got
    w_loss, w_clm, w_kl, w_n, w_grads = want
    assert g_n == w_n
    for a, b in zip((g_loss, g_clm, g_kl), (w_loss, w_clm, w_kl)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    assert len(g_grads) == len(w_grads)
    for a, b in zip(g_grads, w_grads):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("lam", [1.0, 0.9, 0.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_matches_chunked_and_dense_fp64(lam, temperature, softcap, bias):
    inputs = make_inputs(0, bias=bias)
    kw = dict(lam=lam, temperature=temperature, softcap=softcap)
    fused = loss_and_grads("fused", inputs, chunk_tokens=4, **kw)  # 15 rows: a ragged last chunk
    assert fused[3] == 15
    assert float(fused[2]) > 1e-2 and float(fused[1]) > 1e-2  # both terms exercised
    assert_same(fused, loss_and_grads("chunked", inputs, chunk_tokens=4, **kw), rtol=1e-12, atol=1e-12)
    assert_same(fused, loss_and_grads("dense", inputs, chunk_tokens=None, **kw), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_tokens", [1, 2, 7, 15, 1024])
@pytest.mark.parametrize("scale_by_t2", [True, False])
def test_chunk_sizes_and_t2_scale(chunk_tokens, scale_by_t2):
    inputs = make_inputs(1)
    kw = dict(lam=0.5, temperature=0.7, softcap=4.0, scale_by_t2=scale_by_t2)
    fused = loss_and_grads("fused", inputs, chunk_tokens=chunk_tokens, **kw)
    assert_same(fused, loss_and_grads("dense", inputs, chunk_tokens=None, **kw), rtol=1e-10, atol=1e-12)


def test_gradcheck_against_finite_differences():
    """An independent check of the analytic gradients: torch's finite differences through the forward only."""
    trunk, weight, lm_bias, labels, ids, lps, mask = make_inputs(2)

    def loss(trunk, weight, lm_bias):
        return fusion_loss(trunk[:, :-1], weight, labels, ids, lps, mask, lam=0.3, temperature=1.5, chunk_tokens=4,
                           logit_softcap=2.0, lm_head_bias=lm_bias, impl="fused").loss

    assert torch.autograd.gradcheck(loss, (trunk, weight, lm_bias), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_clm_only_without_teachers():
    trunk, weight, lm_bias, labels, _, _, mask = make_inputs(3)
    got = {
        impl: clm_loss(trunk[:, :-1], weight, labels, mask, chunk_tokens=4, logit_softcap=3.0, lm_head_bias=lm_bias,
                       impl=impl)
        for impl in LOSS_IMPLS
    }
    torch.testing.assert_close(got["fused"].loss, got["chunked"].loss, rtol=1e-12, atol=0)
    assert float(got["fused"].kl) == 0.0
    for a, b in zip(torch.autograd.grad(got["fused"].loss, (trunk, weight, lm_bias)),
                    torch.autograd.grad(got["chunked"].loss, (trunk, weight, lm_bias))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_gradient_reaches_only_the_counted_positions_of_the_trunk():
    trunk, weight, lm_bias, labels, ids, lps, mask = make_inputs(4)
    fusion_loss(trunk[:, :-1], weight, labels, ids, lps, mask, lm_head_bias=lm_bias, impl="fused").loss.backward()
    assert trunk.grad.shape == (B, T + 1, H)
    counted = torch.zeros(B, T + 1, dtype=torch.bool)
    counted[:, :-1] = mask
    assert float(trunk.grad[~counted].abs().sum()) == 0.0
    assert (trunk.grad[counted].abs().sum(-1) > 0).all()


def test_metrics_are_detached_and_the_upstream_gradient_scales():
    inputs = make_inputs(5)
    trunk, weight, lm_bias, labels, ids, lps, mask = inputs
    parts = fusion_loss(trunk[:, :-1], weight, labels, ids, lps, mask, lm_head_bias=lm_bias, impl="fused")
    assert parts.loss.requires_grad and not parts.clm.requires_grad and not parts.kl.requires_grad
    once = torch.autograd.grad(parts.loss, (trunk, weight, lm_bias), retain_graph=True)
    # A second backward through the same graph (retain_graph) sees unscaled stored gradients.
    scaled = torch.autograd.grad(-2.5 * parts.loss, (trunk, weight, lm_bias))
    for a, b in zip(scaled, once):
        torch.testing.assert_close(a, -2.5 * b, rtol=1e-14, atol=0)


class HeadMatmuls(TorchDispatchMode):
    """Counts matrix products (``mm``/``addmm``, in or out of place) and the largest tensor any op returns."""

    PRODUCTS = {"mm", "addmm", "addmm_", "bmm", "baddbmm"}

    def __init__(self):
        super().__init__()
        self.products = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.products += func.overloadpacket.__name__ in self.PRODUCTS
        out = func(*args, **(kwargs or {}))
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def _count(impl, trunk_grad: bool, weight_grad: bool, bias_grad: bool, grad_mode: bool = True):
    trunk, weight, lm_bias, labels, ids, lps, mask = make_inputs(6, dtype=torch.float32)
    trunk.requires_grad_(trunk_grad)
    weight.requires_grad_(weight_grad)
    lm_bias.requires_grad_(bias_grad)
    with HeadMatmuls() as forward, torch.set_grad_enabled(grad_mode):
        parts = fusion_loss(trunk[:, :-1], weight, labels, ids, lps, mask, lm_head_bias=lm_bias, chunk_tokens=4,
                            impl=impl)
    with HeadMatmuls() as backward:
        if parts.loss.requires_grad:
            parts.loss.backward()
    return forward.products, backward.products, (trunk.grad, weight.grad, lm_bias.grad)


def test_three_head_matmuls_per_chunk_instead_of_four():
    chunks = 4  # 15 rows by 4
    assert _count("chunked", True, True, True)[:2] == (chunks, 3 * chunks)  # the backward recomputes the logits
    assert _count("fused", True, True, True)[:2] == (3 * chunks, 0)


@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_work_is_skipped_for_inputs_without_grad(impl):
    chunks = 4
    forward, backward, (trunk_grad, weight_grad, bias_grad) = _count(impl, True, False, False)
    assert weight_grad is None and bias_grad is None and trunk_grad is not None
    # logits, recomputed logits (chunked only), the gradient of one input
    assert forward + backward == (3 if impl == "chunked" else 2) * chunks
    forward, backward, (trunk_grad, weight_grad, bias_grad) = _count(impl, False, True, False)
    assert trunk_grad is None and weight_grad is not None and bias_grad is None
    assert forward + backward == (3 if impl == "chunked" else 2) * chunks
    for grads in [(False, False, False, True), (True, True, True, False)]:  # nothing requires grad / no_grad
        forward, backward, _ = _count(impl, *grads)
        assert (forward, backward) == (chunks, 0)


def test_weight_without_grad_matches_chunked():
    inputs = make_inputs(7)
    inputs[1].requires_grad_(False)
    inputs[2].requires_grad_(False)
    kw = dict(lam=0.9, temperature=2.0, softcap=3.0, chunk_tokens=4)
    fused = loss_and_grads("fused", inputs, **kw)
    assert len(fused[4]) == 1
    assert_same(fused, loss_and_grads("chunked", inputs, **kw), rtol=1e-12, atol=1e-14)


def test_no_grad_evaluation_matches():
    inputs = make_inputs(8)
    trunk, weight, lm_bias, labels, ids, lps, mask = inputs
    with torch.no_grad():
        got = {impl: fusion_loss(trunk[:, :-1], weight, labels, ids, lps, mask, lam=0.9, temperature=2.0,
                                 chunk_tokens=4, lm_head_bias=lm_bias, impl=impl) for impl in LOSS_IMPLS}
    assert not got["fused"].loss.requires_grad
    for field in ("loss", "clm", "kl", "n_tokens"):
        torch.testing.assert_close(getattr(got["fused"], field), getattr(got["chunked"], field), rtol=1e-12, atol=0)


def test_empty_mask_keeps_the_zero_loss_connected():
    trunk, weight, lm_bias, labels, ids, lps, mask = make_inputs(9)
    parts = fusion_loss(trunk[:, :-1], weight, labels, ids, lps, torch.zeros_like(mask), impl="fused")
    assert int(parts.n_tokens) == 0 and float(parts.loss.detach()) == 0.0
    parts.loss.backward()
    assert float(trunk.grad.abs().sum()) == 0.0 and float(weight.grad.abs().sum()) == 0.0


def test_unknown_impl_is_reported():
    trunk, weight, _, labels, ids, lps, mask = make_inputs(10)
    with pytest.raises(ValueError, match="impl must be one of"):
        fusion_loss(trunk[:, :-1], weight, labels, ids, lps, mask, impl="liger")
    with pytest.raises(ValueError, match="impl must be one of"):
        clm_loss(trunk[:, :-1], weight, labels, mask, impl="")


@pytest.mark.parametrize("chunk_tokens", [3, 1024])
def test_bf16_within_tolerance(chunk_tokens):
    inputs = make_inputs(11, dtype=torch.bfloat16)
    kw = dict(lam=0.9, temperature=2.0, softcap=3.0)
    fused = loss_and_grads("fused", inputs, chunk_tokens=chunk_tokens, **kw)
    assert fused[0].dtype == torch.float32  # the softmaxes ran in fp32
    assert all(g.dtype == torch.bfloat16 for g in fused[4])
    chunked = loss_and_grads("chunked", inputs, chunk_tokens=chunk_tokens, **kw)
    for a, b in zip(fused[:3], chunked[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same forward ops
    exact = [
        x.detach().double().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) and x.is_floating_point()
        else x
        for x in inputs
    ]
    dense = loss_and_grads("dense", exact, chunk_tokens=None, **kw)
    torch.testing.assert_close(fused[0].double(), dense[0], rtol=1e-4, atol=1e-5)
    for got, ref, want in zip(fused[4], chunked[4], dense[4]):
        scale = float(want.abs().max())
        # No worse than the chunked path's bf16 gradients, both against the fp64 truth.
        assert float((got.double() - want).abs().max()) <= max(float((ref.double() - want).abs().max()) * 1.5,
                                                               1e-2 * scale)


def wide_vocab_inputs(v: int, h: int, n: int, seed: int):
    """``n`` positions of a hidden size ``h`` head over ``v`` ids (``v`` ≫ chunk, so a [chunk, V] block is the
    largest tensor), 4 teacher ids each: hidden [1, n, h] and weight [V, h] with gradients, labels, ids, logprobs,
    mask."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (1, n), generator=g)  # [1, n]
    ids = torch.randint(0, v, (1, n, 4), generator=g)  # [1, n, 4]
    lps = torch.randn(1, n, 4, generator=g).log_softmax(-1)  # [1, n, 4]
    return hidden, weight, labels, ids, lps, torch.ones(1, n, dtype=torch.bool)


def test_fused_holds_no_logits_between_the_passes():
    """Forward: one chunk's [c, V] blocks and the [V, H] weight-gradient accumulator; backward: nothing as large
    as a chunk's logits (no recompute). The chunked path's backward makes [c, V] blocks again (control)."""
    v, h, chunk, n = 2048, 8, 16, 64
    hidden, weight, labels, ids, lps, mask = wide_vocab_inputs(v, h, n, seed=12)
    largest = {}
    for impl in LOSS_IMPLS:
        with HeadMatmuls() as forward:
            parts = fusion_loss(hidden, weight, labels, ids, lps, mask, temperature=2.0, chunk_tokens=chunk, impl=impl)
        with HeadMatmuls() as backward:
            parts.loss.backward()
        largest[impl] = (forward.largest, backward.largest)
    assert v * h < chunk * v < n * v
    assert largest["fused"][0] == chunk * v and largest["fused"][1] == v * h
    assert largest["chunked"] == (chunk * v, chunk * v)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_peak_is_three_logit_blocks_and_its_gradients(softcap):
    """Over forward + backward at τ = 2: the fused path holds at most 3 fp32 [c, V] blocks (logits, their two
    log-softmaxes) plus its gradients; the chunked path reaches 4 (``logits / τ`` besides) in the forward and
    more in the backward (control)."""
    v, h, chunk, n = 2048, 8, 16, 64
    hidden, weight, labels, ids, lps, mask = wide_vocab_inputs(v, h, n, seed=13)
    peak = {}
    for impl in LOSS_IMPLS:
        hidden.grad = weight.grad = None
        with PeakTensorBytes() as live:
            fusion_loss(hidden, weight, labels, ids, lps, mask, temperature=2.0, logit_softcap=softcap,
                        chunk_tokens=chunk, impl=impl).loss.backward()
        peak[impl] = live.peak
    block, grads = chunk * v * 4, (v * h + n * h + v) * 4
    assert peak["fused"] <= 3 * block + grads + block // 10  # a tenth of a block for the [c, k] and [n] pieces
    assert peak["chunked"] >= 4 * block
