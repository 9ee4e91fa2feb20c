"""Pack variable-length sequences into rows so that no FLOP is spent on padding.

A padded batch of lengths ``[900, 120, 80]`` computes ``3 × 900`` token positions for 1,100 real ones. Packing
concatenates sequences into rows and restarts ``position_ids`` at 0 at each sequence start; transformers
(≥ 4.53, ``masking_utils.find_packed_sequence_indices``) reads the restarts and confines attention to each
sequence:

- ``flash_attention_2`` turns them into ``cu_seqlens`` for the varlen kernel (true variable length: no
  attention FLOP crosses a sequence boundary) — only for a batch of one row (``_is_packed_sequence`` in
  transformers' ``modeling_flash_attention_utils``): with several rows it would attend across sequences, so
  callers give varlen kernels one packed row per forward;
- ``flex_attention`` builds a block-sparse document mask (blocks across sequences are skipped);
- ``sdpa`` / ``eager`` get a dense block-diagonal mask: correct, but a row of ``S`` tokens costs ``S²``
  attention. :func:`row_capacity` therefore caps rows at the longest sequence for those kernels, so a
  packed batch never computes more than the padded one it replaces (MLP and projection FLOPs, the bulk,
  drop to the real tokens either way).

This is the packing of ``DataCollatorWithFlattening`` (transformers) and of "Packing with
FlashAttention" (Kundu et al. 2024, arXiv 2407.09105), with first-fit-decreasing rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# attn_implementation values whose kernels skip cross-sequence work given restarted position ids.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def is_varlen(attn_implementation: str | None) -> bool:
    """True when the attention kernel gives packed rows true variable-length cost (see the module doc)."""
    return bool(attn_implementation) and any(attn_implementation.endswith(k) for k in VARLEN_ATTENTION)


def row_capacity(lengths: Sequence[int] | np.ndarray, attn_implementation: str | None, budget: int) -> int:
    """Tokens per packed row: ``budget`` for varlen kernels; else the longest sequence (dense masks cost
    ``row²``, so a longer row would spend more attention FLOPs than padding does)."""
    longest = int(np.max(lengths)) if len(lengths) else 1
    if is_varlen(attn_implementation):
        return max(int(budget), longest)
    return max(longest, 1)


def as_lengths(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """``lengths`` as a 1-D int64 array of non-negative sequence lengths, or a ValueError naming the bad one."""
    lengths = np.asarray(lengths, dtype=np.int64)  # [N]
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {lengths.shape}")
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"lengths must be >= 0, got {int(lengths.min())} at index {int(lengths.argmin())}")
    return lengths


def pack_rows(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of sequence indices into rows of at most ``capacity`` tokens.

    Every index appears in exactly one row; a sequence longer than ``capacity`` gets a row of its own.
    Rows come out longest-content first; within a row, indices are in placement order. FFD uses at most
    ``11/9·OPT + 6/9`` rows (Dósa 2007). Zero-length sequences are placed like any other (they cost nothing).
    Python loops here run over sequences, never tokens.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    lengths = as_lengths(lengths)  # [N]
    order = np.argsort(-lengths, kind="stable")  # [N] longest first, ties in input order
    rows: list[list[int]] = []
    free = np.zeros(0, dtype=np.int64)  # [R] room left in each open row
    for i in order.tolist():
        n = int(lengths[i])
        fits = np.flatnonzero(free >= n)  # rows with room, in opening order
        if fits.size:
            r = int(fits[0])
            rows[r].append(i)
            free[r] -= n
        else:
            rows.append([i])
            free = np.append(free, capacity - n)  # negative for an oversized sequence: its row stays closed
    return rows


def packed_positions(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """``position_ids`` of sequences laid end to end: ``[0..L0-1, 0..L1-1, …]`` (int64, length ``ΣL``)."""
    lengths = np.asarray(lengths, dtype=np.int64)  # [n]
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths  # [n]
    return np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)  # [ΣL]


def row_layout(
    lengths: Sequence[int] | np.ndarray, per_row: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of sequences laid end to end, right-padded to the longest row.

    ``lengths [n]`` are the sequences' lengths in row-major placement order and ``per_row [B]`` how many of
    them each (non-empty) row holds. Returns ``(real [B, W] bool, position_ids [B, W])`` with ``W`` the
    longest row: positions restart at 0 at every sequence, and each row's padding tail restarts too, so it
    is a segment of its own that no real position attends to.
    """
    lengths = as_lengths(lengths)  # [n]
    per_row = np.asarray(per_row, dtype=np.int64)  # [B]
    row_len = np.add.reduceat(lengths, np.cumsum(per_row) - per_row)  # [B]
    width = int(row_len.max())
    real = np.arange(width)[None, :] < row_len[:, None]  # [B, W]
    positions = packed_positions(np.stack([row_len, width - row_len], 1).reshape(-1)).reshape(-1, width)  # [B, W]
    positions[real] = packed_positions(lengths)
    return real, positions

