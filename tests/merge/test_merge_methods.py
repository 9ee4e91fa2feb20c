"""Merge methods against slow, element-by-element float64 references and hand-computed examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fuseflow.merge import methods
from fuseflow.merge.methods import MERGE_METHODS, dare_masks, get_method, merge_method, top_k_mask, varm_weights

# ----------------------------------------------------------------------------------------------------------
# Slow references: plain Python loops over entries, float64, straight from the papers' formulas.
# ----------------------------------------------------------------------------------------------------------


def _np(tensors, base):
    thetas = [t.double().numpy().ravel() for t in tensors]
    b = base.double().numpy().ravel()
    return thetas, b, [t - b for t in thetas]


def _sign(x):
    return int(x > 0) - int(x < 0)


def ref_linear(tensors, base, weights=None, normalize=True):
    thetas, _, _ = _np(tensors, tensors[0] if base is None else base)
    w = weights or [1.0] * len(thetas)
    out = sum(wj * t for wj, t in zip(w, thetas))
    return out / sum(w) if normalize else out


def ref_task_arithmetic(tensors, base, weights=None, normalize=False, scaling=1.0):
    _, b, deltas = _np(tensors, base)
    w = weights or [1.0] * len(deltas)
    acc = sum(wj * d for wj, d in zip(w, deltas))
    if normalize:
        acc = acc / sum(w)
    return b + scaling * acc


def ref_trim(delta, density):
    if density >= 1:
        return delta.copy()
    k = 0 if density <= 0 else max(1, int(density * delta.size))
    order = sorted(range(delta.size), key=lambda i: -abs(delta[i]))
    out = np.zeros_like(delta)
    for i in order[:k]:
        out[i] = delta[i]
    return out


def ref_disjoint(deltas, w, b, normalize, scaling, weighted_election=True):
    out = np.empty_like(b)
    for i in range(b.size):
        votes = w if weighted_election else [1.0] * len(w)
        elected = 1 if sum(vj * d[i] for vj, d in zip(votes, deltas)) >= 0 else -1
        num = den = 0.0
        for wj, d in zip(w, deltas):
            if _sign(wj * d[i]) == elected:
                num += wj * d[i]
                den += wj
        out[i] = b[i] + scaling * (num / (den if den != 0 else 1.0) if normalize else num)
    return out


def ref_l1(delta, kept):
    """mergekit's rescale: back to the L1 norm of the untrimmed update."""
    full, part = np.abs(delta).sum(), np.abs(kept).sum()
    return kept * (full / part) if full >= 1e-7 and part >= 1e-7 else kept


def ref_ties(tensors, base, density=0.2, weights=None, normalize=True, rescale="none", scaling=1.0):
    _, b, deltas = _np(tensors, base)
    w = weights or [1.0] * len(deltas)
    dens = density if isinstance(density, list) else [density] * len(deltas)
    trimmed = [ref_trim(d, dj) for d, dj in zip(deltas, dens)]
    if rescale == "l1":
        trimmed = [ref_l1(d, k) if dj < 1 else k for d, k, dj in zip(deltas, trimmed, dens)]
    return ref_disjoint(trimmed, w, b, normalize, scaling)


def ref_varm(tensors, base):
    thetas, _, deltas = _np(tensors, base)
    sq = [sum(x * x for x in d) / d.size for d in deltas]
    w = [s / sum(sq) for s in sq] if sum(sq) > 0 else [1 / len(sq)] * len(sq)
    return sum(wj * t for wj, t in zip(w, thetas))


def ref_sce(tensors, base, select_topk=1.0):
    _, b, deltas = _np(tensors, base)
    n = len(deltas)
    if select_topk < 1:
        var = []
        for i in range(b.size):
            mean = sum(d[i] for d in deltas) / n
            var.append(sum((d[i] - mean) ** 2 for d in deltas) / n)
        nonzero = [i for i in range(b.size) if var[i] != 0]
        k = int(select_topk * len(nonzero))
        keep = set(sorted(nonzero, key=lambda i: -var[i])[:k])
        deltas = [np.array([d[i] if i in keep else 0.0 for i in range(b.size)]) for d in deltas]
    sq = [sum(x * x for x in d) / d.size for d in deltas]
    w = [s / sum(sq) for s in sq] if sum(sq) > 0 else [1 / n] * n
    # Erase elects sign(Σ_j Δ_j): the weights do not vote.
    return ref_disjoint(deltas, w, b, normalize=True, scaling=1.0, weighted_election=False)


