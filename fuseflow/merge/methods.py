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

import math
from dataclasses import dataclass
from typing import Annotated, Callable, Iterator, Literal

import torch
from pydantic import Field

from fuseflow.registry import Registry

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


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method", field="method")


def merge_method(name: str, *, seeded: bool = False) -> Callable[[MergeFn], MergeFn]:
    """Register ``fn(tensors, base, *, **params) -> Tensor`` under ``name`` (the config's ``method``)."""

    def register(fn: MergeFn) -> MergeFn:
        if name in MERGE_METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        MERGE_METHODS.register(name, MergeMethod(name=name, fn=fn, seeded=seeded))
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    return MERGE_METHODS.lookup(name)


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


def per_model(value: float | list[float], n: int, name: str) -> list[float]:
    """A per-model parameter given once for all models or as one value per model."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"parameters.{name}: {len(value)} values for {n} models")
        return [float(v) for v in value]
    return [float(value)] * n


def abs_delta(theta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|θ − θ_base|`` as float32, chunk by chunk."""
    return map_chunks(lambda _, xs: (xs[0] - xs[1]).abs_(), [theta, base], base.shape)


def _weight_total(w: list[float]) -> float:
    """``Σ_j w_j`` in float32 (as mergekit's divisor); a sum of ~0 is an error here, where mergekit divides
    by 1 instead (below 1e-8) and silently returns the unnormalised sum."""
    total = float32_sum(w)
    if abs(total) < 1e-8:
        raise ValueError("parameters.weights: the weights sum to 0; set normalize: false or change them")
    return total


