"""Parameter-space merge methods: pure tensor functions behind one registry.

Every method has mergekit's shape (``@merge_method``, ``f(tensors, base, **params) -> Tensor``):
``tensors`` holds the same parameter from the N models being merged (in FuseChat, one fused copy of the
pivot per source model), ``base`` holds it in the base model (FuseChat's pivot) and the result, float32,
has ``base``'s shape. Task vectors are ``Δ_j = θ_j − θ_base``.

Memory: inputs are typically read-only memory maps of bf16 safetensors (never modified here). Elementwise
work runs over flat chunks of ``CHUNK`` entries, upcast to float32 one chunk at a time, so besides the
float32 result a method holds only its per-tensor statistics (SCE's variance, TIES's keep masks) and
chunk-sized temporaries, not N float32 copies of the tensor. Loops run over chunks and models, never over
entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable, Iterator

import torch
from pydantic import Field

MergeFn = Callable[..., torch.Tensor]
# Parameter constraints live in the signatures, where the config validation (config.py) reads them.
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Probability = Annotated[float, Field(gt=0.0, le=1.0)]

# Entries per elementwise step: 1 MiB per float32 temporary, so a step's dozen temporaries stay in cache
# (sce ran ~2x faster than with 16 MiB steps on a [5632, 2048] bf16 tensor, 2 cores).
CHUNK = 1 << 18


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MergeFn
    # Takes a ``seed`` parameter; the executor turns the configured seed into one seed per tensor (see
    # execute.tensor_seed) so a tensor's random mask does not depend on which tensors came before it.
    seeded: bool = False


MERGE_METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, *, seeded: bool = False) -> Callable[[MergeFn], MergeFn]:
    """Register ``fn(tensors, base, *, **params) -> Tensor`` under ``name`` (the config's ``method``)."""

    def register(fn: MergeFn) -> MergeFn:
        if name in MERGE_METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        MERGE_METHODS[name] = MergeMethod(name=name, fn=fn, seeded=seeded)
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    try:
        return MERGE_METHODS[name]
    except KeyError:
        known = ", ".join(sorted(MERGE_METHODS))
        raise ValueError(f"method: unknown merge method {name!r}; choose one of {known}") from None


# ----------------------------------------------------------------------------------------------------------
# Chunked evaluation.
# ----------------------------------------------------------------------------------------------------------


def _slices(numel: int) -> Iterator[slice]:
    for start in range(0, numel, CHUNK):
        yield slice(start, min(start + CHUNK, numel))


ChunkFn = Callable[[slice, list[torch.Tensor]], torch.Tensor]


def map_chunks(fn: ChunkFn, inputs: list[torch.Tensor], shape) -> torch.Tensor:
    """A float32 tensor of ``shape`` whose flat chunk ``c`` is ``fn(c, [x.flat[c] as float32 for x in inputs])``.

    The float32 chunks of float32 inputs are views of them: ``fn`` must not modify its arguments.
    """
    flats = [x.reshape(-1) for x in inputs]
    out = torch.empty(shape, dtype=torch.float32)  # [*S]
    flat_out = out.view(-1)
    for sl in _slices(flat_out.numel()):
        flat_out[sl] = fn(sl, [f[sl].float() for f in flats])
    return out


def sum_chunks(fn: ChunkFn, inputs: list[torch.Tensor]) -> torch.Tensor:
    """``Σ_c fn(c, chunks)`` in float64, for per-tensor statistics (``fn`` returns a small tensor)."""
    flats = [x.reshape(-1) for x in inputs]
    total = torch.zeros((), dtype=torch.float64)
    for sl in _slices(flats[0].numel()):
        total = total + fn(sl, [f[sl].float() for f in flats]).double()
    return total


# ----------------------------------------------------------------------------------------------------------
# Shared pieces (on chunks: ``xs`` are the N models' chunks, ``b`` the base's, all float32).
# ----------------------------------------------------------------------------------------------------------


def _check_inputs(tensors: list[torch.Tensor], base: torch.Tensor | None) -> None:
    if not tensors:
        raise ValueError("models: a merge needs at least one model")
    shape = tensors[0].shape if base is None else base.shape
    for j, t in enumerate(tensors):
        if t.shape != shape:
            raise ValueError(f"models[{j}]: tensor shape {tuple(t.shape)} differs from {tuple(shape)}")


def model_weights(weights: list[float] | None, n: int) -> list[float]:
    """Per-model weights (all ones when not given)."""
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"parameters.weights: {len(weights)} weights for {n} models")
    return [float(w) for w in weights]


def _weight_total(w: list[float]) -> float:
    total = sum(w)
    if total == 0.0:
        raise ValueError("parameters.weights: the weights sum to 0; set normalize: false or change them")
    return total


