"""The lm_head epilogue (fuseflow.kernels.head) against slow references: full fp32 logits, the transform,
``torch.log_softmax`` over the whole vocabulary, ``torch.topk``. The Triton kernel is checked under Triton's
CPU interpreter in a subprocess (TRITON_INTERPRET must be set before triton is imported)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from fuseflow.kernels import head as kh
from fuseflow.kernels.head import (
    LogitTransform,
    apply_logit_transform,
    block_extrema,
    block_topk,
    logsumexp_transformed,
    resolve_method,
    token_nll,
    token_nll_with_head,
    topk_from_block_extrema,
    topk_logprobs,
    topk_logprobs_with_head,
)

TRANSFORMS = {
    "identity": LogitTransform(),
    "softcap+temperature": LogitTransform(softcap=4.0, temperature=0.7),
    "logit_scale": LogitTransform(logit_scale=0.25),
    "negative_scale": LogitTransform(logit_scale=-0.5, temperature=1.3),
    "logits_scaling": LogitTransform(logits_scaling=3.0),
    "negative_scaling+softcap": LogitTransform(logits_scaling=-2.0, softcap=5.0),
}


# ----------------------------------------------------------------------------------------------------------
# Slow references.
# ----------------------------------------------------------------------------------------------------------


def reference_transform(z: torch.Tensor, t: LogitTransform) -> torch.Tensor:
    """The transform written out longhand (fp32)."""
    z = z.double()
    if t.logit_scale is not None:
        z = z * t.logit_scale
    if t.logits_scaling is not None:
        z = z / t.logits_scaling
    if t.softcap is not None:
        z = t.softcap * torch.tanh(z / t.softcap)
    return (z / t.temperature).float()


def reference_head(hidden, weight, bias, gold, k, t):
    """Full ``[N, V]`` fp32 logits → transform → log_softmax → topk, gold gather."""
    z = hidden.float() @ weight.float().T + (0 if bias is None else bias.float())  # [N, V]
    lp = torch.log_softmax(reference_transform(z, t).double(), dim=-1).float()  # [N, V]
    values, ids = torch.topk(lp, k, dim=-1)  # [N, k]
    return ids, values, lp.gather(1, gold[:, None])[:, 0], lp


def problem(n=37, h=24, v=1000, dtype=torch.float32, bias=True, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * spread / h**0.5
    b = torch.randn(v, generator=g) if bias else None
    gold = torch.randint(0, v, (n,), generator=g)
    return hidden.to(dtype), weight.to(dtype), None if b is None else b.to(dtype), gold


def assert_ids_match_where_distinct(ids, ref_ids, ref_scores, k, gap=0.0):
    """``ids`` equals ``ref_ids`` (the top-k of ``ref_scores [N, V]``) at every rank whose score is separated
    by more than ``gap`` from its neighbours (ties, or near-ties at the input's resolution, may legitimately
    come in another order)."""
    top = torch.topk(ref_scores, min(k + 1, ref_scores.shape[1]), dim=-1).values  # [N, k+1]
    if top.shape[1] == k:  # k == V: nothing after the last rank
        top = torch.cat([top, torch.full_like(top[:, :1], float("-inf"))], 1)
    d = top[:, :-1] - top[:, 1:]  # [N, k] gap below each rank
    above = torch.cat([torch.full_like(d[:, :1], float("inf")), d[:, :-1]], 1)  # [N, k] gap above
    gap = torch.as_tensor(gap).reshape(-1, 1) if torch.is_tensor(gap) else gap
    determined = (d > gap) & (above > gap)  # [N, k]
    assert determined.float().mean() > 0.3, "test is vacuous: too few determined ranks"
    assert torch.equal(ids[determined], ref_ids[determined])


# ----------------------------------------------------------------------------------------------------------
# LogitTransform.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"logit_scale": 0.0}, "logit_scale"),
        ({"logit_scale": float("nan")}, "logit_scale"),
        ({"logits_scaling": 0.0}, "logits_scaling"),
        ({"logits_scaling": float("inf")}, "logits_scaling"),
        ({"softcap": 0.0}, "softcap"),
        ({"softcap": -1.0}, "softcap"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_transform_refuses_degenerate_factors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LogitTransform(**kwargs)


def test_transform_from_config_and_direction():
    text = SimpleNamespace(final_logit_softcapping=30.0, logit_scale=0.0625, logits_scaling=None)
    config = SimpleNamespace(get_text_config=lambda: text)
    t = LogitTransform.from_config(config, temperature=2.0)
    assert t == LogitTransform(logit_scale=0.0625, softcap=30.0, temperature=2.0)
    assert LogitTransform.from_config(SimpleNamespace(final_logit_softcapping=0)).is_identity  # 0: no cap
    assert LogitTransform.from_config(SimpleNamespace()).is_identity
    assert LogitTransform().increasing and LogitTransform(logit_scale=-1.0, logits_scaling=-2.0).increasing
    assert not LogitTransform(logit_scale=-1.0).increasing and not LogitTransform(logits_scaling=-3.0).increasing


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_apply_transform_matches_longhand_and_is_monotone(name):
    t = TRANSFORMS[name]
    z = torch.linspace(-50, 50, 2001)  # sorted ascending
    got = apply_logit_transform(z, t)
    torch.testing.assert_close(got, reference_transform(z, t), rtol=1e-6, atol=1e-5)
    diffs = got[1:] - got[:-1]
    assert bool((diffs >= 0).all()) if t.increasing else bool((diffs <= 0).all())
    assert torch.equal(z, torch.linspace(-50, 50, 2001))  # not inplace: input untouched
    if not t.is_identity:
        w = z.clone()
        assert apply_logit_transform(w, t, inplace=True) is w and torch.equal(w, got)


# ----------------------------------------------------------------------------------------------------------
# block_topk: exact against torch.topk.
# ----------------------------------------------------------------------------------------------------------


def check_block_topk(x, k, block, largest=True):
    values, ids = block_topk(x, k, block, largest=largest)
    ref_values, ref_ids = torch.topk(x, k, dim=-1, largest=largest)
    assert ids.dtype == torch.int64 and values.shape == ids.shape == (x.shape[0], k)
    assert torch.equal(values, ref_values)  # bit for bit, -inf included
    assert torch.equal(x.gather(1, ids), values)  # the ids point at those values
    assert all(len(set(r)) == k for r in ids.tolist())  # no id twice
    # Ids equal wherever the value occurs once in the row.
    unique = (x[:, None, :] == ref_values[:, :, None]).sum(-1) == 1  # [N, k]
    assert torch.equal(ids[unique], ref_ids[unique])


@pytest.mark.parametrize(
    "v, k, block",
    [
        (1000, 10, 64),  # V not a multiple of the block: 40-column tail
        (1024, 10, 64),  # V a multiple
        (1000, 70, 16),  # k > block
        (1000, 1, 128),
        (300, 300, 32),  # k == V
        (50, 5, 64),  # V < block: no full block
        (999, 62, 16),  # k == V // block - 0: barely prunes
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_topk_equals_torch_topk(v, k, block, dtype):
    g = torch.Generator().manual_seed(v + k + block)
    x = torch.randn(23, v, generator=g).to(dtype)
    check_block_topk(x, k, block)
    check_block_topk(x, k, block, largest=False)


def test_block_topk_ties_and_infinities():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-3, 4, (40, 777), generator=g).float()  # 7 distinct values: ties everywhere
    x[x == -3] = float("-inf")
    x[:3] = float("-inf")  # whole rows of -inf
    x[3, 5] = float("inf")
    for k, block in ((10, 32), (100, 8), (777, 64)):
        check_block_topk(x, k, block)
        check_block_topk(x, k, block, largest=False)


def test_block_topk_finds_winners_packed_in_one_block_or_the_tail():
    x = torch.zeros(4, 1000)
    x[0, 128:138] = torch.arange(10.0) + 1  # all winners in one block
    x[1, 990:1000] = torch.arange(10.0) + 1  # all winners in the tail (1000 = 7·128 + 104)
    x[2, ::100] = torch.arange(10.0) + 1  # one per block
    x[3] = -torch.arange(1000.0)  # sorted: winners in block 0
    check_block_topk(x, 10, 128)


def test_block_stages_shapes_and_errors():
    x = torch.randn(3, 1000)
    ext = block_extrema(x, 128)
    assert ext.shape == (3, 7) and torch.equal(ext[:, 2], x[:, 256:384].amax(-1))
    assert torch.equal(block_extrema(x, 128, largest=False)[:, 6], x[:, 768:896].amin(-1))
    with pytest.raises(ValueError, match="extrema must be"):
        topk_from_block_extrema(x, ext[:, :5], 3, 128)
    with pytest.raises(ValueError, match="k must be in"):
        block_topk(x, 1001, 128)
    with pytest.raises(ValueError, match="k must be in"):
        block_topk(x, 0, 128)
    with pytest.raises(ValueError, match="block must be"):
        block_topk(x, 3, 0)
    with pytest.raises(ValueError, match="x must be 2-D"):
        block_topk(x[0], 3, 16)


# ----------------------------------------------------------------------------------------------------------
# logsumexp_transformed.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["identity", "softcap+temperature", "negative_scale"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slice_elements", [1, 7 * 100, 1 << 24])
def test_logsumexp_transformed_matches_full_reference(name, dtype, slice_elements):
    t = TRANSFORMS[name]
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(7, 1000, generator=g) * 5).to(dtype)
    x[0, :500] = float("-inf")
    keep = x.clone()
    ref = torch.logsumexp(reference_transform(x.float(), t).double(), -1).float()
    got = logsumexp_transformed(x, t, slice_elements=slice_elements)
    assert got.dtype == torch.float32 and got.shape == (7,)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=2e-6)
    assert torch.equal(x, keep)  # not overwritten unless asked
    all_neg_inf = torch.full((2, 10), float("-inf"), dtype=dtype)
    # -inf stays -inf, or becomes -cap under a soft-cap, or +inf under a negative scale: as the reference.
    expected = torch.logsumexp(reference_transform(all_neg_inf.float(), t), -1)
    torch.testing.assert_close(logsumexp_transformed(all_neg_inf, t), expected)
    if t.is_identity:
        assert torch.equal(expected, torch.full((2,), float("-inf")))


def test_logsumexp_overwrite_transforms_fp32_in_place():
    x = torch.randn(4, 50)
    t = LogitTransform(softcap=2.0)
    ref = torch.logsumexp(apply_logit_transform(x, t), -1)
    y = x.clone()
    torch.testing.assert_close(logsumexp_transformed(y, t, overwrite=True), ref)
    torch.testing.assert_close(y, apply_logit_transform(x, t))  # the block itself was transformed


# ----------------------------------------------------------------------------------------------------------
# topk_logprobs / token_nll against the dense reference.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["torch", "block", "auto"])
@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("chunk", [1, 7, 37, 64])
def test_topk_logprobs_fp32_matches_dense_reference(method, name, chunk):
    t = TRANSFORMS[name]
    hidden, weight, bias, gold = problem(bias=chunk != 7)
    k = 12
    ids, lp, gl = topk_logprobs(hidden, weight, bias, gold, k, transform=t, chunk_tokens=chunk, method=method, block=32)
    ref_ids, ref_lp, ref_gold, full = reference_head(hidden, weight, bias, gold, k, t)
    assert ids.dtype == torch.int64 and lp.dtype == gl.dtype == torch.float32
    assert ids.shape == lp.shape == (37, k) and gl.shape == (37,)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=2e-5)
    torch.testing.assert_close(gl, ref_gold, rtol=0, atol=2e-5)
    assert bool((lp[:, 1:] <= lp[:, :-1]).all())  # descending
    torch.testing.assert_close(full.gather(1, ids), lp, rtol=0, atol=2e-5)  # ids carry their logprobs
    assert_ids_match_where_distinct(ids, ref_ids, full, k, gap=1e-5)


@pytest.mark.parametrize("method", ["torch", "block"])
@pytest.mark.parametrize("name", ["identity", "softcap+temperature", "negative_scale"])
def test_topk_logprobs_bf16_within_bf16_resolution(method, name):
    """bf16 weights → bf16 logits. The reference is fp32 math on the same (bf16-rounded) numbers; ranks whose
    fp32 gap exceeds the bf16 rounding of the logits must agree, logprobs within bf16 tolerance."""
    t = TRANSFORMS[name]
    hidden, weight, bias, gold = problem(n=64, h=64, v=3000, dtype=torch.bfloat16, spread=8.0, seed=5)
    k = 10
    ids, lp, gl = topk_logprobs(hidden, weight, bias, gold, k, transform=t, chunk_tokens=20, method=method, block=64)
    ref_ids, ref_lp, ref_gold, full = reference_head(hidden, weight, bias, gold, k, t)
    z = hidden.float() @ weight.float().T + bias.float()  # [N, V] raw fp32 logits
    zmax = z.abs().amax(-1)  # [N]
    # bf16 keeps 8 significant bits: rounding moves a logit by <= |z|·2⁻⁹ (plus fp32-accumulation noise);
    # a transform scales it by at most max|f'|.
    slope = abs((t.logit_scale or 1.0) / (t.logits_scaling or 1.0)) / t.temperature
    err = slope * (zmax * 2.0**-8 + 1e-3)  # [N] per-logit error bound after the transform
    # Ids come from the raw logits (the transform is monotone): ranks whose raw fp32 gaps exceed twice the
    # bf16 rounding are determined, whatever the transform squeezes afterwards.
    raw = z if t.increasing else -z
    raw_ids = torch.topk(raw, k, dim=-1).indices
    assert_ids_match_where_distinct(ids, raw_ids, raw, k, gap=2 * (zmax * 2.0**-8 + 1e-3))
    # logprob = z - lse: both terms carry at most err each.
    assert bool(((lp - ref_lp).abs() <= 2 * err[:, None] + 1e-4).all())
    assert bool(((gl - ref_gold).abs() <= 2 * err + 1e-4).all())
    assert bool(((lp - ref_lp).abs().amax() > 0))  # bf16 really was used (this is not the fp32 path)


def test_topk_logprobs_k_equals_vocabulary_and_no_gold():
    hidden, weight, bias, gold = problem(n=9, v=50)
    for method in ("torch", "block"):
        ids, lp, gl = topk_logprobs(hidden, weight, bias, None, 50, chunk_tokens=4, method=method, block=8)
        assert gl is None
        assert torch.equal(ids.sort(-1).values, torch.arange(50).expand(9, -1))  # every id once
        torch.testing.assert_close(lp.exp().sum(-1), torch.ones(9))


def test_topk_logprobs_empty_and_errors():
    hidden, weight, bias, gold = problem(n=5, v=40)
    ids, lp, gl = topk_logprobs(hidden[:0], weight, bias, gold[:0], 3, chunk_tokens=4)
    assert ids.shape == (0, 3) and lp.shape == (0, 3) and gl.shape == (0,)
    with pytest.raises(ValueError, match="method must be one of"):
        topk_logprobs(hidden, weight, bias, gold, 3, method="fast")
    with pytest.raises(ValueError, match="k must be in"):
        topk_logprobs(hidden, weight, bias, gold, 41)
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        topk_logprobs(hidden, weight, bias, gold, 3, chunk_tokens=0)
    with pytest.raises(ValueError, match="gold must be"):
        topk_logprobs(hidden, weight, bias, gold[:3], 3)
    with pytest.raises(ValueError, match="weight must be"):
        topk_logprobs(hidden, weight[:, :5], bias, gold, 3)
    with pytest.raises(ValueError, match="bias must be"):
        topk_logprobs(hidden, weight, bias[:5], gold, 3)
    with pytest.raises(ValueError, match="k must be <= the vocabulary"):
        topk_logprobs_with_head(hidden, lambda h: h @ weight.T, gold, 41)


@pytest.mark.parametrize("name", ["identity", "softcap+temperature", "negative_scaling+softcap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_nll_matches_dense_reference(name, dtype):
    t = TRANSFORMS[name]
    hidden, weight, bias, gold = problem(n=30, v=700, dtype=dtype)
    nll = token_nll(hidden, weight, bias, gold, transform=t, chunk_tokens=8)
    _, _, ref_gold, _ = reference_head(hidden, weight, bias, gold, 1, t)
    assert nll.dtype == torch.float32 and nll.shape == (30,)
    torch.testing.assert_close(nll, -ref_gold, rtol=0, atol=2e-5 if dtype == torch.float32 else 0.1)
    if dtype == torch.float32:
        return
    # bf16 logits, fp32 everything after: equal to fp32 math on those same bf16 logits.
    z = torch.nn.functional.linear(hidden, weight, bias).float()
    ref = -torch.log_softmax(reference_transform(z, t).double(), -1).gather(1, gold[:, None])[:, 0].float()
    torch.testing.assert_close(nll, ref, rtol=0, atol=2e-5)


def test_heads_are_called_per_chunk():
    hidden, weight, bias, gold = problem(n=23, v=100)
    lin = torch.nn.Linear(24, 100)
    with torch.no_grad():
        lin.weight.copy_(weight), lin.bias.copy_(bias)
    rows = []
    lin.register_forward_hook(lambda m, a, out: rows.append(out.shape[0]))
    nll = token_nll_with_head(hidden, lin, gold, chunk_tokens=10)
    assert rows == [10, 10, 3]
    torch.testing.assert_close(nll, token_nll(hidden, weight, bias, gold, chunk_tokens=100))
    ids, lp, _ = topk_logprobs_with_head(hidden, lin, gold, 4, chunk_tokens=5)
    assert rows[3:] == [5, 5, 5, 5, 3] and not lp.requires_grad


def test_auto_method_resolution(monkeypatch):
    """"auto" stays on the exact torch methods everywhere; the untested-on-GPU Triton kernel is opt-in."""
    assert resolve_method("auto", torch.device("cpu")) == kh.CPU_DEFAULT_METHOD
    assert resolve_method("torch", torch.device("cuda")) == "torch"
    monkeypatch.setattr(kh, "_triton_importable", lambda: True)
    assert resolve_method("auto", torch.device("cuda")) == "block"
    assert resolve_method("auto", torch.device("cuda"), kh.NLL_METHODS) == "torch"
    assert resolve_method("triton", torch.device("cuda")) == "triton"
    monkeypatch.setattr(kh, "_triton_importable", lambda: False)
    with pytest.raises(ValueError, match="needs the triton package"):
        resolve_method("triton", torch.device("cuda"))
    with pytest.raises(ValueError, match="method must be one of"):
        resolve_method("block", torch.device("cpu"), kh.NLL_METHODS)


def test_explicit_triton_raises_when_the_kernel_fails(monkeypatch):
    import types

    broken = types.ModuleType("fuseflow.kernels.triton_head")

    def head_epilogue(*args, **kwargs):
        raise RuntimeError("no such GPU")

    broken.head_epilogue = head_epilogue
    monkeypatch.setitem(sys.modules, "fuseflow.kernels.triton_head", broken)
    with pytest.raises(RuntimeError, match="no such GPU"):
        kh._topk_epilogue(torch.randn(3, 200), None, 5, LogitTransform(), "triton", 32)


# ----------------------------------------------------------------------------------------------------------
# The Triton kernel, under Triton's CPU interpreter.
# ----------------------------------------------------------------------------------------------------------

TRITON_CHECK = textwrap.dedent(
    """
    import torch
    from fuseflow.kernels import triton_head
    from fuseflow.kernels.head import (LogitTransform, apply_logit_transform, block_extrema, token_nll,
                                       topk_logprobs)
    assert triton_head.interpreted()
    g = torch.Generator().manual_seed(0)
    transforms = [LogitTransform(), LogitTransform(softcap=4.0, temperature=0.7),
                  LogitTransform(logit_scale=-0.5), LogitTransform(logit_scale=2.0, logits_scaling=3.0)]
    for dtype in (torch.float32, torch.bfloat16):
        for v, block in ((1000, 64), (1024, 128), (40, 64)):
            wide = (torch.randn(9, v + 17, generator=g) * 4).to(dtype)
            x = wide[:, :v]  # rows not contiguous with each other: the kernel takes the row stride
            x[1, :] = float("-inf")
            x[2, : v // 2] = float("-inf")
            gold = torch.randint(0, v, (9,), generator=g)
            gold[3] = v  # out of range: NaN
            for t in transforms:
                lse, ext, graw = triton_head.head_epilogue(x, t, block=block, gold=gold, largest=t.increasing,
                                                           blocks_per_tile=4)
                ref = torch.logsumexp(apply_logit_transform(x.double(), t), -1).float()
                torch.testing.assert_close(lse, ref, rtol=1e-6, atol=1e-5)
                assert torch.equal(ext, block_extrema(x, block, largest=t.increasing).float()), (v, block)
                ok = gold < v
                assert torch.equal(graw[ok], x[ok].gather(1, gold[ok, None])[:, 0].float())
                assert torch.isnan(graw[~ok]).all()
                lse2, none, none2 = triton_head.head_epilogue(x, t, block=block, extrema=False, blocks_per_tile=4)
                assert none is None and none2 is None and torch.equal(lse2, lse)
        hidden = torch.randn(29, 16, generator=g).to(dtype)
        weight = torch.randn(700, 16, generator=g).to(dtype)
        target = torch.randint(0, 700, (29,), generator=g)
        for t in transforms:
            a = topk_logprobs(hidden, weight, None, target, 9, transform=t, chunk_tokens=8, method="triton",
                              block=32)
            b = topk_logprobs(hidden, weight, None, target, 9, transform=t, chunk_tokens=8, method="block",
                              block=32)
            assert torch.equal(a[0], b[0])  # same raw logits, same exact top-k
            torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-5)
            torch.testing.assert_close(a[2], b[2], rtol=0, atol=1e-5)
            n1 = token_nll(hidden, weight, None, target, transform=t, chunk_tokens=8, method="triton")
            n2 = token_nll(hidden, weight, None, target, transform=t, chunk_tokens=8, method="torch")
            torch.testing.assert_close(n1, n2, rtol=0, atol=1e-5)
    try:
        triton_head.head_epilogue(x, LogitTransform(), block=48)
    except ValueError as e:
        assert "power of two" in str(e)
    else:
        raise AssertionError("block=48 accepted")
    print("triton interpreter ok")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_under_interpreter_matches_torch():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "triton interpreter ok" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("name", ["identity", "softcap+temperature", "negative_scale"])
