"""One-pass lm_head epilogue in Triton: each row of logits ``[c, V]`` (bf16/fp16/fp32) is read once, giving

- the fp32 logsumexp of the transformed logits (online softmax normaliser: a running maximum and a sum of
  exponentials rescaled whenever the maximum grows; Milakov & Gimelshein 2018, "Online normalizer
  calculation for softmax", arXiv 1805.02867);
- the maxima (minima for a decreasing transform) of the ``V // block`` full blocks of raw logits, which is
  stage 1 of :func:`fuseflow.kernels.head.block_topk`; stage 2 (top-k over ``[c, V // block]``, then over
  ``k·block`` candidates) stays in torch;
- optionally the raw gold logit of each row (NaN where the gold id is outside ``[0, V)``).

So after the matmul, ``[c, V]`` is read once instead of several times (cast, transform, max, exp-sum, topk).

This module imports Triton at import time; :mod:`fuseflow.kernels.head` imports it only when the
``"triton"`` method is used. CUDA tensors run the compiled kernel; CPU tensors run the same kernel under
Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is imported; slow, for tests).

Status: checked against the torch reference under the interpreter (``tests/kernels/test_head_kernels.py``);
NOT yet compiled or timed on a GPU (``bench/head.py`` does both), so ``method="auto"`` never picks it: it
runs only when asked for (``method="triton"``, engine option ``head_method: triton``).
The soft-cap's tanh is computed as ``2·sigmoid(2y) − 1`` (absolute error ~1e-7·cap, well inside fp32
logprob noise) so that the kernel uses only portable ``tl`` functions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fuseflow.kernels.common import DEFAULT_BLOCK, LogitTransform

__all__ = ["head_epilogue", "interpreted"]

# Blocks of ``block`` columns per loop iteration of one program (a [BLOCKS_PER_TILE, block] tile).
BLOCKS_PER_TILE = 16
NUM_WARPS = 8


def _head_epilogue_kernel(
    logits_ptr,
    stride_row,
    V,
    lse_ptr,
    extrema_ptr,
    n_full_blocks,
    gold_ptr,
    gold_out_ptr,
    scale,
    divide,
    cap,
    temperature,
    HAS_SCALE: tl.constexpr,
    HAS_DIVIDE: tl.constexpr,
    HAS_CAP: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    LARGEST: tl.constexpr,
    WANT_EXTREMA: tl.constexpr,
    HAS_GOLD: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCKS_PER_TILE: tl.constexpr,
):
    # One program per row; the row is walked in tiles of [BLOCKS_PER_TILE, BLOCK] columns.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    tile_blocks = tl.arange(0, BLOCKS_PER_TILE)  # [T]
    in_block = tl.arange(0, BLOCK)  # [B]
    m = tl.full([], float("-inf"), tl.float32)  # running max of the transformed logits
    s = tl.zeros([], tl.float32)  # running sum of exp(z - m)
    for start in range(0, V, BLOCK * BLOCKS_PER_TILE):
        blk = start // BLOCK + tile_blocks  # [T] block numbers
        cols = blk[:, None] * BLOCK + in_block[None, :]  # [T, B]
        valid = cols < V
        x = tl.load(row_ptr + cols, mask=valid, other=0.0).to(tl.float32)  # [T, B]
        if WANT_EXTREMA:
            if LARGEST:
                ext = tl.max(tl.where(valid, x, float("-inf")), axis=1)  # [T]
            else:
                ext = tl.min(tl.where(valid, x, float("inf")), axis=1)  # [T]
            tl.store(extrema_ptr + row * n_full_blocks + blk, ext, mask=blk < n_full_blocks)
        z = x
        if HAS_SCALE:
            z = z * scale
        if HAS_DIVIDE:
            z = z / divide
        if HAS_CAP:
            z = cap * (2.0 * tl.sigmoid(2.0 * (z / cap)) - 1.0)  # cap · tanh(z / cap)
        if HAS_TEMPERATURE:
            z = z / temperature
        z = tl.where(valid, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(tl.max(z, axis=1), axis=0))
        # An infinite max (all -inf so far, or a +inf logit): shift by 0 so that exp(inf - inf) never makes a
        # NaN; the sum then ends at 0 (lse -inf) or +inf (lse +inf), as torch.logsumexp gives.
        shift = tl.where(tl.abs(m_new) == float("inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.sum(tl.exp(z - shift), axis=1), axis=0)
        m = m_new
    shift = tl.where(tl.abs(m) == float("inf"), 0.0, m)
    tl.store(lse_ptr + row, shift + tl.log(s))
    if HAS_GOLD:
        g = tl.load(gold_ptr + row)
        ok = (g >= 0) & (g < V)
        raw = tl.load(row_ptr + g, mask=ok, other=0.0).to(tl.float32)
        tl.store(gold_out_ptr + row, tl.where(ok, raw, float("nan")))


_KERNEL = None


def _kernel():
    """The kernel, ``triton.jit``-ed on first use: compiled for the GPU, or an interpreted function when
    ``TRITON_INTERPRET=1`` was set before Triton was imported (Triton's own switch, read at import time by
    its standard library too)."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = triton.jit(_head_epilogue_kernel)
    return _KERNEL


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return type(_kernel()).__name__ == "InterpretedFunction"


