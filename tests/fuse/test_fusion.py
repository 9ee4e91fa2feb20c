"""Fusion functions against slow dense references: every teacher row scattered into a dense probability
vector, CE and weights computed in plain Python loops, the fused top-k2 compared."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fuseflow.fuse.fusion import FUSIONS, get_fusion, merge_duplicate_ids

V = 12  # small on purpose: teachers share ids often, so the union has duplicates to merge


def make_batch(seed: int, n: int = 3, b: int = 2, t: int = 7, k: int = 4, v: int = V):
    """Random stacked AlignedDist-like inputs with -inf padding, one-hot fallbacks where not aligned, a
    teacher never aligned on one sequence, and masked positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(n, b, t, v, generator=g).argsort(-1)[..., :k]  # [N, B, T, k] distinct per row
    # A top-k of a larger vocabulary: log-probs that sum to less than 1 over the k entries.
    logprobs = (torch.randn(n, b, t, k, generator=g) * 1.5).log_softmax(-1) + torch.rand(n, b, t, 1, generator=g).log()
    logprobs, order = logprobs.sort(-1, descending=True)
    ids = ids.gather(-1, order)
    lengths = torch.randint(1, k + 1, (n, b, t, 1), generator=g)  # rows with fewer than k real entries
    pad = torch.arange(k) >= lengths  # [N, B, T, k]
    ids = ids.masked_fill(pad, 0)
    logprobs = logprobs.masked_fill(pad, -math.inf)
    aligned = torch.rand(n, b, t, generator=g) < 0.7
    aligned[n - 1, b - 1] = False  # this teacher cannot be scored on the last sequence
    gold_ids = torch.randint(0, v, (b, t), generator=g)
    fallback_ids = torch.zeros(n, b, t, k, dtype=torch.long)
    fallback_ids[..., 0] = gold_ids
    fallback_lps = torch.full((n, b, t, k), -math.inf)
    fallback_lps[..., 0] = 0.0
    ids = torch.where(aligned.unsqueeze(-1), ids, fallback_ids)
    logprobs = torch.where(aligned.unsqueeze(-1), logprobs, fallback_lps)
    gold = torch.where(aligned, -3 * torch.rand(n, b, t, generator=g), torch.zeros(()))
    mask = torch.rand(b, t, generator=g) < 0.8
    mask[:, 0] = True
    return ids, logprobs, gold, aligned, mask


# ----------------------------------------------------------------------------------------------------------
# Slow references.
# ----------------------------------------------------------------------------------------------------------


def dense_teacher_rows(ids, logprobs, v=V, renormalise=True):
    """[N, B, T, V] float64: each row renormalised over its finite entries (or as given), scattered one entry
    at a time."""
    n, b, t, k = ids.shape
    dense = torch.zeros(n, b, t, v, dtype=torch.float64)
    for i, j, p in itertools.product(range(n), range(b), range(t)):
        entries = [(int(ids[i, j, p, e]), float(logprobs[i, j, p, e])) for e in range(k)]
        finite = [(token, lp) for token, lp in entries if lp > -math.inf]
        z = sum(math.exp(lp) for _, lp in finite) if renormalise else 1.0
        for token, lp in finite:
            dense[i, j, p, token] += math.exp(lp) / z
    return dense


def reference_ce(gold, aligned, mask, per_token):
    """CE per (teacher, sequence) or (teacher, sequence, position); inf where unscored."""
    n, b, t = gold.shape
    if per_token:
        return [
            [
                [-float(gold[i, j, p]) if aligned[i, j, p] and mask[j, p] else math.inf for p in range(t)]
                for j in range(b)
            ]
            for i in range(n)
        ]
    out = []
    for i in range(n):
        row = []
        for j in range(b):
            vals = [-float(gold[i, j, p]) for p in range(t) if aligned[i, j, p] and mask[j, p]]
            row.append(sum(vals) / len(vals) if vals else math.inf)
        out.append(row)
    return out