def ref_dare(tensors, base, density=0.5, weights=None, normalize=False, consensus=False, rescale="probability",
             scaling=1.0, seed=0):
    """The random keep masks are dare_masks' (tested on their own below); the rest is the formula."""
    _, b, deltas = _np(tensors, base)
    w = weights or [1.0] * len(deltas)
    dens = density if isinstance(density, list) else [density] * len(deltas)
    if min(dens) < 1:
        masks = dare_masks(base.shape, len(deltas), dens, seed).view(len(deltas), -1).numpy()
        kept = [np.where(m, d, 0.0) if dj < 1 else d for m, d, dj in zip(masks, deltas, dens)]
        if rescale == "probability":
            kept = [k / dj for k, dj in zip(kept, dens)]
        elif rescale == "l1":
            kept = [ref_l1(d, k) if dj < 1 else k for d, k, dj in zip(deltas, kept, dens)]
        deltas = kept
    if consensus:
        return ref_disjoint(deltas, w, b, normalize, scaling)
    acc = sum(wj * d for wj, d in zip(w, deltas))
    return b + scaling * (acc / sum(w) if normalize else acc)


def ref_slerp(tensors, base, t):
    v0, v1 = base.double().numpy().ravel(), tensors[0].double().numpy().ravel()
    n0, n1 = np.sqrt(sum(x * x for x in v0)), np.sqrt(sum(x * x for x in v1))
    u0, u1 = (v0 / n0 if n0 > 1e-8 else v0), (v1 / n1 if n1 > 1e-8 else v1)
    dot = sum(a * b for a, b in zip(u0, u1))
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    omega = np.arccos(dot)
    return np.sin((1 - t) * omega) / np.sin(omega) * v0 + np.sin(t * omega) / np.sin(omega) * v1


def _slerp_vec(t, v0, v1):
    u0, u1 = v0 / max(np.linalg.norm(v0), 1e-7), v1 / max(np.linalg.norm(v1), 1e-7)
    cos = min(max(float(u0 @ u1), -1.0), 1.0)
    if 1 - cos * cos <= 1e-16:
        return (1 - t) * v0 + t * v1
    omega = np.arccos(cos)
    return (np.sin((1 - t) * omega) * v0 + np.sin(t * omega) * v1) / np.sin(omega)


def ref_nuslerp(tensors, base, weights=None, row_wise=False, flatten=True):
    w = weights or [1.0, 1.0]
    t = w[1] / sum(w)
    b = np.zeros(tuple(tensors[0].shape)) if base is None else base.double().numpy()
    x0, x1 = tensors[0].double().numpy() - b, tensors[1].double().numpy() - b
    if flatten or x0.ndim < 2:
        out = _slerp_vec(t, x0.ravel(), x1.ravel()).reshape(x0.shape)
    elif row_wise:  # each column is a vector
        out = np.stack([_slerp_vec(t, x0[:, c], x1[:, c]) for c in range(x0.shape[1])], axis=1)
    else:
        out = np.stack([_slerp_vec(t, x0[r], x1[r]) for r in range(x0.shape[0])])
    return (out + b).ravel()


def ref_multislerp(tensors, base, weights=None, normalize_weights=True, eps=1e-8):
    """The blog's steps, on the stacked vectors: tangent space at the weighted mean direction."""
    b = 0.0 if base is None else base.double().numpy().ravel()
    xs = [t.double().numpy().ravel() - b for t in tensors]
    w = np.array(weights or [1.0] * len(xs))
    if normalize_weights:
        w = w / w.sum()
    norms = [np.linalg.norm(x) for x in xs]
    units = [x / (n + eps) for x, n in zip(xs, norms)]
    mean = sum(wj * u for wj, u in zip(w, units))
    mean = mean / np.linalg.norm(mean)
    tangent = sum(wj * (u - (u @ mean) * mean) for wj, u in zip(w, units))
    tn = np.linalg.norm(tangent) + eps
    out = (mean * np.cos(tn) + tangent * np.sin(tn) / tn) * sum(wj * n for wj, n in zip(w, norms))
    return out + b


