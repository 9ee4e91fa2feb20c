"""The lm_head epilogue, one definition for scoring and evaluation: hidden ``[N, H]`` → logits ``[N, V]``
→ the model's logit transform → fp32 logsumexp, top-k ids and logprobs, the gold token's logprob (or NLL).

Logits are computed ``chunk_tokens`` rows at a time in the weight's dtype (bf16 on GPU, as the model's own
lm_head does), so only one ``[chunk, V]`` block is ever alive. Everything after the matmul uses one fact:
every transform a causal LM applies to its final logits (Cohere's ``logit_scale`` multiply, Granite's
``logits_scaling`` divide, Gemma-2/3's soft-cap ``cap·tanh(z/cap)``, a sampling temperature) is monotone,
increasing when the net scale is positive. So the top-k ids are taken on the *raw* logits (the bottom-k
when the net scale is negative) and only the k winners and the gold logit are transformed; the full block
is transformed only inside the fp32 logsumexp, a vocabulary slice at a time.

Top-k has three implementations (``method``):

- ``"torch"``: ``torch.topk`` over ``[chunk, V]``;
- ``"block"``: :func:`block_topk`, exact two-stage top-k (per-block maxima, then top-k over the k best
  blocks' entries), a filter in the spirit of the partition-based GPU top-k methods surveyed by Zhang et al.
  2023, "Parallel Top-K Algorithms on GPU: A Comprehensive Study and New Methods" (SC'23);
- ``"triton"``: :mod:`fuseflow.kernels.triton_head` reads each row once and writes the fp32 logsumexp of the
  transformed logits plus the per-block maxima that :func:`block_topk`'s second stage needs;
- ``"auto"``: :data:`CPU_DEFAULT_METHOD` on CPU, ``"block"`` on other devices. The Triton kernel is opt-in
  (``method="triton"``) until it has been measured and tested on a GPU: it has only run under Triton's CPU
  interpreter so far (``tests/kernels``; ``pytest -m gpu`` and ``bench/head.py`` are the checks to run).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

# Below both the torch epilogue (here) and the Triton one (triton_head), which share them: no import circle.
from fuseflow.kernels.common import DEFAULT_BLOCK, LogitTransform, apply_logit_transform

__all__ = [
    "CPU_DEFAULT_METHOD",
    "DEFAULT_BLOCK",
    "HEAD_METHODS",
    "NLL_METHODS",
    "LogitTransform",
    "apply_logit_transform",
    "block_extrema",
    "block_topk",
    "logsumexp_transformed",
    "resolve_method",
    "token_nll",
    "token_nll_with_head",
    "topk_from_block_extrema",
    "topk_logprobs",
    "topk_logprobs_with_head",
]

HEAD_METHODS = ("auto", "torch", "block", "triton")
NLL_METHODS = ("auto", "torch", "triton")
# What "auto" uses on CPU: on the 2-core dev box (fp32, V=32000) block_topk took 100-170 ms where torch.topk
# over the full row took 180-430 ms per 2-4k rows, and `bench/head.py --shape tiny` ran the whole head in
# 724 ms (block) vs 1023 ms (torch) for 2048 tokens; rerun the bench on other CPUs.
CPU_DEFAULT_METHOD = "block"
# fp32 elements per vocabulary slice of the logsumexp (64 MiB): bounds the fp32 temporaries at any chunk size.
LSE_SLICE_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------------------------------
# The logit transform.
# ------------------------------------------------------------------------------------------------------------


def _check_topk_args(x: torch.Tensor, k: int, block: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [N, V], got shape {tuple(x.shape)}")
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"k must be in [1, V={x.shape[1]}], got {k}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")


def block_extrema(x: torch.Tensor, block: int, *, largest: bool = True) -> torch.Tensor:
    """Maxima (minima when not ``largest``) of the ``V // block`` full blocks of each row: ``[N, V // block]``.
    The tail ``V % block`` columns are not a block: :func:`topk_from_block_extrema` always keeps them."""
    n, v = x.shape
    full = v // block
    blocks = x[:, : full * block].unflatten(1, (full, block))  # [N, full, block], a view
    return blocks.amax(-1) if largest else blocks.amin(-1)  # [N, full]


def topk_from_block_extrema(
    x: torch.Tensor, extrema: torch.Tensor, k: int, block: int, *, largest: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Second stage of :func:`block_topk`: given the full blocks' extrema ``[N, V // block]`` (from
    :func:`block_extrema` or the Triton kernel), the top-k of ``x [N, V]`` as ``torch.topk`` returns it."""
    _check_topk_args(x, k, block)
    n, v = x.shape
    full = v // block
    if extrema.shape != (n, full):
        raise ValueError(f"extrema must be [N, V // block] = {(n, full)}, got {tuple(extrema.shape)}")
    if k >= full:  # the k best blocks would be every block: nothing to prune
        return torch.topk(x, k, dim=-1, largest=largest, sorted=True)
    _, best = torch.topk(extrema, k, dim=-1, largest=largest, sorted=False)  # [N, k] block numbers
    offsets = torch.arange(block, device=x.device)  # [block]
    cand = (best[:, :, None] * block + offsets).flatten(1)  # [N, k·block] vocabulary ids
    if full * block < v:  # the tail columns are always candidates
        tail = torch.arange(full * block, v, device=x.device).expand(n, -1)  # [N, V % block]
        cand = torch.cat([cand, tail], dim=1)  # [N, C]
    values, pos = torch.topk(x.gather(1, cand), k, dim=-1, largest=largest, sorted=True)  # [N, k]
    return values, cand.gather(1, pos)