def test_triton_kernel_compiled_on_cuda_matches_torch(name):
    """The compiled kernel (the interpreter test above cannot catch a GPU-only compile or numerics issue)."""
    from fuseflow.kernels import triton_head

    t = TRANSFORMS[name]
    hidden, weight, bias, gold = problem(n=300, h=64, v=5000, dtype=torch.bfloat16, spread=8.0)
    hidden, weight, bias, gold = hidden.cuda(), weight.cuda(), bias.cuda(), gold.cuda()
    x = torch.nn.functional.linear(hidden, weight, bias)  # [N, V] bf16
    lse, ext, graw = triton_head.head_epilogue(x, t, block=128, gold=gold, largest=t.increasing)
    ref = torch.logsumexp(apply_logit_transform(x.double(), t), -1).float()
    torch.testing.assert_close(lse, ref, rtol=1e-6, atol=2e-5)
    assert torch.equal(ext, block_extrema(x, 128, largest=t.increasing).float())
    assert torch.equal(graw, x.gather(1, gold[:, None])[:, 0].float())
    a = topk_logprobs(hidden, weight, bias, gold, 10, transform=t, chunk_tokens=128, method="triton")
    b = topk_logprobs(hidden, weight, bias, gold, 10, transform=t, chunk_tokens=128, method="block")
    assert torch.equal(x.gather(1, a[0]), x.gather(1, b[0]))  # same values (bf16 ties may swap ids)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=2e-5)
    torch.testing.assert_close(a[2], b[2], rtol=0, atol=2e-5)
    assert resolve_method("auto", x.device) == "triton"