def ref_model_stock(tensors, base, filter_wise=False):
    b = base.double().numpy()
    ds = [t.double().numpy() - b for t in tensors]
    n = len(ds)

    def t_of(vs):
        cos = []
        for i in range(n):
            for j in range(i + 1, n):
                c = float(vs[i] @ vs[j]) / max(np.linalg.norm(vs[i]) * np.linalg.norm(vs[j]), 1e-6)
                cos.append(min(max(c, -1.0), 1.0))
        c = sum(cos) / len(cos)
        return n * c / (1 + (n - 1) * c)

    if filter_wise and b.ndim >= 2:
        out = np.stack([b[r] + t_of([d[r] for d in ds]) * sum(d[r] for d in ds) / n for r in range(b.shape[0])])
    else:
        t = t_of([d.ravel() for d in ds])
        out = b + t * sum(ds) / n
    return out.ravel()


def ref_breadcrumbs(tensors, base, density=0.9, gamma=0.01, weights=None, normalize=False, consensus=False,
                    rescale="none", scaling=1.0):
    _, b, deltas = _np(tensors, base)
    n = len(deltas)
    w = weights or [1.0] * n
    dens = density if isinstance(density, list) else [density] * n
    gams = gamma if isinstance(gamma, list) else [gamma] * n
    kept = []
    for d, dj, gj in zip(deltas, dens, gams):
        if dj >= 1:
            kept.append(d)
            continue
        size = d.size
        target, n_top = int(dj * size), int(gj * size)
        n_bot = max(0, size - target - n_top)
        order = sorted(range(size), key=lambda i: abs(d[i]))  # ascending, stable
        out = np.zeros_like(d)
        for i in order[n_bot:n_bot + target]:
            out[i] = d[i]
        if rescale == "l1" and np.abs(out).sum() >= 1e-7:
            out = out * (np.abs(d).sum() / np.abs(out).sum())
        kept.append(out)
    if consensus:
        return ref_disjoint(kept, w, b, normalize, scaling)
    acc = sum(wj * d for wj, d in zip(w, kept))
    return b + scaling * (acc / sum(w) if normalize else acc)


def ref_passthrough(tensors, base, scale=None):
    x = tensors[0].double().numpy().ravel()
    return x * scale if scale is not None else x


REFERENCES = {
    "slerp": ref_slerp,
    "nuslerp": ref_nuslerp,
    "multislerp": ref_multislerp,
    "model_stock": ref_model_stock,
    "breadcrumbs": ref_breadcrumbs,
    "passthrough": ref_passthrough,
    "linear": ref_linear,
    "task_arithmetic": ref_task_arithmetic,
    "ties": ref_ties,
    "dare": ref_dare,
    "varm": ref_varm,
    "sce": ref_sce,
}


def _models(seed: int, n: int, shape=(6, 5), scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    tensors = [base + scale * (j + 1) * torch.randn(shape, generator=g) for j in range(n)]
    return tensors, base


CASES = [
    ("linear", {}),
    ("linear", {"weights": [0.2, 0.5, 0.3], "normalize": False}),
    ("task_arithmetic", {}),
    ("task_arithmetic", {"weights": [1.0, 2.0, 0.5], "normalize": True, "scaling": 0.7}),
    ("ties", {}),
    ("ties", {"density": 0.5, "weights": [1.0, 0.3, 2.0], "scaling": 0.9}),
    ("ties", {"density": 1.0, "normalize": False}),
    ("dare", {"density": 0.3, "seed": 7}),
    ("dare", {"density": 0.6, "consensus": True, "normalize": True, "weights": [0.5, 1.0, 1.5], "seed": 3}),
    ("dare", {"density": [0.4, 1.0, 0.7], "rescale": "l1", "seed": 5}),
    ("dare", {"density": 0.5, "consensus": True, "rescale": "none", "seed": 9}),
    ("varm", {}),
    ("sce", {}),
    ("sce", {"select_topk": 0.1}),
    ("sce", {"select_topk": 0.5}),
    ("slerp", {"t": 0.3}),
    ("slerp", {"t": 1.0}),
    ("nuslerp", {"weights": [1.0, 2.0]}),
    ("nuslerp", {"weights": [1.0, 3.0], "flatten": False}),
    ("nuslerp", {"weights": [2.0, 1.0], "flatten": False, "row_wise": True}),
    ("multislerp", {"weights": [1.0, 2.0, 3.0]}),
    ("multislerp", {"weights": [0.2, 0.5, 0.3], "normalize_weights": False}),
    ("model_stock", {}),
    ("model_stock", {"filter_wise": True}),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.1}),
    ("breadcrumbs", {"density": [0.5, 0.8, 0.3], "gamma": 0.2, "consensus": True, "normalize": True,
                     "weights": [1.0, 0.5, 2.0], "rescale": "l1", "scaling": 0.8}),
    ("breadcrumbs", {"density": 0.9, "gamma": 0.3}),  # n_top shrinks to keep the target
    ("ties", {"density": [0.3, 1.0, 0.6], "rescale": "l1"}),
    ("passthrough", {"scale": 0.5}),
]

