"""Bucket scoring requests into padded batches under a token budget.

A padded batch costs ``len(batch) * max(length in batch)`` tokens of compute and memory, so requests are
sorted by length and packed greedily: neighbours in the sorted order have similar lengths and the padding
stays small (the length-bucketing of fairseq's ``batch_by_size`` and of vLLM's scheduler budget
``max_num_batched_tokens``, here counting the padded tokens because the batches are dense).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fuseflow.packing import as_lengths


def plan_batches(lengths: Sequence[int] | np.ndarray, max_batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Group request indices into batches, longest first.

    Every index appears in exactly one batch. A batch of several requests never costs more than
    ``max_batch_tokens`` padded tokens (``len(batch) * max(lengths[i] for i in batch)``) nor holds more than
    ``max_batch_size`` requests; a request longer than the budget on its own forms a batch of one (the
    caller bounds single requests with its ``max_length``). Zero-length requests are batched like any other
    (cost 0). Longest first so that a batch that does not fit in memory fails at once, not at the end.
    """
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    lengths = as_lengths(lengths)  # [N]
    # Stable sort on the negated lengths: longest first, equal lengths keep request order.
    order = np.argsort(-lengths, kind="stable")  # [N]

    batches: list[list[int]] = []
    batch: list[int] = []
    batch_len = 0  # padded length of `batch`: the length of its first (longest) member
    for i in order.tolist():
        n = int(lengths[i])
        if batch and len(batch) < max_batch_size and (len(batch) + 1) * batch_len <= max_batch_tokens:
            batch.append(i)
            continue
        if batch:
            batches.append(batch)
        batch, batch_len = [i], n
    if batch:
        batches.append(batch)
    return batches


def padded_tokens(lengths: Sequence[int] | np.ndarray, batches: list[list[int]]) -> int:
    """Tokens the planned batches compute, padding included (for benchmarks and logs)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return int(sum(len(b) * int(lengths[b].max()) for b in batches if b))