def block_topk(
    x: torch.Tensor, k: int, block: int = DEFAULT_BLOCK, *, largest: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row of ``x [N, V]`` in two stages: ``(values, ids)``, ``[N, k]`` each, sorted
    (descending when ``largest``), like ``torch.topk(x, k, dim=-1, largest=largest)``.

    1. the maximum of each of the ``B = V // block`` full blocks (``[N, B]``, one read of ``x``);
    2. the ``k`` blocks with the largest maxima; their ``k·block`` entries plus the ``V % block`` tail
       columns are the candidates; ``torch.topk`` over those; candidate positions map back to vocabulary ids.

    Exactness. Let ``m`` be the smallest maximum among the chosen blocks. The k chosen blocks hold k
    distinct entries (their maxima) that are all ``≥ m``, and any entry ``y`` outside the candidates lies in
    an unchosen full block, whose maximum is ``≤ m``, so ``y ≤ m``. Write ``c_i`` and ``r_i`` for the i-th
    largest candidate and row value. Candidates are a subset of the row, so ``c_i ≤ r_i``. Conversely, if
    the row's i largest entries are all candidates then ``c_i ≥ r_i``; otherwise one of them, ``y``, is not, and
    ``r_i ≤ y ≤ m ≤ c_k ≤ c_i``. Hence ``c_i = r_i`` for every ``i ≤ k``: the values equal torch.topk's
    bit for bit, and the ids can differ only among equal values (torch.topk's own tie order is unspecified).
    ``-inf`` entries are ordinary values here; NaN makes the ids unspecified. With ``largest=False`` the same
    holds with minima. When ``k ≥ B`` the candidates would be the whole row and ``torch.topk`` runs directly.
    """
    _check_topk_args(x, k, block)
    if k >= x.shape[1] // block:
        return torch.topk(x, k, dim=-1, largest=largest, sorted=True)
    return topk_from_block_extrema(x, block_extrema(x, block, largest=largest), k, block, largest=largest)


# ----------------------------------------------------------------------------------------------------------
# fp32 logsumexp of the transformed logits.
# ----------------------------------------------------------------------------------------------------------


def logsumexp_transformed(
    logits: torch.Tensor,
    transform: LogitTransform,
    *,
    overwrite: bool = False,
    slice_elements: int = LSE_SLICE_ELEMENTS,
) -> torch.Tensor:
    """``logsumexp(transform(logits.float()), -1)`` → ``[N]`` fp32, over vocabulary slices of at most
    ``slice_elements`` fp32 values, so no second ``[N, V]`` fp32 block exists (a bf16 block is upcast one
    slice at a time). With ``overwrite`` an fp32 ``logits`` is transformed in place (the caller is done with
    the raw values). Slices are combined exactly: ``lse(x) = lse([lse(x_1), …, lse(x_S)])``."""
    n, v = logits.shape
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=logits.device)
    width = max(1, min(v, slice_elements // n))
    parts = []
    for a in range(0, v, width):
        z = logits[:, a : a + width]  # [N, w] view
        fresh = z.dtype != torch.float32
        z = z.float()
        if not transform.is_identity:
            z = apply_logit_transform(z, transform, inplace=fresh or overwrite)
        parts.append(torch.logsumexp(z, dim=-1))  # [N]
    return parts[0] if len(parts) == 1 else torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Method choice.
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_method(method: str, device: torch.device, allowed: tuple[str, ...] = HEAD_METHODS) -> str:
    """``method`` with ``"auto"`` resolved for tensors on ``device``: :data:`CPU_DEFAULT_METHOD` on CPU,
    ``"block"`` elsewhere (``"torch"`` where ``"block"`` is not allowed). ``"triton"`` must be asked for."""
    if method not in allowed:
        raise ValueError(f"method must be one of {allowed}, got {method!r}")
    if method == "triton" and not _triton_importable():
        raise ValueError("method 'triton' needs the triton package (pip install triton)")
    if method != "auto":
        return method
    choice = CPU_DEFAULT_METHOD if device.type == "cpu" else "block"
    return choice if choice in allowed else "torch"


def _triton_epilogue(logits: torch.Tensor, transform: LogitTransform, **kwargs):
    """:func:`fuseflow.kernels.triton_head.head_epilogue` (imported only when used)."""
    from fuseflow.kernels import triton_head

    return triton_head.head_epilogue(logits, transform, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# One chunk of logits → top-k / NLL.
# ----------------------------------------------------------------------------------------------------------


def _gather_rows(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, ids[:, None]).squeeze(1)  # [c]


def _topk_epilogue(
    logits: torch.Tensor,
    gold: torch.Tensor | None,
    k: int,
    transform: LogitTransform,
    method: str,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk of raw logits ``[c, V]`` (owned: may be overwritten) → ids ``[c, k]``, logprobs ``[c, k]``,
    gold logprobs ``[c]`` (fp32)."""
    largest = transform.increasing
    if method == "triton":
        lse, extrema, gold_raw = _triton_epilogue(logits, transform, block=block, gold=gold, largest=largest)
        top_raw, ids = topk_from_block_extrema(logits, extrema, k, block, largest=largest)  # [c, k]
    else:
        if method == "block":
            top_raw, ids = block_topk(logits, k, block, largest=largest)  # [c, k]
        else:
            top_raw, ids = torch.topk(logits, k, dim=-1, largest=largest, sorted=True)  # [c, k]
        gold_raw = None if gold is None else _gather_rows(logits, gold)  # [c]
        lse = logsumexp_transformed(logits, transform, overwrite=True)  # [c]; the raw logits are spent
    top_lp = apply_logit_transform(top_raw.float(), transform) - lse[:, None]  # [c, k]
    gold_lp = None if gold_raw is None else apply_logit_transform(gold_raw.float(), transform) - lse  # [c]
    return ids, top_lp, gold_lp


def _nll_epilogue(logits: torch.Tensor, targets: torch.Tensor, transform: LogitTransform, method: str) -> torch.Tensor:
    """One chunk of raw logits ``[c, V]`` (owned) → ``-log softmax(transform(logits))[target]`` ``[c]`` fp32."""
    if method == "triton":
        lse, _, gold_raw = _triton_epilogue(logits, transform, gold=targets, extrema=False)  # [c], None, [c]
    else:
        gold_raw = _gather_rows(logits, targets)  # [c]
        lse = logsumexp_transformed(logits, transform, overwrite=True)  # [c]
    return lse - apply_logit_transform(gold_raw.float(), transform)


# ----------------------------------------------------------------------------------------------------------
# Chunked drivers.
# ----------------------------------------------------------------------------------------------------------


def _check_chunked_args(hidden: torch.Tensor, ids: torch.Tensor | None, ids_name: str, chunk_tokens: int) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    if ids is not None and ids.shape != hidden.shape[:1]:
        raise ValueError(f"{ids_name} must be [N] = [{hidden.shape[0]}], got shape {tuple(ids.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")


def _linear_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Callable:
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[-1]}], got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    return lambda h: F.linear(h.to(weight.dtype), weight, bias)  # [c, V] in the weight's dtype