# How many models each method takes (besides the base); the rest take any number.
ARITY = {"slerp": 1, "nuslerp": 2, "passthrough": 1}


def _case_models(name, seed, shape=(6, 5)):
    tensors, base = _models(seed=seed, n=ARITY.get(name, 3), shape=shape)
    return tensors, base


@pytest.mark.parametrize("name,params", CASES)
def test_method_matches_reference(name, params):
    tensors, base = _case_models(name, seed=11)
    got = MERGE_METHODS[name].fn(tensors, base, **params)
    want = REFERENCES[name](tensors, base, **params)
    assert got.dtype == torch.float32 and got.shape == base.shape
    np.testing.assert_allclose(got.double().numpy().ravel(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,params", CASES)
def test_chunked_evaluation_matches_the_reference(name, params, monkeypatch):
    # 7-entry chunks: every chunk boundary falls inside a row of the [6, 5] tensors, the last chunk is short.
    monkeypatch.setattr(methods, "CHUNK", 7)
    tensors, base = _case_models(name, seed=12)
    got = MERGE_METHODS[name].fn(tensors, base, **params)
    want = REFERENCES[name](tensors, base, **params)
    np.testing.assert_allclose(got.double().numpy().ravel(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,params", CASES)
def test_method_does_not_modify_inputs(name, params):
    tensors, base = _case_models(name, seed=5)
    before = [t.clone() for t in tensors], base.clone()
    MERGE_METHODS[name].fn(tensors, base, **params)
    assert all(torch.equal(a, b) for a, b in zip(tensors, before[0])) and torch.equal(base, before[1])


def test_bf16_inputs_are_merged_in_float32():
    tensors, base = _models(seed=2, n=2)
    got = MERGE_METHODS["sce"].fn([t.bfloat16() for t in tensors], base.bfloat16(), select_topk=0.5)
    want = ref_sce([t.bfloat16() for t in tensors], base.bfloat16(), select_topk=0.5)
    np.testing.assert_allclose(got.double().numpy().ravel(), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Hand-computed examples.
# ----------------------------------------------------------------------------------------------------------


def test_varm_hand_computed():
    # mean Δ²: [1,1] → 1, [2,0] → 2; W = [1/3, 2/3]; Σ W θ = [1/3 + 4/3, 1/3].
    base = torch.zeros(2)
    got = get_method("varm").fn([torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0])], base)
    torch.testing.assert_close(got, torch.tensor([5 / 3, 1 / 3]))


def test_sce_hand_computed():
    base = torch.zeros(4)
    d1, d2 = torch.tensor([1.0, -1.0, 2.0, 0.0]), torch.tensor([3.0, 1.0, -2.0, 0.0])
    # τ = 1: w ∝ mean Δ² = [6/4, 14/4] → [0.3, 0.7]; elected signs of Σ = [4, 0, 0, 0] are all +.
    # entry 0: both agree → 0.3·1 + 0.7·3 = 2.4; entry 1: only Δ2 (+1) → 1; entry 2: only Δ1 (+2) → 2;
    # entry 3: nothing agrees → base.
    torch.testing.assert_close(get_method("sce").fn([d1, d2], base), torch.tensor([2.4, 1.0, 2.0, 0.0]))
    # τ = 0.5: variances [1, 1, 4, 0], 3 non-zero → k = 1 → only entry 2; weights equal; Σ = 0 elects +.
    got = get_method("sce").fn([d1, d2], base, select_topk=0.5)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 2.0, 0.0]))