def reference_weights(ces):
    """FuseLLM distill_weighted_as_gt: softmax over teachers of 1/exp(CE); unscored teachers excluded."""
    scored = [i for i, c in enumerate(ces) if math.isfinite(c)]
    if not scored:
        return [1.0 / len(ces)] * len(ces)
    z = sum(math.exp(math.exp(-ces[i])) for i in scored)
    return [math.exp(math.exp(-c)) / z if i in scored else 0.0 for i, c in enumerate(ces)]


def reference_fusion(name, ids, logprobs, gold, aligned, mask, renormalise=True, sample_ce=None):
    """Dense [B, T, V] fused distribution, in loops; ``sample_ce`` [N][B] replaces the CE over aligned positions."""
    n, b, t, _ = ids.shape
    rows = dense_teacher_rows(ids, logprobs, renormalise=renormalise)
    per_token = name.endswith("_token")
    ce = sample_ce if sample_ce is not None else reference_ce(gold, aligned, mask, per_token)
    fused = torch.zeros(b, t, V, dtype=torch.float64)
    for j, p in itertools.product(range(b), range(t)):
        ces = [ce[i][j][p] if per_token else ce[i][j] for i in range(n)]
        if name.startswith("min_ce"):
            best = min(range(n), key=lambda i: ces[i])  # first of equals, as argmin
            fused[j, p] = rows[best, j, p]
        else:
            w = reference_weights(ces)
            fused[j, p] = sum(w[i] * rows[i, j, p] for i in range(n))
    return fused


def top_k_dense(dense, k2):
    """Keep the k2 largest entries of every row of a dense [..., V] tensor, zero the rest."""
    vals, idx = dense.topk(k2, dim=-1)
    return torch.zeros_like(dense).scatter_(-1, idx, vals)


def to_dense(ids, logprobs, v=V):
    dense = torch.zeros(*ids.shape[:-1], v, dtype=torch.float64)
    return dense.scatter_add_(-1, ids.long(), logprobs.double().exp())


def check_sparse_convention(ids, logprobs):
    assert torch.all(logprobs[..., 1:] <= logprobs[..., :-1]), "rows must be sorted descending"
    assert torch.all(ids[torch.isinf(logprobs)] == 0), "-inf slots must hold id 0"
    assert not torch.isnan(logprobs).any()


# ----------------------------------------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------------------------------------


def test_registry_holds_the_four_fusions():
    assert set(FUSIONS) == {"min_ce", "avg_ce", "min_ce_token", "avg_ce_token"}
    for fn in FUSIONS.values():
        assert "FuseLLM" in fn.__doc__


def test_unknown_fusion_names_the_config_field():
    with pytest.raises(ValueError, match=r"^fusion\.function: unknown fusion function 'max_ce'; .*avg_ce"):
        get_fusion("max_ce")