def head_epilogue(
    logits: torch.Tensor,
    transform: LogitTransform,
    *,
    block: int = DEFAULT_BLOCK,
    gold: torch.Tensor | None = None,
    largest: bool = True,
    extrema: bool = True,
    blocks_per_tile: int = BLOCKS_PER_TILE,
    num_warps: int = NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``logits [c, V]`` → fp32 ``logsumexp(transform(logits))`` ``[c]``, block extrema ``[c, V // block]``
    fp32 (maxima when ``largest``; None without ``extrema``), raw gold logits ``[c]`` fp32 (None without
    ``gold``). ``block`` and ``blocks_per_tile`` must be powers of two (Triton's ``tl.arange``)."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be 2-D [c, V] with contiguous rows, got shape {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    for name, value in (("block", block), ("blocks_per_tile", blocks_per_tile)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two for the Triton kernel, got {value}")
    c, v = logits.shape
    device = logits.device
    if device.type != "cuda" and not (device.type == "cpu" and interpreted()):
        raise ValueError(
            f"logits are on {device}: the Triton head epilogue runs on CUDA, or on CPU under Triton's "
            "interpreter (set TRITON_INTERPRET=1 before triton is imported)"
        )
    if gold is not None and gold.shape != (c,):
        raise ValueError(f"gold must be [c] = [{c}], got shape {tuple(gold.shape)}")
    n_full = v // block
    lse = torch.empty(c, dtype=torch.float32, device=device)  # [c]
    ext = torch.empty((c, n_full), dtype=torch.float32, device=device) if extrema else None  # [c, V // block]
    gold_raw = torch.empty(c, dtype=torch.float32, device=device) if gold is not None else None  # [c]
    if c == 0:
        return lse, ext, gold_raw
    dummy = lse  # any valid pointer for the outputs a constexpr switches off
    _kernel()[(c,)](
        logits,
        logits.stride(0),
        v,
        lse,
        ext if ext is not None and n_full > 0 else dummy,
        n_full,
        gold.contiguous() if gold is not None else dummy,
        gold_raw if gold_raw is not None else dummy,
        float(transform.logit_scale or 1.0),
        float(transform.logits_scaling or 1.0),
        float(transform.softcap or 1.0),
        float(transform.temperature),
        HAS_SCALE=transform.logit_scale is not None,
        HAS_DIVIDE=transform.logits_scaling is not None,
        HAS_CAP=transform.softcap is not None,
        HAS_TEMPERATURE=transform.temperature != 1.0,
        LARGEST=largest,
        WANT_EXTREMA=extrema and n_full > 0,
        HAS_GOLD=gold is not None,
        BLOCK=block,
        BLOCKS_PER_TILE=blocks_per_tile,
        num_warps=num_warps,
    )
    return lse, ext, gold_raw