def test_ties_hand_computed():
    base = torch.zeros(4)
    d1, d2 = torch.tensor([4.0, -1.0, 0.5, -3.0]), torch.tensor([-1.0, 2.0, 1.0, -2.0])
    # density 0.5 keeps 2 per model: Δ̂1 = [4, 0, 0, -3], Δ̂2 = [0, 2, 0, -2]; Σ = [4, 2, 0, -5] → + + + −;
    # disjoint means: [4, 2, 0 (no agreement), (−3 − 2)/2].
    got = get_method("ties").fn([d1, d2], base, density=0.5)
    torch.testing.assert_close(got, torch.tensor([4.0, 2.0, 0.0, -2.5]))


def test_varm_weights_follow_the_size_of_the_updates():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, 40, generator=g)
    u = torch.randn(50, 40, generator=g)
    small, large = base + 0.01 * u, base + 0.03 * torch.randn(50, 40, generator=g)
    w = varm_weights([small, large], base)
    assert w[1] > 5 * w[0] and float(w.sum()) == pytest.approx(1.0)
    # Updates of equal size in different directions weigh the same.
    w_eq = varm_weights([base + 0.02 * u, base - 0.02 * u], base)
    torch.testing.assert_close(w_eq, torch.tensor([0.5, 0.5], dtype=torch.float64))
    # A model that left the matrix unchanged gets no weight; none changed it → uniform.
    torch.testing.assert_close(varm_weights([base, large], base), torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(varm_weights([base, base, base], base), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_sce_mask_applies_to_the_deltas_not_only_the_weights():
    # FuseChat's copy would merge the unselected entries too; mergekit's (and ours) keeps the base there.
    base = torch.zeros(10)
    d1 = torch.tensor([5.0, 3.0] + [1.0] * 8)
    d2 = torch.tensor([-5.0, 1.0] + [1.0] * 8)
    got = get_method("sce").fn([d1, d2], base, select_topk=0.5)
    # Variances [25, 1, 0, …]: 2 non-zero → k = 1 → entry 0 only; its Σ = 0 elects + → 5; the rest,
    # where both models agree on +1, stay at the base's 0.
    torch.testing.assert_close(got, torch.tensor([5.0] + [0.0] * 9))


# ----------------------------------------------------------------------------------------------------------
# Top-k selection (radix select), against sorting.
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 3000), frac=st.floats(0.0, 1.2), levels=st.sampled_from([0, 3, 50]))
def test_top_k_mask_keeps_exactly_the_k_largest(seed, n, frac, levels):
    g = torch.Generator().manual_seed(seed)
    # levels > 0: few distinct values, so many ties at the threshold; 0: continuous values
    x = torch.randint(0, levels, (n,), generator=g).float() / 7 if levels else torch.rand(n, generator=g).square()
    k = int(frac * n)
    mask = top_k_mask(x.view(3, -1) if n % 3 == 0 else x, k).reshape(-1)
    assert int(mask.sum()) == min(k, n)
    if 0 < k < n:
        kept, dropped = x[mask], x[~mask]
        assert kept.min() >= dropped.max()
        ties = (x == kept.min()).nonzero().squeeze(1)
        # among entries equal to the threshold, the first ones (by position) are kept
        assert torch.equal(mask[ties], torch.sort(mask[ties].int(), descending=True, stable=True).values.bool())
        if not levels:
            ref = torch.zeros(n, dtype=torch.bool)
            ref[x.topk(k).indices] = True
            assert torch.equal(mask, ref)


def test_top_k_mask_keeps_the_earliest_ties_across_steps():
    # 9M tied entries span three of top_k_mask's 4M-entry steps (bf16 updates tie like this by the million).
    score = torch.ones(9_000_000)
    score[-1] = 2.0
    mask = top_k_mask(score, 5_000_000)
    assert int(mask.sum()) == 5_000_000
    assert mask[:4_999_999].all() and not mask[4_999_999:-1].any() and mask[-1]


def test_top_k_mask_handles_values_across_many_exponents():
    # Bit patterns of values from 1e-30 to 1e30 span every high-16-bit bin region, including subnormals.
    x = torch.tensor([1e-30, 0.0, 3e-41, 1.0, 1e30, 2.5, 1e-3, 7.0])
    for k in range(len(x) + 1):
        ref = torch.zeros(len(x), dtype=torch.bool)
        ref[x.topk(k).indices] = True
        assert torch.equal(top_k_mask(x, k), ref), k


