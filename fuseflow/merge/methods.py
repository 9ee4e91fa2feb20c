"""Parameter-space merge methods: pure tensor functions behind one registry.

Every method has mergekit's shape (``@merge_method``, ``f(tensors, base, **params) -> Tensor``):
``tensors`` holds the same parameter from the N models being merged (in FuseChat, one fused copy of the
pivot per source model), ``base`` holds it in the base model (FuseChat's pivot) and the result has
``base``'s shape. Task vectors are ``Δ_j = θ_j − θ_base``.

Methods compute in float32 and return float32 (the caller casts to the output dtype). They never modify
their inputs: those may be read-only memory maps of the safetensors files. Loops run over the N models,
never over elements, so the working set stays a few float32 copies of one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable

import torch
from pydantic import Field

MergeFn = Callable[..., torch.Tensor]
# Parameter constraints live in the signatures, where the config validation (config.py) reads them.
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Probability = Annotated[float, Field(gt=0.0, le=1.0)]


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
        raise ValueError(f"method: unknown merge method {name!r}; choose one of {', '.join(sorted(MERGE_METHODS))}") from None


# ----------------------------------------------------------------------------------------------------------
# Shared pieces.
# ----------------------------------------------------------------------------------------------------------


def _check_inputs(tensors: list[torch.Tensor], base: torch.Tensor | None) -> None:
    if not tensors:
        raise ValueError("models: a merge needs at least one model")
    shape = tensors[0].shape if base is None else base.shape
    for j, t in enumerate(tensors):
        if t.shape != shape:
            raise ValueError(f"models[{j}]: tensor shape {tuple(t.shape)} differs from {tuple(shape)}")


def model_weights(weights: list[float] | None, n: int) -> torch.Tensor:
    """Per-model weights as a float64 vector ``[N]`` (all ones when not given)."""
    if weights is None:
        return torch.ones(n, dtype=torch.float64)
    if len(weights) != n:
        raise ValueError(f"parameters.weights: {len(weights)} weights for {n} models")
    return torch.tensor(weights, dtype=torch.float64)


def _weight_total(w: torch.Tensor) -> float:
    total = float(w.sum())
    if total == 0.0:
        raise ValueError("parameters.weights: the weights sum to 0; set normalize: false or change them")
    return total


def task_vectors(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """``Δ_j = θ_j − θ_base`` for every model, stacked in float32."""
    base32 = base.float()  # [*S]
    deltas = torch.empty((len(tensors), *base.shape), dtype=torch.float32)  # [N, *S]
    for j, t in enumerate(tensors):
        deltas[j].copy_(t).sub_(base32)
    return deltas


def magnitude_trim(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """Keep, per model, the ``int(density·numel)`` entries of largest magnitude; zero the rest (in place).

    TIES §3 "Trim". With ``int(density·numel) == 0`` (a small tensor at a low density) nothing is kept.
    """
    if density >= 1.0:
        return deltas
    flat = deltas.view(deltas.shape[0], -1)  # [N, numel]
    k = int(density * flat.shape[1])
    for row in flat:
        keep = torch.zeros(row.shape, dtype=torch.bool)  # [numel]
        if k > 0:
            keep[row.abs().topk(k).indices] = True
        row.mul_(keep)
    return deltas


def sign_consensus(deltas: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, *S]`` bool: where model j's weighted update ``w_j·Δ_j`` has the elected sign, the sign of
    ``Σ_j w_j·Δ_j`` (a zero sum elects ``+``).

    TIES §3 "Elect" and SCE "Erase", as mergekit's ``get_mask(method="sum")``: a zero entry agrees with
    neither sign, so it counts neither in the sum nor in the divisor of a disjoint mean.
    """
    w = torch.ones(deltas.shape[0], dtype=torch.float64) if weights is None else weights
    total = torch.zeros(deltas.shape[1:], dtype=torch.float32)  # [*S]
    for j, wj in enumerate(w.tolist()):
        total.add_(deltas[j], alpha=wj)
    positive = total >= 0  # [*S]
    del total
    agree = torch.empty(deltas.shape, dtype=torch.bool)  # [N, *S]
    for j, wj in enumerate(w.tolist()):
        signed = deltas[j] if wj >= 0 else -deltas[j]  # [*S] has the sign of w_j·Δ_j
        torch.where(positive, signed > 0, signed < 0, out=agree[j])
    agree[w == 0] = False
    return agree