def weighted_sum(xs: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    """``Σ_j w_j·x_j`` of equally shaped chunks."""
    acc = torch.zeros_like(xs[0])  # [C]
    for wj, x in zip(w, xs):
        acc.add_(x, alpha=wj)
    return acc


def disjoint_merge(
    deltas: list[torch.Tensor], w: list[float], normalize: bool, elect_w: list[float] | None = None
) -> torch.Tensor:
    """Sign election and disjoint mean on one chunk (TIES §3 "Elect" + "Disjoint merge"; SCE "Erase").

    The elected sign is that of ``Σ_j v_j·Δ_j`` (``v = elect_w``, default ``w``; a zero sum elects ``+``);
    model j counts where ``v_j·Δ_j`` has that sign, so zero entries count nowhere (mergekit's
    ``get_mask(method="sum")``). Returns ``Σ_j w_j·a_j·Δ_j / Σ_j w_j·a_j`` (divisor 1 where no model
    counts), or the bare numerator.
    """
    v = w if elect_w is None else elect_w
    positive = weighted_sum(deltas, v) >= 0  # [C]
    num = torch.zeros_like(deltas[0])  # [C]
    den = torch.zeros_like(deltas[0])  # [C]
    for wj, vj, d in zip(w, v, deltas):
        if vj == 0:
            continue
        signed = d if vj > 0 else -d  # [C] has the sign of v_j·Δ_j
        agree = torch.where(positive, signed > 0, signed < 0)  # [C]
        num.add_(d * agree, alpha=wj)
        den.add_(agree, alpha=wj)
    if not normalize:
        return num
    den[den == 0] = 1.0
    return num.div_(den)


def _histogram(bits: torch.Tensor, bins: int, digits: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Counts ``[bins]`` of ``digits(step)`` over steps of 4M entries of ``bits``: no full-size temporary.
    (A bincount call costs ~15 ms whatever its length, so steps are larger than ``CHUNK``.)"""
    counts = torch.zeros(bins, dtype=torch.int64)  # [bins]
    for start in range(0, bits.numel(), 1 << 22):
        counts += torch.bincount(digits(bits[start : start + (1 << 22)]), minlength=bins)
    return counts


def _bin_of_kth_largest(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest value, and how many values lie in higher bins."""
    at_or_above = counts.flip(0).cumsum(0).flip(0)  # [bins] values in this bin or higher
    b = int((at_or_above >= k).nonzero().max())
    return b, int(at_or_above[b] - counts[b])


def top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (``score``'s shape) of the ``k`` largest entries of a non-negative float32 tensor.

    Exact radix select instead of ``torch.topk``: the bit patterns of non-negative floats, read as int32,
    order like the values, so two histograms (high, then low 16 bits) find the k-th largest value, with
    no sort and no [k] index tensor (0.4-1.6 s against topk's 1.8-2.4 s on 65M entries, 2 shared cores).
    Entries equal to that value are kept in position order until there are k; topk breaks such ties its
    own way, so
    mergekit's ``sce`` can select other entries among those tied at the threshold (frequent with bf16).
    """
    if score.dtype != torch.float32:
        raise TypeError(f"top_k_mask needs float32 scores, got {score.dtype}")
    n = score.numel()
    mask = torch.zeros(score.shape, dtype=torch.bool)  # [*S]
    if k <= 0:
        return mask
    if k >= n:
        return mask.fill_(True)
    bits = score.reshape(-1).view(torch.int32)  # [numel] ≥ 0: the sign bit is clear
    hi, above = _bin_of_kth_largest(_histogram(bits, 1 << 15, lambda c: c >> 16), k)
    lo, above_lo = _bin_of_kth_largest(_histogram(bits, 1 << 16, lambda c: c[(c >> 16) == hi] & 0xFFFF), k - above)
    threshold = (hi << 16) | lo  # bit pattern of the k-th largest value
    flat = mask.view(-1)
    torch.gt(bits, threshold, out=flat)
    ties = (bits == threshold).nonzero().squeeze(1)  # [t]
    flat[ties[: k - above - above_lo]] = True
    return mask


# ----------------------------------------------------------------------------------------------------------
# Methods.
# ----------------------------------------------------------------------------------------------------------


@merge_method("linear")
def linear(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    weights: list[float] | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Weighted average of the models, ``Σ_j w_j·θ_j / Σ_j w_j`` (model soups, Wortsman et al. 2022,
    arXiv 2203.05482; FuseChat's ``linear`` baseline, arXiv 2402.16107 §4). The base takes no part:
    list it in ``models`` to include it. ``normalize: false`` leaves out the division."""
    _check_inputs(tensors, base)
    w = model_weights(weights, len(tensors))
    scale = 1.0 / _weight_total(w) if normalize else 1.0
    return map_chunks(lambda _, xs: weighted_sum(xs, w).mul_(scale), tensors, tensors[0].shape)


@merge_method("task_arithmetic")
def task_arithmetic(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weights: list[float] | None = None,
    normalize: bool = False,
    scaling: float = 1.0,
) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023, arXiv 2212.04089 §2): ``θ_base + λ·Σ_j w_j·Δ_j``, divided by
    ``Σ_j w_j`` when ``normalize`` (mergekit's ``task_arithmetic``; its default is no normalisation).
    ``scaling`` is λ."""
    _check_inputs(tensors, base)
    w = model_weights(weights, len(tensors))
    scale = scaling / _weight_total(w) if normalize else scaling

    def merge(_, xs):
        *thetas, b = xs
        return weighted_sum([t - b for t in thetas], w).mul_(scale).add_(b)

    return map_chunks(merge, [*tensors, base], base.shape)


@merge_method("ties")
def ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    density: Fraction = 0.2,
    weights: list[float] | None = None,
    normalize: bool = True,
    scaling: float = 1.0,
) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023, arXiv 2306.01708 §3): trim each Δ_j to its top ``density`` by
    magnitude (the paper keeps 20%; ``int(density·numel)`` entries, so none of a tiny tensor at a low
    density), elect the sign of ``Σ_j w_j·Δ̂_j`` per entry, then take the disjoint (weighted) mean of the
    entries that agree with it: ``θ_base + λ·Σ_j w_j·a_j·Δ̂_j / Σ_j w_j·a_j``. Weights vote in the
    election as in mergekit's ``ties``."""
    _check_inputs(tensors, base)
    w = model_weights(weights, len(tensors))
    keep = None
    if density < 1.0:
        k = int(density * base.numel())
        keep = [  # N x [numel] bool
            top_k_mask(map_chunks(lambda _, xs: (xs[0] - xs[1]).abs_(), [t, base], base.shape), k).view(-1)
            for t in tensors
        ]

    def merge(sl, xs):
        *thetas, b = xs
        deltas = [t - b for t in thetas]
        if keep is not None:
            deltas = [d.mul_(m[sl]) for d, m in zip(deltas, keep)]
        return disjoint_merge(deltas, w, normalize).mul_(scaling).add_(b)

    return map_chunks(merge, [*tensors, base], base.shape)


def dare_masks(shape, n: int, density: float, seed: int) -> torch.Tensor:
    """DARE's keep masks ``[N, *S]`` bool: entry kept with probability ``density``, drawn chunk by chunk
    from one generator seeded with ``seed`` (model-major, then chunk order)."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.empty((n, *shape), dtype=torch.bool)  # [N, *S]
    flat = keep.view(n, -1)
    for j in range(n):
        for sl in _slices(flat.shape[1]):
            flat[j, sl] = torch.rand(sl.stop - sl.start, generator=gen) < density
    return keep


@merge_method("dare", seeded=True)
def dare(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    density: Probability = 0.5,
    weights: list[float] | None = None,
    normalize: bool = False,
    consensus: bool = False,
    scaling: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """DARE (Yu et al. 2024, arXiv 2311.03099 §3): drop each entry of Δ_j with probability ``1 − density``
    and rescale the survivors by ``1 / density``, then combine as task arithmetic (mergekit's
    ``dare_linear``) or, with ``consensus: true``, with TIES's sign election and disjoint mean
    (``dare_ties``). The masks come from ``seed`` (see :func:`dare_masks`): same seed, same merge."""
    _check_inputs(tensors, base)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"parameters.density: must be in (0, 1], got {density}")
    w = model_weights(weights, len(tensors))
    keep = dare_masks(base.shape, len(tensors), density, seed).view(len(tensors), -1) if density < 1.0 else None

    def merge(sl, xs):
        *thetas, b = xs
        deltas = [t - b for t in thetas]
        if keep is not None:
            deltas = [d.mul_(keep[j, sl]).div_(density) for j, d in enumerate(deltas)]
        if consensus:
            merged = disjoint_merge(deltas, w, normalize)
        else:
            merged = weighted_sum(deltas, w)
            if normalize:
                merged.div_(_weight_total(w))
        return merged.mul_(scaling).add_(b)

    return map_chunks(merge, [*tensors, base], base.shape)


def varm_weights(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """VaRM merging weights for one parameter matrix m: ``W_j = mean(Δθ_j²) / Σ_j mean(Δθ_j²)`` ``[N]``
    float64, uniform when no model changed the matrix."""
    sq = sum_chunks(
        lambda _, xs: torch.stack([(t - xs[-1]).square_().sum(dtype=torch.float64) for t in xs[:-1]]),
        [*tensors, base],
    ) / max(base.numel(), 1)  # [N]
    total = float(sq.sum())
    return sq / total if total > 0 else torch.full_like(sq, 1.0 / len(tensors))


@merge_method("varm")
def varm(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """VaRM, variation ratio merge (FuseChat, Wan et al. 2024, arXiv 2402.16107 §3.3): per parameter matrix
    m, ``W_{j,m} = mean(Δθ_{j,m}²) / Σ_j mean(Δθ_{j,m}²)`` with ``Δθ_j = θ_j − θ_pivot``; the result is
    ``Σ_j W_{j,m}·θ_{j,m}``: a target model that moved further from the pivot on m weighs more there.

    Implemented from the formula. The released script (FuseChat/merge/VaRM) reads one statistics file for
    every model, so all weights come out equal; it also falls back to uniform weights when any one model
    left m unchanged, where the formula (and this) gives that model weight 0 and falls back to uniform only
    when none changed it.
    """
    _check_inputs(tensors, base)
    w = varm_weights(tensors, base).tolist()
    return map_chunks(lambda _, xs: weighted_sum(xs, w), tensors, base.shape)


def sce_select_mask(tensors: list[torch.Tensor], base: torch.Tensor, select_topk: float) -> torch.Tensor:
    """SCE "Select": ``[*S]`` bool, the top ``select_topk`` fraction, by variance of Δ across models, of the
    entries where that variance is non-zero (mergekit's ``get_sce_mask``: entries where every model made
    the same update are never selected)."""

    def variance(_, xs):
        *thetas, b = xs
        deltas = [t - b for t in thetas]
        mean = weighted_sum(deltas, [1.0 / len(deltas)] * len(deltas))  # [C]
        # Accumulated model by model: torch.var(dim=0) over a short leading dim is ~7x slower on CPU.
        return weighted_sum([(d - mean).square_() for d in deltas], [1.0 / len(deltas)] * len(deltas))

    var = map_chunks(variance, [*tensors, base], base.shape)  # [*S]
    return top_k_mask(var, int(select_topk * int(torch.count_nonzero(var))))


@merge_method("sce")
def sce(tensors: list[torch.Tensor], base: torch.Tensor, *, select_topk: Probability = 1.0) -> torch.Tensor:
    """SCE, select–calculate–erase (FuseChat-2.0, Wan et al. 2024, arXiv 2408.07990 §3.3), per matrix:

    - Select: keep the top ``select_topk`` (τ) fraction of entries by variance of Δ across models
      (FuseChat-2.0 uses τ = 0.1; mergekit's default, kept here, is 1.0 = keep all);
    - Calculate: ``w_j = mean((Δ_j·mask)²)``, normalised to sum 1 (uniform when all are 0);
    - Erase: drop entries whose sign disagrees with ``sign(Σ_j Δ_j·mask)``;
    - Merge: ``θ_base + Σ_j w_j·e_j·Δ_j / Σ_j w_j·e_j``.

    The mask is applied to the task vectors themselves, as mergekit's ``sce`` does, so unselected entries
    keep the base's value. FuseChat's own copy (FuseChat/mergekit ``sce_merging.py``) applies it only when
    computing the weights and merges the full task vectors. Consequence of Select: with τ < 1, entries where
    all models agree exactly (zero variance) keep the base's value, so N identical models merge to the base.
    """
    _check_inputs(tensors, base)
    if not 0.0 < select_topk <= 1.0:
        raise ValueError(f"parameters.select_topk: must be in (0, 1], got {select_topk}")
    n = len(tensors)
    mask = sce_select_mask(tensors, base, select_topk).view(-1) if select_topk < 1.0 else None

    def masked_deltas(sl, xs):
        *thetas, b = xs
        deltas = [t - b for t in thetas]
        return deltas if mask is None else [d.mul_(mask[sl]) for d in deltas]

    sq = sum_chunks(
        lambda sl, xs: torch.stack([d.square_().sum(dtype=torch.float64) for d in masked_deltas(sl, xs)]),
        [*tensors, base],
    )  # [N] Σ (Δ_j·mask)²; the common 1/numel of the means cancels in the normalisation
    total = float(sq.sum())
    w = (sq / total).tolist() if total > 0 else [1.0 / n] * n
    ones = [1.0] * n  # Erase elects sign(Σ_j Δ_j): the weights do not vote
    return map_chunks(
        lambda sl, xs: disjoint_merge(masked_deltas(sl, xs), w, normalize=True, elect_w=ones).add_(xs[-1]),
        [*tensors, base],
        base.shape,
    )