# ----------------------------------------------------------------------------------------------------------
# DARE: seeded, unbiased.
# ----------------------------------------------------------------------------------------------------------


def test_dare_masks_are_seeded_independent_per_model_and_chunk_size_free_of_gaps(monkeypatch):
    a = dare_masks((300, 100), 3, 0.3, seed=4)
    assert torch.equal(a, dare_masks((300, 100), 3, 0.3, seed=4))
    assert not torch.equal(a, dare_masks((300, 100), 3, 0.3, seed=5))
    assert not torch.equal(a[0], a[1])
    assert abs(a.float().mean().item() - 0.3) < 0.01
    monkeypatch.setattr(methods, "CHUNK", 1000)  # 30 chunks per model: every chunk is drawn, fresh
    b = dare_masks((300, 100), 2, 0.5, seed=1).view(2, -1).float()
    chunk_means = b.view(2, 30, 1000).mean(-1)
    assert chunk_means.min() > 0.4 and chunk_means.max() < 0.6
    assert not torch.equal(b[0, :1000], b[0, 1000:2000])


def test_dare_is_reproducible_per_seed_and_drops_the_right_fraction():
    tensors, base = _models(seed=1, n=2, shape=(100, 100))
    a = get_method("dare").fn(tensors, base, density=0.3, seed=4)
    assert torch.equal(a, get_method("dare").fn(tensors, base, density=0.3, seed=4))
    assert not torch.equal(a, get_method("dare").fn(tensors, base, density=0.3, seed=5))
    kept = get_method("dare").fn(tensors[:1], base, density=0.3, seed=4) != base
    assert abs(kept.float().mean().item() - 0.3) < 0.02