def disjoint_mean(deltas: torch.Tensor, weights: torch.Tensor, agree: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``Σ_j w_j·a_j·Δ_j / Σ_j w_j·a_j`` ``[*S]`` (divisor 1 where no model agrees), or the bare sum."""
    merged = torch.zeros(deltas.shape[1:], dtype=torch.float32)  # [*S]
    divisor = torch.zeros(deltas.shape[1:], dtype=torch.float32) if normalize else None  # [*S]
    for j, wj in enumerate(weights.tolist()):
        merged.add_(deltas[j] * agree[j], alpha=wj)
        if divisor is not None:
            divisor.add_(agree[j], alpha=wj)
    if divisor is not None:
        divisor[divisor == 0] = 1.0
        merged.div_(divisor)
    return merged


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
    out = torch.zeros(tensors[0].shape, dtype=torch.float32)  # [*S]
    for wj, t in zip(w.tolist(), tensors):
        out.add_(t, alpha=wj)
    if normalize:
        out.div_(_weight_total(w))
    return out


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
    # Σ_j w_j·Δ_j = Σ_j w_j·θ_j − (Σ_j w_j)·θ_base: no per-model delta tensor needed.
    acc = torch.zeros(base.shape, dtype=torch.float32)  # [*S]
    for wj, t in zip(w.tolist(), tensors):
        acc.add_(t, alpha=wj)
    acc.sub_(base, alpha=float(w.sum()))
    if normalize:
        acc.div_(_weight_total(w))
    return acc.mul_(scaling).add_(base)


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
    magnitude (the paper keeps 20%), elect the sign of ``Σ_j w_j·Δ̂_j`` per entry, then take the disjoint
    (weighted) mean of the entries that agree with it: ``θ_base + λ·Σ_j w_j·a_j·Δ̂_j / Σ_j w_j·a_j``.
    Weights enter the election as in mergekit's ``ties``."""
    _check_inputs(tensors, base)
    w = model_weights(weights, len(tensors))
    deltas = magnitude_trim(task_vectors(tensors, base), density)  # [N, *S]
    merged = disjoint_mean(deltas, w, sign_consensus(deltas, w), normalize)  # [*S]
    return merged.mul_(scaling).add_(base)


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
    (``dare_ties``). The masks come from ``seed``: the same seed gives the same merge."""
    _check_inputs(tensors, base)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"parameters.density: must be in (0, 1], got {density}")
    w = model_weights(weights, len(tensors))
    deltas = task_vectors(tensors, base)  # [N, *S]
    if density < 1.0:
        gen = torch.Generator().manual_seed(seed)
        for j in range(deltas.shape[0]):
            keep = torch.rand(deltas.shape[1:], generator=gen) < density  # [*S]
            deltas[j].mul_(keep).div_(density)
    if consensus:
        merged = disjoint_mean(deltas, w, sign_consensus(deltas, w), normalize)  # [*S]
    else:
        merged = torch.zeros(base.shape, dtype=torch.float32)  # [*S]
        for j, wj in enumerate(w.tolist()):
            merged.add_(deltas[j], alpha=wj)
        if normalize:
            merged.div_(_weight_total(w))
    return merged.mul_(scaling).add_(base)


def varm_weights(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """VaRM merging weights for one parameter matrix m: ``W_j = mean(Δθ_j²) / Σ_j mean(Δθ_j²)`` ``[N]``,
    uniform when no model changed the matrix."""
    base32 = base.float()  # [*S]
    sq = torch.tensor([(t - base32).square_().mean().item() for t in tensors], dtype=torch.float64)  # [N]
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
    w = varm_weights(tensors, base)  # [N]
    out = torch.zeros(base.shape, dtype=torch.float32)  # [*S]
    for wj, t in zip(w.tolist(), tensors):
        out.add_(t, alpha=wj)
    return out


def sce_select_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """SCE "Select": the top ``select_topk`` fraction of the entries whose variance across models is
    non-zero, by that variance ``[*S]`` bool (mergekit's ``get_sce_mask``: entries where every model made
    the same update are never selected)."""
    var = deltas.var(dim=0, unbiased=False)  # [*S]
    k = int(select_topk * int(torch.count_nonzero(var)))
    mask = torch.zeros(var.shape, dtype=torch.bool)  # [*S]
    if k > 0:
        mask.view(-1)[var.view(-1).topk(k).indices] = True
    return mask


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
    deltas = task_vectors(tensors, base)  # [N, *S]
    if select_topk < 1.0:
        deltas.mul_(sce_select_mask(deltas, select_topk))
    sq = torch.linalg.vector_norm(deltas.view(deltas.shape[0], -1), dim=1, dtype=torch.float64).square()  # [N]
    sq = sq / max(base.numel(), 1)
    total = float(sq.sum())
    w = sq / total if total > 0 else torch.full_like(sq, 1.0 / len(tensors))  # [N]
    merged = disjoint_mean(deltas, w, sign_consensus(deltas), normalize=True)  # [*S]
    return merged.add_(base)
