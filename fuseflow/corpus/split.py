"""The train / held-out split by document (a key per document index and seed, streamed), and the documents of a
part: read, split, and what cannot be read set aside."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from itertools import islice
from typing import Literal

import numpy as np

from .config import CorpusConfig
from .documents import CorpusError, CorpusTally, Document, DocumentError, interleave
from .readers import _read_source

Part = Literal["all", "train", "held_out"]


def iter_documents(config: CorpusConfig, part: Part = "train", tally: CorpusTally | None = None) -> Iterator[Document]:
    """Stream the documents of ``config`` (the first ``max_documents``), restricted to ``part``.

    ``part`` defaults to ``"train"`` so that held-out documents cannot reach training by accident; pass
    ``"held_out"`` for evaluation, ``"all"`` for everything. A mix (``sources``) yields its corpora's
    documents interleaved by weight (:func:`interleave`), each tagged with its corpus name. A document that
    cannot be read goes to ``tally`` (:meth:`CorpusTally.reject`), or raises :class:`DocumentError` without one.
    """
    if config.sources is not None:
        return interleave([(weight, _documents(sub, part, tally, name)) for name, weight, sub in config.corpora()])
    return _documents(config, part, tally)


def _documents(config: CorpusConfig, part: Part, tally: CorpusTally | None, corpus: str = "") -> Iterator[Document]:
    docs: Iterator[Document] = _read_source(config)
    if config.max_documents is not None:
        docs = islice(docs, config.max_documents)
    if part != "all":
        docs = split_held_out(docs, config, part)
    for doc in docs:
        if corpus:
            doc = replace(doc, corpus=corpus)
        if doc.error is None:
            yield doc
        elif tally is None:
            raise DocumentError(doc.origin, doc.error)
        else:
            tally.reject(doc, 0, DocumentError(doc.origin, doc.error))


def split_keys(indices: np.ndarray, seed: int) -> np.ndarray:
    """SplitMix64 of each document index, salted by ``seed``: ``[N] int`` → ``[N] uint64``.

    A bijection on uint64, so distinct documents never share a key, and the same on every platform.
    """
    with np.errstate(over="ignore"):
        salt = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        z = indices.astype(np.uint64) ^ salt  # [N]
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def held_out_threshold(num_documents: int, held_out: int, seed: int, chunk: int = 1 << 20) -> np.uint64:
    """The largest of the ``held_out`` (≥ 1) smallest keys of documents ``0..num_documents-1``.

    Streams the indices in chunks: a corpus of any size needs O(chunk + held_out) memory.
    """
    if not 1 <= held_out <= num_documents:
        raise CorpusError(f"corpus.held_out_documents = {held_out} must be in 1..{num_documents} (the documents)")
    chunks = (np.arange(start, min(start + chunk, num_documents)) for start in range(0, num_documents, chunk))
    return _nth_smallest_key(chunks, held_out, seed)[0]


def evaluable(doc: Document) -> bool:
    """A document the held-out split may take (issue 26): it was read without error and has text to evaluate on.
    A document set aside or empty in that slot left the evaluation one document short, silently."""
    return doc.error is None and (doc.is_chat or bool(doc.text and doc.text.strip()))


def _nth_smallest_key(index_chunks: Iterable[np.ndarray], n: int, seed: int) -> tuple[np.uint64 | None, int]:
    """(the largest of the ``n`` smallest split keys of the indices in ``index_chunks``, how many indices);
    None when there are none. O(chunk + n) memory."""
    best = np.empty(0, dtype=np.uint64)  # [≤ n] smallest keys so far
    total = 0
    for indices in index_chunks:
        keys = split_keys(indices, seed)  # [chunk]
        total += len(keys)
        both = np.concatenate([best, keys])
        best = both if len(both) <= n else np.partition(both, n - 1)[:n]
    return (best.max() if len(best) else None), total


def _evaluable_threshold(config: CorpusConfig, held_out: int, chunk: int = 1 << 16) -> np.uint64:
    """:func:`held_out_threshold` over the :func:`evaluable` documents alone: one pass that reads (parses) the
    source, so ``held_out_documents: N`` holds out N documents that can be evaluated whenever there are N."""
    docs = _read_source(config)
    if config.max_documents is not None:
        docs = islice(docs, config.max_documents)
    seen = [0]

    def chunks() -> Iterator[np.ndarray]:
        buf: list[int] = []
        for doc in docs:
            seen[0] += 1
            if evaluable(doc):
                buf.append(doc.index)
            if len(buf) >= chunk:
                yield np.array(buf, dtype=np.int64)
                buf = []
        if buf:
            yield np.array(buf, dtype=np.int64)

    limit, good = _nth_smallest_key(chunks(), held_out, config.seed)
    if not 1 <= held_out <= good:
        raise CorpusError(f"corpus.held_out_documents = {held_out} must be in 1..{good} (the documents that can be "
                          f"read and are not empty, of {seen[0]} in all)")
    return limit


def split_held_out(documents: Iterable[Document], config: CorpusConfig, part: Part) -> Iterator[Document]:
    """Keep the documents of ``part`` (``"train"``, ``"held_out"`` or ``"all"``): a split by document index
    and ``config.seed`` alone, so a held-out document never reaches training on any run.

    Only :func:`evaluable` documents are ever held out (issue 26): one that cannot be read or is empty stays
    in the training part, where it is set aside (dead-lettered) or counted as a training document would be.

    ``held_out_fraction``: an evaluable document is held out iff its key / 2⁶⁴ < fraction (≈ that fraction,
    streamed). ``held_out_documents``: exactly that many, the evaluable ones with the smallest keys (costs one
    pass that reads the source, see :func:`_evaluable_threshold`).
    """
    if part not in ("all", "train", "held_out"):
        raise ValueError(f"part must be 'all', 'train' or 'held_out', got {part!r}")
    if part == "all":
        yield from documents
        return
    if config.held_out_documents:
        limit = _evaluable_threshold(config, config.held_out_documents)
    elif config.held_out_fraction > 0:
        bound = np.uint64(config.held_out_fraction * 2.0**64)  # fraction < 1, so below 2⁶⁴
        limit = bound - np.uint64(1) if bound > 0 else None
    else:
        limit = None
    for doc in documents:
        held = limit is not None and evaluable(doc) and split_keys(np.array([doc.index]), config.seed)[0] <= limit
        if held == (part == "held_out"):
            yield doc