def test_dare_rescaling_is_unbiased():
    tensors, base = _models(seed=3, n=2, shape=(8,))
    runs = torch.stack([get_method("dare").fn(tensors, base, density=0.5, seed=s) for s in range(2000)])
    expected = get_method("task_arithmetic").fn(tensors, base)
    # Each entry's mean over seeds converges to task arithmetic's (std of the mean ≈ |Δ|/√2000).
    torch.testing.assert_close(runs.mean(0), expected, atol=0.05, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# DELLA: random keep masks by magnitude rank, rescaled by the keep probability.
# ----------------------------------------------------------------------------------------------------------


def _della_probability(delta: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """Keep probability of each entry of a [R, C] update: linear in its rank by |Δ| within its row."""
    rows, cols = delta.shape
    p = np.empty_like(delta)
    for r in range(rows):
        order = sorted(range(cols), key=lambda c: abs(delta[r, c]))
        for rank, c in enumerate(order):
            p[r, c] = density - epsilon + 2 * epsilon * rank / (cols - 1)
    return p


def test_della_rescales_each_kept_entry_by_its_keep_probability():
    tensors, base = _models(seed=4, n=1, shape=(120, 40))
    got = get_method("della").fn(tensors, base, density=0.5, epsilon=0.2, consensus=False, normalize=False, seed=3)
    delta = (tensors[0] - base).double().numpy()
    ratio = (got - base).double().numpy() / delta  # 1/p where kept, 0 where dropped
    p = _della_probability(delta, 0.5, 0.2)
    kept = ratio != 0
    np.testing.assert_allclose(ratio[kept], 1 / p[kept], rtol=1e-4)
    assert abs(kept.mean() - 0.5) < 0.03
    # Larger updates are kept more often: the top tenth of ranks at ~0.68, the bottom tenth at ~0.32.
    top, bottom = kept[p > 0.66].mean(), kept[p < 0.34].mean()
    assert top > 0.6 and bottom < 0.4


def test_della_l1_rescale_and_its_seed():
    tensors, base = _models(seed=6, n=1, shape=(50, 30))
    kw = dict(density=0.4, epsilon=0.1, consensus=False, normalize=False, rescale="l1")
    got = get_method("della").fn(tensors, base, seed=1, **kw)
    assert torch.equal(got, get_method("della").fn(tensors, base, seed=1, **kw))
    assert not torch.equal(got, get_method("della").fn(tensors, base, seed=2, **kw))
    delta, merged = (tensors[0] - base).double(), (got - base).double()
    kept = merged != 0
    factor = delta.abs().sum() / (delta.abs() * kept).sum()
    torch.testing.assert_close(merged[kept], delta[kept] * factor, rtol=1e-5, atol=1e-7)


def test_della_is_unbiased_and_without_dropping_equals_ties_and_task_arithmetic():
    tensors, base = _models(seed=3, n=2, shape=(8,))
    runs = torch.stack([
        get_method("della").fn(tensors, base, density=0.5, epsilon=0.2, consensus=False, normalize=False, seed=s)
        for s in range(2000)
    ])
    torch.testing.assert_close(runs.mean(0), get_method("task_arithmetic").fn(tensors, base), atol=0.05, rtol=0)
    tensors, base = _models(seed=8, n=3)
    torch.testing.assert_close(get_method("della").fn(tensors, base, density=1.0),
                               get_method("ties").fn(tensors, base, density=1.0))
    torch.testing.assert_close(get_method("della").fn(tensors, base, density=1.0, consensus=False, normalize=False),
                               get_method("task_arithmetic").fn(tensors, base))


def test_della_rejects_an_epsilon_outside_the_density():
    tensors, base = _models(seed=1, n=2)
    with pytest.raises(ValueError, match="parameters.epsilon"):
        get_method("della").fn(tensors, base, density=0.1, epsilon=0.15)


def test_sce_uniform_below_reproduces_mergekits_equal_weight_fallback():
    base = torch.zeros(4)
    d1, d2 = torch.tensor([1.0, -1.0, 2.0, 0.0]) * 1e-4, torch.tensor([3.0, 1.0, -2.0, 0.0]) * 1e-4
    paper = get_method("sce").fn([d1, d2], base)  # weights ∝ mean Δ² = [0.3, 0.7]
    torch.testing.assert_close(paper, torch.tensor([2.4, 1.0, 2.0, 0.0]) * 1e-4)
    # Σ mean Δ² = 5e-8 < 1e-6: equal weights, entry 0 becomes (1 + 3)/2.
    equal = get_method("sce").fn([d1, d2], base, uniform_below=1e-6)
    torch.testing.assert_close(equal, torch.tensor([2.0, 1.0, 2.0, 0.0]) * 1e-4)


def test_multislerp_of_unchanged_tensors_returns_the_base():
    # Frozen tensors (every task vector 0) have no direction to interpolate; mergekit raises there for N > 2.
    base = torch.randn(4, 3)
    torch.testing.assert_close(get_method("multislerp").fn([base] * 3, base), base)


# ----------------------------------------------------------------------------------------------------------
# Properties.
# ----------------------------------------------------------------------------------------------------------

params_for = {
    "linear": st.fixed_dictionaries({"normalize": st.just(True)}),
    "task_arithmetic": st.fixed_dictionaries({"scaling": st.floats(0.1, 2.0)}),
    "ties": st.fixed_dictionaries({"density": st.floats(0.0, 1.0), "normalize": st.booleans()}),
    "dare": st.fixed_dictionaries(
        {"density": st.floats(0.05, 1.0), "consensus": st.booleans(), "seed": st.integers(0, 2**31)}
    ),
    "varm": st.just({}),
    "sce": st.fixed_dictionaries({"select_topk": st.floats(0.01, 1.0)}),
    "breadcrumbs": st.fixed_dictionaries(
        {"density": st.floats(0.05, 1.0), "gamma": st.floats(0.0, 0.5), "consensus": st.booleans()}
    ),
    "della": st.fixed_dictionaries(
        {"density": st.floats(0.3, 0.7), "epsilon": st.floats(0.0, 0.25), "consensus": st.booleans(),
         "seed": st.integers(0, 2**31)}
    ),
    "slerp": st.fixed_dictionaries({"t": st.floats(0.0, 1.0)}),
    "nuslerp": st.fixed_dictionaries({"weights": st.lists(st.floats(0.1, 2.0), min_size=2, max_size=2)}),
    "multislerp": st.fixed_dictionaries({"weights": st.just(None)}),
    "model_stock": st.fixed_dictionaries({"filter_wise": st.booleans()}),
    "passthrough": st.just({}),
}


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(params_for)),
    data=st.data(),
    n=st.integers(1, 4),
    seed=st.integers(0, 2**31),
    shape=st.sampled_from([(7,), (3, 4), (2, 3, 2)]),
)
def test_merging_copies_of_the_base_returns_it(name, data, n, seed, shape):
    theta = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    params = data.draw(params_for[name])
    n = ARITY.get(name, n)
    if name == "model_stock":
        n = max(n, 2)
    got = MERGE_METHODS[name].fn([theta.clone() for _ in range(n)], theta, **params)
    torch.testing.assert_close(got, theta, rtol=1e-6, atol=1e-6)