def weighted_sum(xs: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    """``Σ_j w_j·x_j`` of equally shaped chunks."""
    acc = torch.zeros_like(xs[0])  # [C]
    for wj, x in zip(w, xs):
        acc.add_(x, alpha=wj)
    return acc


def product_sum(xs: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    """``Σ_j (w_j·x_j)`` with each product rounded to float32 before it is added: the rounding of mergekit's
    task-arithmetic family (``deltas * weights`` then ``sum(dim=0)``), where :func:`weighted_sum`'s fused
    ``add_(x, alpha=w)`` rounds once, as mergekit's ``linear`` (``addcmul_``)."""
    acc = torch.zeros_like(xs[0])  # [C]
    for wj, x in zip(w, xs):
        acc.add_(x if wj == 1.0 else x * wj)
    return acc


def float32_sum(w: list[float]) -> float:
    """``Σ_j w_j`` summed in float32, in order (mergekit sums its float32 weight tensor)."""
    total = torch.zeros((), dtype=torch.float32)
    for wj in w:
        total += wj
    return float(total)


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
    positive = product_sum(deltas, v) >= 0  # [C]
    num = torch.zeros_like(deltas[0])  # [C]
    den = torch.zeros_like(deltas[0])  # [C]
    for wj, vj, d in zip(w, v, deltas):
        if vj == 0:
            continue
        signed = d if vj > 0 else -d  # [C] has the sign of v_j·Δ_j
        agree = torch.where(positive, signed > 0, signed < 0)  # [C]
        num.add_((d if wj == 1.0 else d * wj).mul_(agree))  # w_j·Δ_j rounded first, as mergekit
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
    # Entries equal to the threshold, earliest first, until there are k: found step by step, because bf16
    # updates tie by the million (most are 0 or one bf16 step) and their int64 indices would be 4× a
    # bf16 tensor.
    need = k - above - above_lo
    for start in range(0, n, 1 << 22):
        if need <= 0:
            break
        ties = (bits[start : start + (1 << 22)] == threshold).nonzero().squeeze(1)[:need]  # [≤ 4M]
        flat[start:][ties] = True
        need -= ties.numel()
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
    # Divided, not multiplied by 1/Σw: the same float32 rounding as mergekit's linear.
    total = _weight_total(w) if normalize else 1.0
    return map_chunks(lambda _, xs: weighted_sum(xs, w).div_(total), tensors, tensors[0].shape)


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
    n = len(tensors)
    w = model_weights(weights, n)
    return sparse_task_arithmetic(
        tensors, base, [None] * n, [1.0] * n, w, normalize=normalize, consensus=False, scaling=scaling
    )


@merge_method("ties")
def ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    density: Fraction | list[Fraction] = 0.2,
    weights: list[float] | None = None,
    normalize: bool = True,
    rescale: Literal["l1", "none"] = "none",
    scaling: float = 1.0,
) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023, arXiv 2306.01708 §3): trim each Δ_j to its top ``density`` by
    magnitude (the paper keeps 20%; ``max(1, int(density·numel))`` entries for a density above 0, as
    mergekit 0.1.5), elect the sign of ``Σ_j w_j·Δ̂_j`` per entry, then take the disjoint (weighted) mean of
    the entries that agree with it: ``θ_base + λ·Σ_j w_j·a_j·Δ̂_j / Σ_j w_j·a_j``. Weights vote in the
    election as in mergekit's ``ties``. ``density`` may be one value per model (as mergekit's per-model
    ``density``); ``rescale: l1`` scales each trimmed Δ_j back to its L1 norm (mergekit's ``rescale``)."""
    _check_inputs(tensors, base)
    w = model_weights(weights, len(tensors))
    keep = [
        None if dj >= 1.0 else top_k_mask(abs_delta(t, base), trim_count(dj, base.numel())).view(-1)
        for t, dj in zip(tensors, per_model(density, len(tensors), "density"))
    ]  # N x ([numel] bool or None)
    factors = l1_rescale(tensors, base, keep) if rescale == "l1" else [1.0] * len(tensors)
    return sparse_task_arithmetic(tensors, base, keep, factors, w, normalize=normalize, consensus=True, scaling=scaling)


def trim_count(density: float, numel: int) -> int:
    """Entries TIES keeps: ``int(density·numel)``, at least one when ``density > 0`` (mergekit 0.1.5)."""
    return 0 if density <= 0 or numel == 0 else max(1, int(density * numel))


def dare_masks(shape, n: int, density: float | list[float], seed: int) -> torch.Tensor:
    """DARE's keep masks ``[N, *S]`` bool: entry kept with probability ``density`` (one value, or one per
    model), drawn chunk by chunk from one generator seeded with ``seed`` (model-major, then chunk order)."""
    dens = per_model(density, n, "density")
    gen = torch.Generator().manual_seed(seed)
    keep = torch.empty((n, *shape), dtype=torch.bool)  # [N, *S]
    flat = keep.view(n, -1)
    for j in range(n):
        for sl in _slices(flat.shape[1]):
            flat[j, sl] = torch.rand(sl.stop - sl.start, generator=gen) < dens[j]
    return keep


Rescale = Literal["probability", "l1", "none"]


def l1_rescale(tensors: list[torch.Tensor], base: torch.Tensor, keep: list[torch.Tensor | None]) -> list[float]:
    """mergekit's ``rescale: true`` (``sparsify.rescaled_masked_tensor`` with the L1 norm): per model,
    ``‖Δ_j‖₁ / ‖Δ_j·m_j‖₁``, or 1 when either is below 1e-7. mergekit sums in the merge dtype (float32);
    this sums in float64, so the factors can differ from mergekit's in the last float32 bit."""
    out = []
    for t, m in zip(tensors, keep):
        if m is None:
            out.append(1.0)
            continue
        full, kept = _l1_pair(t, base, m)
        out.append(full / kept if full >= 1e-7 and kept >= 1e-7 else 1.0)
    return out


def _l1_pair(t: torch.Tensor, base: torch.Tensor, m: torch.Tensor) -> tuple[float, float]:
    full = sum_chunks(lambda _, xs: (xs[0] - xs[1]).abs_().sum(dtype=torch.float64), [t, base])
    kept = sum_chunks(lambda sl, xs: (xs[0] - xs[1]).abs_().mul_(m[sl]).sum(dtype=torch.float64), [t, base])
    return float(full), float(kept)


def sparse_task_arithmetic(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    keep: list[torch.Tensor | None],
    factors: list[float],
    w: list[float],
    *,
    normalize: bool,
    consensus: bool,
    scaling: float,
) -> torch.Tensor:
    """mergekit's generalized task arithmetic on flat keep masks: ``Δ̂_j = f_j·m_j·Δ_j``, then the TIES
    disjoint mean (``consensus``) or the weighted sum (divided by ``Σ_j w_j`` when ``normalize``), times
    λ = ``scaling``, plus the base."""

    def merge(sl, xs):
        *thetas, b = xs
        deltas = []
        for t, m, f in zip(thetas, keep, factors):
            d = t - b
            if m is not None:
                d.mul_(m[sl])
            deltas.append(d.mul_(f) if f != 1.0 else d)
        return _combine_deltas(deltas, w, normalize=normalize, consensus=consensus, scaling=scaling).add_(b)

    return map_chunks(merge, [*tensors, base], base.shape)


def _combine_deltas(deltas: list[torch.Tensor], w: list[float], *, normalize: bool, consensus: bool,
                    scaling: float) -> torch.Tensor:
    """mergekit's ``GTATask`` mixing of (sparsified) task vectors, in its float32 operation order."""
    if consensus:
        merged = disjoint_merge(deltas, w, normalize)
    else:
        merged = product_sum(deltas, w)
        if normalize:
            merged.div_(_weight_total(w))
    return merged.mul_(scaling) if scaling != 1.0 else merged


@merge_method("dare", seeded=True)
def dare(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    density: Probability | list[Probability] = 0.5,
    weights: list[float] | None = None,
    normalize: bool = False,
    consensus: bool = False,
    rescale: Rescale = "probability",
    scaling: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """DARE (Yu et al. 2024, arXiv 2311.03099 §3): drop each entry of Δ_j with probability ``1 − density``
    and rescale the survivors by ``1 / density`` (``rescale: probability``, the paper), then combine as
    task arithmetic (mergekit's ``dare_linear``) or, with ``consensus: true``, with TIES's sign election and
    disjoint mean (``dare_ties``). ``rescale: l1`` scales each sparsified Δ_j back to its L1 norm instead
    (mergekit's ``rescale: true``, its default); ``none`` does not rescale. The masks come from ``seed``
    (see :func:`dare_masks`): same seed, same merge; mergekit draws from torch's global generator, so the
    two never draw the same masks."""
    _check_inputs(tensors, base)
    n = len(tensors)
    dens = per_model(density, n, "density")
    for dj in dens:
        if not 0.0 < dj <= 1.0:
            raise ValueError(f"parameters.density: must be in (0, 1], got {dj}")
    w = model_weights(weights, n)
    masks = dare_masks(base.shape, n, dens, seed).view(n, -1) if min(dens) < 1.0 else None
    keep = [None if masks is None or dj >= 1.0 else masks[j] for j, dj in enumerate(dens)]
    factors = _rescale_factors(rescale, tensors, base, keep, [1.0 / dj for dj in dens])
    return sparse_task_arithmetic(
        tensors, base, keep, factors, w, normalize=normalize, consensus=consensus, scaling=scaling
    )


def _rescale_factors(
    rescale: str, tensors: list[torch.Tensor], base: torch.Tensor, keep: list, probability: list[float]
) -> list[float]:
    if rescale == "probability":
        return [f if m is not None else 1.0 for f, m in zip(probability, keep)]
    if rescale == "l1":
        return l1_rescale(tensors, base, keep)
    return [1.0] * len(tensors)


@merge_method("breadcrumbs")
def breadcrumbs(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    density: Probability | list[Probability] = 0.9,
    gamma: Fraction | list[Fraction] = 0.01,
    weights: list[float] | None = None,
    normalize: bool = False,
    consensus: bool = False,
    rescale: Literal["l1", "none"] = "none",
    scaling: float = 1.0,
) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024, arXiv 2312.06795 §3): per model, drop the largest
    ``gamma`` fraction of |Δ_j| (outliers) and the smallest, keeping ``int(density·numel)`` entries, then
    task arithmetic; ``consensus: true`` adds TIES's sign election (mergekit's ``breadcrumbs_ties``).
    As mergekit's ``magnitude_outliers``: ``density ≥ 1`` keeps Δ_j whole, and when fewer than
    ``int(gamma·numel)`` entries are left to drop, fewer outliers are dropped (mergekit 0.1.5 keeps
    ``sorted[n_bot:n_bot + target]``; older versions kept ``[n_bot:-n_top]``, empty when ``n_top`` is 0).
    Ties in |Δ| at either cut keep the earlier positions (:func:`top_k_mask`); mergekit's sort orders
    them its own way."""
    _check_inputs(tensors, base)
    n, numel = len(tensors), base.numel()
    w = model_weights(weights, n)
    keep: list[torch.Tensor | None] = []
    for t, dj, gj in zip(tensors, per_model(density, n, "density"), per_model(gamma, n, "gamma")):
        if dj >= 1.0:
            keep.append(None)
            continue
        target = int(dj * numel)
        n_top = min(int(gj * numel), numel - target)
        score = abs_delta(t, base)  # [*S]
        band = top_k_mask(score, n_top + target).view(-1)  # [numel]
        if n_top:
            band &= ~top_k_mask(score, n_top).view(-1)
        del score
        keep.append(band)
    factors = l1_rescale(tensors, base, keep) if rescale == "l1" else [1.0] * n
    return sparse_task_arithmetic(
        tensors, base, keep, factors, w, normalize=normalize, consensus=consensus, scaling=scaling
    )


def _row_view(x: torch.Tensor) -> torch.Tensor:
    """``[R, C]``: a matrix's rows, a vector as one row (as mergekit's ``della_magprune``)."""
    return x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)


def della_keep(delta: torch.Tensor, density: float, epsilon: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """DELLA's MagPrune on a block of rows ``[r, C]`` float32: keep probabilities rising linearly with the
    rank of |Δ| within its row, from ``density − ε`` (smallest) to ``density + ε`` (largest); returns (keep
    mask, probabilities), both ``[r, C]``."""
    cols = delta.shape[1]
    ranks = delta.abs().argsort(dim=1, stable=True).argsort(dim=1).float()  # [r, C] 0 = smallest
    rank_norm = ranks / (cols - 1) if cols > 1 else torch.zeros_like(ranks)
    probs = rank_norm.mul_(2 * epsilon).add_(density - epsilon)  # [r, C]
    return torch.rand(delta.shape, generator=gen) < probs, probs


@merge_method("della", seeded=True)
def della(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    density: Probability | list[Probability] = 0.5,
    epsilon: Fraction | list[Fraction] = 0.15,
    weights: list[float] | None = None,
    normalize: bool = True,
    consensus: bool = True,
    rescale: Rescale = "probability",
    scaling: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """DELLA-Merging (Deep et al. 2024, arXiv 2406.11617 §3): MagPrune drops each entry of Δ_j at random
    with a keep probability that grows with its magnitude rank within its row (``density ± epsilon``,
    the paper's ``p_min``/``ε`` re-expressed as mergekit's), rescales the survivors by 1 / their keep
    probability (``rescale: probability``, the paper; ``l1`` matches mergekit's ``rescale: true``, its
    default; ``none``), then elects signs and takes the disjoint mean (``consensus: true``: mergekit's
    ``della``) or sums (``consensus: false``: ``della_linear``), times λ = ``scaling``.

    Streamed by blocks of rows: the random draws of a block are made from a generator seeded with
    ``seed`` and drawn again for the merge pass, so no mask is stored. mergekit draws from torch's global
    generator: the two never drop the same entries.
    """
    _check_inputs(tensors, base)
    n = len(tensors)
    w = model_weights(weights, n)
    dens, eps = per_model(density, n, "density"), per_model(epsilon, n, "epsilon")
    for dj, ej in zip(dens, eps):
        if dj < 1.0 and (dj + ej >= 1.0 or dj - ej <= 0.0):
            raise ValueError(f"parameters.epsilon: density ± epsilon must lie in (0, 1), got {dj} ± {ej}")
    rows = [_row_view(t) for t in tensors]
    b_rows = _row_view(base)
    n_rows, cols = b_rows.shape
    step = max(1, CHUNK // max(cols, 1))

    def blocks():
        """(row slice, [Δ̂_j as drawn, unscaled], [1/p_j]) per block of rows, the draws in a fixed order."""
        gen = torch.Generator().manual_seed(seed)
        for r0 in range(0, n_rows, step):
            rs = slice(r0, min(r0 + step, n_rows))
            b = b_rows[rs].float()
            deltas, inv = [], []
            for x, dj, ej in zip(rows, dens, eps):
                d = x[rs].float() - b  # [r, C]
                if dj < 1.0:
                    keep, probs = della_keep(d, dj, ej, gen)
                    d.mul_(keep)
                    inv.append(probs.reciprocal_())
                else:
                    inv.append(None)
                deltas.append(d)
            yield rs, b, deltas, inv

    factors = [1.0] * n
    if rescale == "l1":
        full, kept = [0.0] * n, [0.0] * n
        for rs, b, deltas, _ in blocks():
            for j, d in enumerate(deltas):
                full[j] += float((rows[j][rs].float() - b).abs_().sum(dtype=torch.float64))
                kept[j] += float(d.abs().sum(dtype=torch.float64))
        factors = [f / k if dj < 1.0 and f >= 1e-7 and k >= 1e-7 else 1.0 for f, k, dj in zip(full, kept, dens)]
    out = torch.empty(base.shape, dtype=torch.float32)  # [*S]
    out_rows = _row_view(out)
    for rs, b, deltas, inv in blocks():
        for d, f, p in zip(deltas, factors, inv):
            if rescale == "probability" and p is not None:
                d.mul_(p)
            elif f != 1.0:
                d.mul_(f)
        flat = [d.reshape(-1) for d in deltas]
        merged = _combine_deltas(flat, w, normalize=normalize, consensus=consensus, scaling=scaling)
        out_rows[rs] = merged.view_as(b).add_(b)
    return out


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
        # Δ in float32 (as mergekit's task vectors), the moments in float64 and rounded once: torch.var's
        # float32 result (its CPU accumulator is float64), so both tools rank the same values. The mean is
        # Σ Δ_j / N (exact for N equal Δ_j; Σ Δ_j·(1/N) is not), so entries where every model made the same
        # update have a variance of exactly 0 and are never selected, as in mergekit.
        # Accumulated model by model: torch.var(dim=0) over a short leading dim is ~7x slower on CPU.
        n = len(thetas)
        deltas = [(t - b).double() for t in thetas]
        mean = weighted_sum(deltas, [1.0] * n).div_(n)  # [C] float64
        return weighted_sum([(d - mean).square_() for d in deltas], [1.0] * n).div_(n).float()

    var = map_chunks(variance, [*tensors, base], base.shape)  # [*S]
    return top_k_mask(var, int(select_topk * int(torch.count_nonzero(var))))


@merge_method("sce")
def sce(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    select_topk: Probability = 1.0,
    uniform_below: Annotated[float, Field(ge=0.0)] = 0.0,
) -> torch.Tensor:
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
    uniform = total <= 0 or total / max(base.numel(), 1) < uniform_below
    w = [1.0 / n] * n if uniform else (sq / total).tolist()
    ones = [1.0] * n  # Erase elects sign(Σ_j Δ_j): the weights do not vote
    return map_chunks(
        lambda sl, xs: disjoint_merge(masked_deltas(sl, xs), w, normalize=True, elect_w=ones).add_(xs[-1]),
        [*tensors, base],
        base.shape,
    )


# ----------------------------------------------------------------------------------------------------------
# Spherical and geometric methods: per-tensor (or per-row) statistics from one pass, then a linear
# combination of the inputs with those coefficients in a second pass.
# ----------------------------------------------------------------------------------------------------------


def gram(xs: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    """``G[i, j] = ⟨x_i − b, x_j − b⟩`` over the whole tensor ``[N, N]`` float64 (``b = 0`` without base)."""
    n = len(xs)

    def dots(_, chunks):
        ds = [c - chunks[-1] for c in chunks[:-1]] if base is not None else chunks
        return torch.stack([torch.stack([(ds[i] * ds[j]).sum(dtype=torch.float64) for j in range(n)]) for i in range(n)])

    return sum_chunks(dots, [*xs, base] if base is not None else list(xs))


def row_gram(xs: list[torch.Tensor], base: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``G[i, j, v]``: the dot products per vector ``v`` ``[N, N, V]`` float64 of a matrix viewed as rows
    (``dim=-1``: V = rows) or columns (``dim=0``: V = columns), streamed by blocks of rows."""
    n = len(xs)
    rows = [_row_view(x) for x in xs]
    b_rows = None if base is None else _row_view(base)
    n_rows, cols = rows[0].shape
    out = torch.zeros((n, n, n_rows if dim == -1 else cols), dtype=torch.float64)
    step = max(1, CHUNK // max(cols, 1))
    for r0 in range(0, n_rows, step):
        rs = slice(r0, min(r0 + step, n_rows))
        ds = [r[rs].float() - (0 if b_rows is None else b_rows[rs].float()) for r in rows]  # N x [r, C]
        for i in range(n):
            for j in range(i, n):
                p = (ds[i] * ds[j]).double()
                if dim == -1:
                    out[i, j, rs] = p.sum(1)
                else:
                    out[i, j] += p.sum(0)
                out[j, i] = out[i, j]
    return out


def combine(xs: list[torch.Tensor], base: torch.Tensor | None, coeffs: torch.Tensor, dim: int | None) -> torch.Tensor:
    """``b + Σ_j c_j ⊙ (x_j − b)`` float32 (``b = 0`` without base): ``coeffs`` ``[N]`` for the whole tensor
    (``dim=None``) or ``[N, V]`` per row (``dim=-1``) or column (``dim=0``) of a matrix."""
    shape = xs[0].shape if base is None else base.shape
    if dim is None:
        c = [float(v) for v in coeffs]

        def merge(_, chunks):
            if base is None:
                return weighted_sum(chunks, c)
            *thetas, b = chunks
            return weighted_sum([t - b for t in thetas], c).add_(b)

        return map_chunks(merge, list(xs) if base is None else [*xs, base], shape)
    out = torch.empty(shape, dtype=torch.float32)  # [*S]
    out_rows = _row_view(out)
    rows = [_row_view(x) for x in xs]
    b_rows = None if base is None else _row_view(base)
    n_rows, cols = out_rows.shape
    cf = coeffs.float()  # [N, V]
    step = max(1, CHUNK // max(cols, 1))
    for r0 in range(0, n_rows, step):
        rs = slice(r0, min(r0 + step, n_rows))
        b = None if b_rows is None else b_rows[rs].float()
        acc = torch.zeros((rs.stop - rs.start, cols), dtype=torch.float32)  # [r, C]
        for j, r in enumerate(rows):
            d = r[rs].float() if b is None else r[rs].float() - b
            acc += d * (cf[j, rs, None] if dim == -1 else cf[j, None, :])
        out_rows[rs] = acc if b is None else acc.add_(b)
    return out


def slerp_coefficients(g: torch.Tensor, t: float, *, dot_threshold: float = 0.9995, eps: float = 1e-8) -> tuple[float, float]:
    """(s0, s1) of ``slerp(t, v0, v1) = s0·v0 + s1·v1`` from the Gram matrix of (v0, v1), with mergekit's
    conventions: a norm ≤ ``eps`` is not normalised, |cos| > ``dot_threshold`` falls back to lerp."""
    n0, n1 = float(g[0, 0]) ** 0.5, float(g[1, 1]) ** 0.5
    dot = float(g[0, 1]) / ((n0 if n0 > eps else 1.0) * (n1 if n1 > eps else 1.0))
    if abs(dot) > dot_threshold:
        return 1.0 - t, t
    theta = math.acos(dot)
    return math.sin(theta - theta * t) / math.sin(theta), math.sin(theta * t) / math.sin(theta)


@merge_method("slerp")
def slerp(tensors: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985, "Animating rotation with quaternion curves",
    SIGGRAPH, doi:10.1145/325165.325242) from the base (``t = 0``) to the one model (``t = 1``), each tensor
    flattened into one vector: ``sin((1−t)Ω)/sin Ω·θ_base + sin(tΩ)/sin Ω·θ_1``, Ω the angle between them;
    nearly colinear tensors (|cos Ω| > 0.9995) are interpolated linearly (mergekit's ``slerp``).

    The angle comes from float64 sums here, float32 in mergekit (numpy), so results can differ from
    mergekit's in the last float32 bits.
    """
    _check_inputs(tensors, base)
    if len(tensors) != 1:
        raise ValueError(f"models: slerp interpolates the base and exactly one model, got {len(tensors)} models")
    s0, s1 = slerp_coefficients(gram([base, tensors[0]], None), t)
    return combine([base, tensors[0]], None, torch.tensor([s0, s1]), None)


def nuslerp_coefficients(g: torch.Tensor, t: float) -> torch.Tensor:
    """``[2, V]`` coefficients of mergekit's ``nuslerp`` per vector from its Gram ``[2, 2, V]``: vectors
    normalised with norms clamped at 1e-7, lerp where ``1 − cos²Ω ≤ 1e-16``."""
    n0, n1 = g[0, 0].sqrt().clamp(min=1e-7), g[1, 1].sqrt().clamp(min=1e-7)
    cos = (g[0, 1] / (n0 * n1)).clamp(-1, 1)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    colinear = (1 - cos.square()) <= 1e-16
    safe = torch.where(colinear, torch.ones_like(sin), sin)
    c0 = torch.where(colinear, torch.full_like(sin, 1 - t), torch.sin((1 - t) * theta) / safe)
    c1 = torch.where(colinear, torch.full_like(sin, t), torch.sin(t * theta) / safe)
    return torch.stack([c0, c1])


@merge_method("nuslerp")
def nuslerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    weights: list[float] | None = None,
    row_wise: bool = False,
    flatten: bool = True,
) -> torch.Tensor:
    """mergekit's NuSLERP (no paper; https://github.com/arcee-ai/mergekit docs/merge_methods.md): slerp
    (Shoemake 1985, doi:10.1145/325165.325242) between two models with ``t = w_2 / (w_1 + w_2)`` (0.5
    when the weights sum to ~0). With a base it interpolates the task vectors and adds them to the base;
    without one (``base=None``, what the mergekit-YAML reader passes when ``base_model`` is absent) the
    models themselves. ``flatten`` treats the tensor as one vector; otherwise each row (or each column,
    ``row_wise``) of a matrix is interpolated on its own."""
    _check_inputs(tensors, base)
    if len(tensors) != 2:
        raise ValueError(f"models: nuslerp merges exactly two models (besides the base), got {len(tensors)}")
    w = model_weights(weights, 2)
    t = 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)
    if flatten or tensors[0].dim() < 2:
        g = gram(tensors, base)[:, :, None]  # [2, 2, 1]
        return combine(tensors, base, nuslerp_coefficients(g, t)[:, 0], None)
    if tensors[0].dim() > 2:
        raise ValueError("parameters.flatten: nuslerp without flatten handles tensors of at most 2 dimensions")
    dim = 0 if row_wise else -1
    return combine(tensors, base, nuslerp_coefficients(row_gram(tensors, base, dim), t), dim)


@merge_method("multislerp")
def multislerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    weights: list[float] | None = None,
    normalize_weights: bool = True,
    eps: Annotated[float, Field(gt=0.0)] = 1e-8,
) -> torch.Tensor:
    """mergekit's Multi-SLERP (no paper; https://goddard.blog/posts/multislerp-wow-what-a-cool-idea):
    barycentric interpolation of N models on the hypersphere (generalising slerp, Shoemake 1985,
    doi:10.1145/325165.325242): project the unit vectors onto the tangent space at their weighted mean
    direction, average there, map back with the exponential map and scale by the weighted mean norm.
    Relative to the base when there is one (``base=None``: the models themselves).

    Every step is linear in the inputs, so the result is ``Σ_j c_j·x_j`` with coefficients computed from
    the N×N Gram matrix (float64) of one pass: nothing N-sized is stacked. mergekit stacks the N tensors
    in float32; results agree to float32 rounding. When every task vector is 0 (a tensor no model
    changed, e.g. a frozen embedding) this returns the base; mergekit raises for N > 2 there.
    """
    _check_inputs(tensors, base)
    n = len(tensors)
    if n == 1:
        return tensors[0].float()
    w = torch.tensor(model_weights(weights, n), dtype=torch.float64)  # [N]
    if normalize_weights:
        w = w / w.sum()
    g = gram(tensors, base)  # [N, N]
    norms = g.diagonal().clamp(min=0).sqrt()  # [N]
    if base is not None and not bool(norms.any()):
        return base.float().clone()
    a = w / (norms + eps)  # mean = Σ a_j x_j
    mean_norm = float(a @ g @ a) ** 0.5
    if mean_norm < eps:
        if n == 2:
            return combine(tensors, base, w, None)
        raise ValueError(
            "parameters.weights: the weighted mean direction of the models is zero (antipodal models with "
            "balancing weights); change the weights"
        )
    m = a / mean_norm  # unit mean direction
    dots = (g @ m) / (norms + eps)  # [N] ⟨u_j, m̂⟩
    tau = a - float(w @ dots) * m  # tangent result Σ w_j (u_j − ⟨u_j, m̂⟩ m̂)
    tangent_norm = max(float(tau @ g @ tau), 0.0) ** 0.5 + eps
    coeffs = (m * math.cos(tangent_norm) + tau * (math.sin(tangent_norm) / tangent_norm)) * float(norms @ w)
    return combine(tensors, base, coeffs, None)


@merge_method("model_stock")
def model_stock(tensors: list[torch.Tensor], base: torch.Tensor, *, filter_wise: bool = False) -> torch.Tensor:
    """Model Stock (Jang et al. 2024, arXiv 2403.19522 §3): ``θ = t·mean_j θ_j + (1 − t)·θ_base`` with
    ``t = N·cos Ω / (1 + (N − 1)·cos Ω)``, cos Ω the angle between the task vectors, averaged over pairs
    (the paper's N = 2 generalised as mergekit's ``model_stock``: norms' product clamped at 1e-6, cos
    clamped to [−1, 1]). ``filter_wise`` takes one angle per row of a matrix instead of one per tensor."""
    _check_inputs(tensors, base)
    n = len(tensors)
    if n < 2:
        raise ValueError(f"models: model_stock needs at least two models besides the base, got {n}")
    g = row_gram(tensors, base, -1) if filter_wise else gram(tensors, base)[:, :, None]  # [N, N, V]
    norms = g.diagonal(dim1=0, dim2=1).clamp(min=0).sqrt().T  # [N, V]
    cos = torch.stack([
        (g[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1) for i in range(n) for j in range(i + 1, n)
    ]).mean(0)  # [V]
    denominator = 1 + (n - 1) * cos  # [V]
    # At cos Ω = −1/(N−1) there is no finite estimate: keep the base there (as mergekit 0.1.5).
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denominator))  # [V]
    coeffs = (t / n).expand(n, -1)  # θ = b + Σ_j (t/N)·(θ_j − b)
    return combine(tensors, base, coeffs[:, 0] if not filter_wise else coeffs, -1 if filter_wise else None)


@merge_method("passthrough")
def passthrough(
    tensors: list[torch.Tensor], base: torch.Tensor | None = None, *, scale: float | None = None
) -> torch.Tensor:
    """Passthrough: the one model's tensor, times ``scale`` if given (mergekit's ``passthrough``). With
    layer ``slices`` from several models this builds frankenmerges, as depth up-scaling (SOLAR, Kim et al.
    2023, arXiv 2312.15166 §2) stacks layer ranges of copies of one model."""
    if len(tensors) != 1:
        raise ValueError(f"models: passthrough takes exactly one model per tensor, got {len(tensors)}")
    out = tensors[0].float()  # [*S] a float32 copy, or the input itself when it is float32 already
    if out is tensors[0]:
        return out * scale if scale is not None else out.clone()
    return out.mul_(scale) if scale is not None else out  # in place: one float32 tensor, not two