@torch.no_grad()
def topk_logprobs_with_head(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    gold: torch.Tensor | None,
    k: int,
    *,
    transform: LogitTransform = LogitTransform(),
    chunk_tokens: int = 4096,
    method: str = "auto",
    block: int = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`topk_logprobs` with any ``head``: ``[c, H]`` → raw logits ``[c, V]`` (e.g. the model's
    ``get_output_embeddings()``, whose forward hooks then see every chunk). ``head`` must return a fresh
    tensor: the epilogue overwrites it. Inference only (no autograd), as every function here."""
    _check_chunked_args(hidden, gold, "gold", chunk_tokens)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    method = resolve_method(method, hidden.device)
    n = hidden.shape[0]
    ids_out = torch.empty((n, k), dtype=torch.int64, device=hidden.device)  # [N, k]
    lp_out = torch.empty((n, k), dtype=torch.float32, device=hidden.device)  # [N, k]
    gold_out = None if gold is None else torch.empty((n,), dtype=torch.float32, device=hidden.device)  # [N]
    for s in range(0, n, chunk_tokens):
        e = min(s + chunk_tokens, n)
        logits = head(hidden[s:e])  # [c, V]
        if k > logits.shape[-1]:
            raise ValueError(f"k must be <= the vocabulary size {logits.shape[-1]}, got {k}")
        ids, lp, gold_lp = _topk_epilogue(logits, None if gold is None else gold[s:e], k, transform, method, block)
        ids_out[s:e], lp_out[s:e] = ids, lp
        if gold_out is not None:
            gold_out[s:e] = gold_lp
        del logits
    return ids_out, lp_out, gold_out


def topk_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gold: torch.Tensor | None,
    k: int,
    *,
    transform: LogitTransform = LogitTransform(),
    chunk_tokens: int = 4096,
    method: str = "auto",
    block: int = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-k next-token logprobs and the gold token's logprob from final hidden states.

    ``hidden [N, H]``, ``weight [V, H]``, ``bias [V]`` or None, ``gold [N]`` the actual next ids (in
    ``[0, V)``; None skips it). Per chunk of ``chunk_tokens`` rows: logits ``hidden @ weight.T + bias`` in
    the weight's dtype, top-k ids on the raw logits (see the module docstring), ``logprob =
    transform(z) − logsumexp(transform(z))`` with the logsumexp and the transform in fp32.
    Returns ids ``[N, k]`` int64 (descending logprob), logprobs ``[N, k]`` fp32, gold logprobs ``[N]`` fp32.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    head = _linear_head(hidden, weight, bias)
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"k must be in [1, V={weight.shape[0]}], got {k}")
    return topk_logprobs_with_head(
        hidden, head, gold, k, transform=transform, chunk_tokens=chunk_tokens, method=method, block=block
    )


@torch.no_grad()
def token_nll_with_head(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    *,
    transform: LogitTransform = LogitTransform(),
    chunk_tokens: int = 4096,
    method: str = "auto",
) -> torch.Tensor:
    """:func:`token_nll` with any ``head``: ``[c, H]`` → logits ``[c, V]``."""
    _check_chunked_args(hidden, targets, "targets", chunk_tokens)
    method = resolve_method(method, hidden.device, NLL_METHODS)
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)  # [N]
    for s in range(0, targets.shape[0], chunk_tokens):
        e = min(s + chunk_tokens, targets.shape[0])
        logits = head(hidden[s:e])  # [c, V]
        out[s:e] = _nll_epilogue(logits, targets[s:e], transform, method)
        del logits
    return out


def token_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    transform: LogitTransform = LogitTransform(),
    chunk_tokens: int = 4096,
    method: str = "auto",
) -> torch.Tensor:
    """``-log softmax(transform(hidden @ weight.T + bias))[target]`` → ``[N]`` fp32, ``chunk_tokens`` rows
    of logits (in the weight's dtype) at a time; the logsumexp is fp32 (:func:`logsumexp_transformed`)."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    return token_nll_with_head(
        hidden,
        _linear_head(hidden, weight, bias),
        targets,
        transform=transform,
        chunk_tokens=chunk_tokens,
        method=method,
    )