# Without sparsification every method returns θ for N copies of θ whatever the base.
DENSE = {
    "linear": {},
    "task_arithmetic": {"normalize": True},
    "ties": {"density": 1.0},
    "dare": {"density": 1.0, "normalize": True},
    "varm": {},
    "sce": {"select_topk": 1.0},
    "breadcrumbs": {"density": 1.0, "normalize": True},
    "della": {"density": 1.0},
    "nuslerp": {},
    "multislerp": {},
    "model_stock": {},
    "passthrough": {},
}


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(DENSE)), n=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_merging_copies_of_a_model_returns_it(name, n, seed):
    n = ARITY.get(name, max(n, 2) if name == "model_stock" else n)
    g = torch.Generator().manual_seed(seed)
    base, theta = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    got = MERGE_METHODS[name].fn([theta.clone() for _ in range(n)], base, **DENSE[name])
    torch.testing.assert_close(got, theta, rtol=1e-5, atol=1e-5)


def test_sce_with_selection_merges_identical_models_to_the_base():
    # Documented consequence of Select (as mergekit): zero variance everywhere selects nothing.
    g = torch.Generator().manual_seed(0)
    base, theta = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    torch.testing.assert_close(get_method("sce").fn([theta, theta], base, select_topk=0.5), base)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_sce_selection_ranks_torch_vars_values_and_never_selects_equal_updates(n):
    """Three or more bf16 copies with one-bf16-step updates: thousands of entries where every model made
    the same update. Their variance is exactly 0, as torch.var's (mergekit's ``sce_mask``), so selecting
    all non-zero ones (τ = 1) keeps exactly the entries torch.var calls non-zero. (A mean taken as
    Σ Δ_j·(1/N) left ~1e-20 on 27 of 33,663 such entries of a [2048, 576] tensor at N = 3, and mergekit
    then kept 3 fewer entries at τ = 0.1: bench/sce_ties.py.) The values themselves are torch.var's too, so
    the two tools order them alike."""
    g = torch.Generator().manual_seed(n)
    base = (0.02 * torch.randn(1024, 576, generator=g)).to(torch.bfloat16)
    copies = [(base.float() + 2e-4 * torch.randn(1024, 576, generator=g)).to(torch.bfloat16) for _ in range(n)]
    deltas = torch.stack([c.float() - base.float() for c in copies])  # [N, R, C]
    var = torch.var(deltas, dim=0, unbiased=False)  # [R, C]
    same = (deltas == deltas[0]).all(dim=0)
    assert int(same.sum()) > 1000
    mask = methods.sce_select_mask(copies, base, 1.0)
    assert not mask[same].any()
    assert torch.equal(mask, var != 0)
    # τ < 1: the top entries by torch.var's values; entries tied with the threshold are the tie-break's
    mask = methods.sce_select_mask(copies, base, 0.1)
    assert int(mask.sum()) == int(0.1 * int(torch.count_nonzero(var)))
    threshold = var[mask].min()
    assert mask[var > threshold].all() and not mask[var < threshold].any()


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(["linear", "task_arithmetic", "ties", "varm", "sce"]), seed=st.integers(0, 2**31))
def test_model_order_does_not_matter(name, seed):
    tensors, base = _models(seed=seed % 1000, n=3)
    params = {"select_topk": 0.3} if name == "sce" else {"density": 0.4} if name == "ties" else {}
    a = MERGE_METHODS[name].fn(tensors, base, **params)
    b = MERGE_METHODS[name].fn(tensors[::-1], base, **params)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------------------------------------


def test_registry_rejects_duplicates_and_names_known_methods():
    with pytest.raises(ValueError, match="registered twice"):
        merge_method("linear")(lambda tensors, base: base)
    with pytest.raises(ValueError, match="method: unknown merge method 'karcher'.*linear"):
        get_method("karcher")


def test_every_method_cites_its_source():
    # A paper (arXiv id or DOI), or for mergekit's own methods without one, where they are described.
    for name, method in MERGE_METHODS.items():
        doc = method.fn.__doc__ or ""
        assert any(ref in doc for ref in ("arXiv", "doi:", "https://")), name