@pytest.mark.parametrize("name", sorted(FUSIONS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fusion_matches_dense_reference(name, seed):
    ids, logprobs, gold, aligned, mask = make_batch(seed)
    fused_ids, fused_lps = get_fusion(name)(ids, logprobs, gold, aligned, mask)
    k = ids.shape[-1]
    assert fused_ids.shape == fused_lps.shape == (*ids.shape[1:3], k)
    check_sparse_convention(fused_ids, fused_lps)
    expected = top_k_dense(reference_fusion(name, ids, logprobs, gold, aligned, mask), k)
    torch.testing.assert_close(to_dense(fused_ids, fused_lps), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_fusion_without_renormalising_keeps_the_teachers_mass(name):
    """``renormalise=False`` (the tail KL's input): the same fusion of the rows as the teachers gave them; the
    fused rows then sum to less than 1 where the teachers' top-k did."""
    ids, logprobs, gold, aligned, mask = make_batch(4)
    fused_ids, fused_lps = get_fusion(name)(ids, logprobs, gold, aligned, mask, renormalise=False)
    check_sparse_convention(fused_ids, fused_lps)
    expected = top_k_dense(reference_fusion(name, ids, logprobs, gold, aligned, mask, renormalise=False), ids.shape[-1])
    torch.testing.assert_close(to_dense(fused_ids, fused_lps), expected, atol=1e-6, rtol=1e-5)
    mass = fused_lps.exp().sum(-1)  # [B, T]
    assert float(mass.max()) <= 1 + 1e-6 and float(mass.min()) < 0.9


@pytest.mark.parametrize("name", ["min_ce", "avg_ce"])
def test_a_given_sample_ce_ranks_the_teachers(name):
    """``ce`` [N, B, T] (fusion.criterion 'text'): teachers ranked by the caller's per-sample CE, not by the
    mean CE over their aligned positions; here the ranking it gives is the reverse of the aligned one."""
    ids, logprobs, gold, aligned, mask = make_batch(6)
    aligned_ce = reference_ce(gold, aligned, mask, per_token=False)  # [N][B]
    n, b, t = gold.shape
    given = [[-c if math.isfinite(c) else 0.0 for c in row] for row in aligned_ce]  # reversed order, all scored
    ce = torch.tensor(given).unsqueeze(-1).expand(n, b, t)
    fused_ids, fused_lps = get_fusion(name)(ids, logprobs, gold, aligned, mask, ce=ce)
    expected = top_k_dense(reference_fusion(name, ids, logprobs, gold, aligned, mask, sample_ce=given), ids.shape[-1])
    torch.testing.assert_close(to_dense(fused_ids, fused_lps), expected, atol=1e-6, rtol=1e-5)
    default = top_k_dense(reference_fusion(name, ids, logprobs, gold, aligned, mask), ids.shape[-1])
    assert not torch.allclose(expected, default)


@pytest.mark.parametrize("name", ["min_ce_token", "avg_ce_token"])
def test_token_fusions_refuse_a_sample_ce(name):
    ids, logprobs, gold, aligned, mask = make_batch(6)
    with pytest.raises(ValueError, match="criterion"):
        get_fusion(name)(ids, logprobs, gold, aligned, mask, ce=torch.zeros_like(gold))


@pytest.mark.parametrize("name", ["avg_ce", "avg_ce_token", "min_ce"])
@pytest.mark.parametrize("top_k", [2, 3 * 4 + 3])
def test_fusion_top_k(name, top_k):
    ids, logprobs, gold, aligned, mask = make_batch(5)
    fused_ids, fused_lps = get_fusion(name)(ids, logprobs, gold, aligned, mask, top_k=top_k)
    assert fused_ids.shape[-1] == top_k
    check_sparse_convention(fused_ids, fused_lps)
    expected = top_k_dense(reference_fusion(name, ids, logprobs, gold, aligned, mask), min(top_k, V))
    torch.testing.assert_close(to_dense(fused_ids, fused_lps), expected, atol=1e-6, rtol=1e-5)
    if top_k > 3 * 4:  # more slots than the union can fill: the tail is padding
        assert torch.isinf(fused_lps[..., -3:]).all()


def test_avg_ce_weights_pinned():
    """Two teachers with CE 1 and 2 on disjoint ids: weights softmax([e^-1, e^-2]) = [0.5579, 0.4421]
    (softmax(-CE) would give 0.7311)."""
    ids = torch.tensor([[[[1, 2]]], [[[3, 4]]]])  # [N=2, B=1, T=1, k=2]
    logprobs = torch.log(torch.tensor([[[[0.6, 0.4]]], [[[0.9, 0.1]]]]))
    gold = torch.tensor([[[-1.0]], [[-2.0]]])
    aligned = torch.ones(2, 1, 1, dtype=torch.bool)
    mask = torch.ones(1, 1, dtype=torch.bool)
    fused_ids, fused_lps = FUSIONS["avg_ce"](ids, logprobs, gold, aligned, mask, top_k=4)
    probs = dict(zip(fused_ids.flatten().tolist(), fused_lps.exp().flatten().tolist()))
    w0 = 0.5578755
    assert probs == pytest.approx({1: 0.6 * w0, 3: 0.9 * (1 - w0), 2: 0.4 * w0, 4: 0.1 * (1 - w0)}, abs=1e-6)
    sel_ids, sel_lps = FUSIONS["min_ce"](ids, logprobs, gold, aligned, mask)
    assert sel_ids.flatten().tolist() == [1, 2]
    assert sel_lps.exp().flatten().tolist() == pytest.approx([0.6, 0.4])


def test_min_ce_ignores_gold_where_not_aligned():
    """Teacher 0's gold is perfect (0) at a position it is not aligned on; only aligned positions score it."""
    ids = torch.tensor([[[[1], [1]]], [[[2], [2]]]])  # [N=2, B=1, T=2, k=1]
    logprobs = torch.zeros(2, 1, 2, 1)
    gold = torch.tensor([[[-3.0, 0.0]], [[-1.0, -1.0]]])
    aligned = torch.tensor([[[True, False]], [[True, True]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    fused_ids, _ = FUSIONS["min_ce"](ids, logprobs, gold, aligned, mask)
    assert fused_ids.flatten().tolist() == [2, 2]


def test_inputs_are_validated():
    ids, logprobs, gold, aligned, mask = make_batch(0)
    with pytest.raises(ValueError, match="mask"):
        FUSIONS["avg_ce"](ids, logprobs, gold, aligned, mask[:, :-1])
    with pytest.raises(ValueError, match="logprobs"):
        FUSIONS["min_ce"](ids, logprobs[..., :-1], gold, aligned, mask)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_merge_duplicate_ids_matches_dict_reference(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 5, (3, 4, 9), generator=g)  # many duplicates per row
    probs = torch.rand(3, 4, 9, generator=g) * (torch.rand(3, 4, 9, generator=g) > 0.2)  # some zeros
    out_ids, out_probs = merge_duplicate_ids(ids, probs)
    assert out_ids.shape == out_probs.shape == ids.shape
    assert torch.all(out_probs[..., 1:] <= out_probs[..., :-1])
    assert torch.all(out_ids[out_probs == 0] == 0)
    for row in itertools.product(range(3), range(4)):
        want: dict[int, float] = {}
        for token, p in zip(ids[row].tolist(), probs[row].tolist()):
            want[token] = want.get(token, 0.0) + p
        got = {token: p for token, p in zip(out_ids[row].tolist(), out_probs[row].tolist()) if p > 0}
        assert got == pytest.approx({token: p for token, p in want.items() if p > 0}, abs=1e-6)


@pytest.mark.parametrize("name", sorted(FUSIONS))
@pytest.mark.parametrize("seed", [0, 3])
def test_packed_rows_fuse_each_sample_as_its_own_row(name, seed):
    """Two samples laid end to end in one row with ``segments`` fuse exactly as the same samples in two rows."""
    ids, logprobs, gold, aligned, mask = make_batch(seed, b=2, t=7)
    want_ids, want_lps = get_fusion(name)(ids, logprobs, gold, aligned, mask, top_k=3)  # [2, 7, 3]
    packed = [x.reshape(x.shape[0], 1, 14, *x.shape[3:]) for x in (ids, logprobs, gold, aligned)]
    segments = torch.arange(2).repeat_interleave(7)[None]  # [1, 14]
    got_ids, got_lps = get_fusion(name)(*packed, mask.reshape(1, 14), top_k=3, segments=segments)
    torch.testing.assert_close(got_lps.reshape(2, 7, 3), want_lps)
    finite = torch.isfinite(want_lps)
    assert torch.equal(got_ids.reshape(2, 7, 3)[finite], want_ids[finite])


def test_segment_ce_matches_a_loop():
    from fuseflow.fuse.fusion import segment_ce

    _, _, gold, aligned, mask = make_batch(5, n=2, b=2, t=6)
    segments = torch.tensor([[0, 0, 1, 1, 1, 4], [2, 2, 2, 3, 3, 3]])
    got = segment_ce(gold, aligned, mask, segments)  # [N, B, T]
    for n, b, t in itertools.product(range(2), range(2), range(6)):
        s = int(segments[b, t])
        vals = [
            -float(gold[n, bb, tt])
            for bb, tt in itertools.product(range(2), range(6))
            if segments[bb, tt] == s and mask[bb, tt] and aligned[n, bb, tt]
        ]
        want = sum(vals) / len(vals) if vals else math.inf
        assert float(got[n, b, t]) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("name", ["min_ce", "avg_ce", "min_ce_token", "avg_ce_token"])
@pytest.mark.parametrize("seed", [0, 1])
def test_choice_weights_rebuild_the_fusion(name, seed):
    """The weights the trainer reports as each teacher's share (issue 21) are the ones the fusion applies:
    the weighted union of the renormalised teacher rows under them is the fused distribution."""
    from fuseflow.fuse.fusion import choice_weights

    ids, logprobs, gold, aligned, mask = make_batch(seed)
    weights = choice_weights(name, gold, aligned, mask)  # [N, B, T]
    assert weights.shape == gold.shape
    torch.testing.assert_close(weights.sum(0), torch.ones_like(weights[0]))
    if name.startswith("min_ce"):
        assert set(weights.unique().tolist()) <= {0.0, 1.0}
    if name in ("min_ce", "avg_ce"):  # per sequence: the same weights at every position of a row
        assert torch.equal(weights, weights[:, :, :1].expand_as(weights))
    fused_ids, fused_lp = get_fusion(name)(ids, logprobs, gold, aligned, mask, top_k=V)
    dense = (dense_teacher_rows(ids, logprobs) * weights.double().unsqueeze(-1)).sum(0)  # [B, T, V]
    got = torch.zeros_like(dense).scatter_add_(-1, fused_ids, fused_lp.double().exp().masked_fill(~torch.isfinite(fused_lp), 0))
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-6)


def test_choice_weights_of_an_unknown_rule_are_none():
    from fuseflow.fuse.fusion import choice_weights

    _, _, gold, aligned, mask = make_batch(0)
    assert choice_weights("someone_elses_fusion", gold, aligned, mask) is None



def test_teacher_stats_choices_per_sample_are_the_same_packed_and_padded():
    ids, logprobs, gold, aligned, mask = make_batch(3, n=3, b=2, t=7)
    labels = torch.randint(0, 12, mask.shape, generator=torch.Generator().manual_seed(0))
    from fuseflow.fuse.stats import teacher_stats

    padded = teacher_stats(ids, logprobs, gold, aligned, labels, mask, "min_ce")
    # The two rows end to end in one row; the segments say which sample each position belongs to.
    p_ids = torch.cat([ids[:, 0], ids[:, 1]], dim=1).unsqueeze(1)  # [N, 1, 2T, k]
    p_lp = torch.cat([logprobs[:, 0], logprobs[:, 1]], dim=1).unsqueeze(1)
    p_gold = torch.cat([gold[:, 0], gold[:, 1]], dim=1).unsqueeze(1)  # [N, 1, 2T]
    p_al = torch.cat([aligned[:, 0], aligned[:, 1]], dim=1).unsqueeze(1)
    p_labels = torch.cat([labels[0], labels[1]]).unsqueeze(0)  # [1, 2T]
    p_mask = torch.cat([mask[0], mask[1]]).unsqueeze(0)
    segments = torch.cat([torch.zeros(7, dtype=torch.long), torch.ones(7, dtype=torch.long)]).unsqueeze(0)
    packed = teacher_stats(p_ids, p_lp, p_gold, p_al, p_labels, p_mask, "min_ce", segments=segments, num_samples=2)
    torch.testing.assert_close(packed.choice, padded.choice)
    torch.testing.assert_close(packed.fidelity, padded.fidelity)
    assert set(padded.choice.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(padded.choice.sum(0), torch.ones(2))
    # The teacher never aligned on the last sequence (make_batch) is never MinCE's choice there.
    assert padded.choice[2, 1] == 0
