"""Cutting documents into :class:`~fuseflow.sparse.Sample` pieces that fit the target's context, at clean
boundaries, each with its target encoding (the one tokenizer call that checked it fits, issue 25)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from fuseflow.sparse import Encoded, Sample

from .chat import render_chat
from .config import CorpusConfig
from .documents import CorpusTally, Document, DocumentError, Message, _log_empty, check_text, interleave, sample_id
from .split import Part, _documents

_NEWLINE = ord("\n")
_SPACE = ord(" ")
_WHITESPACE = np.array([ord(c) for c in " \t\n\r\x0b\x0c\xa0\u3000"], dtype=np.uint32)


def cut_scores(codepoints: np.ndarray, offsets: np.ndarray, newline_cuts: bool = True) -> np.ndarray:
    """How good a cut just before each token is: ``[N] uint32`` text, ``[L, 2]`` offsets → ``[L] int8``.

    3 after a blank line, 2 after a newline, 1 at a word boundary, 0 inside a word, -1 never (the token
    shares a character with the previous one: a byte-level piece of a multi-byte character).
    ``newline_cuts=False`` is for tokenizers that prepend a space marker to every text (SentencePiece's
    dummy prefix): a piece re-tokenizes as it was cut only if it starts with a space, so then 1 before a
    token that starts with a space and 0 elsewhere.
    """
    n = len(codepoints)
    starts, ends = offsets[:, 0], offsets[:, 1]  # [L], [L]
    padded = np.concatenate([np.array([_NEWLINE, _NEWLINE], dtype=np.uint32), codepoints, np.zeros(1, np.uint32)])
    prev1 = padded[starts + 1]  # [L] character before the token (newline before the text's start)
    prev2 = padded[starts]  # [L]
    first = padded[np.minimum(starts, n) + 2]  # [L] the token's first character
    if newline_cuts:
        score = (np.isin(prev1, _WHITESPACE) | np.isin(first, _WHITESPACE)).astype(np.int8)  # [L]
        score[prev1 == _NEWLINE] = 2
        score[(prev1 == _NEWLINE) & (prev2 == _NEWLINE)] = 3
    else:
        score = (first == _SPACE).astype(np.int8)  # [L]
    overlaps = np.zeros(len(starts), dtype=bool)  # [L]
    overlaps[1:] = starts[1:] < ends[:-1]
    score[overlaps] = -1
    return score


def newline_cuts_are_clean(tokenizer) -> bool:
    """Whether text cut just after a newline tokenizes as the two halves do (false for tokenizers that
    prepend a space marker to every text, which the second half then gains)."""
    first, second = "The first line.\n", "The second line."
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return ids(first + second) == ids(first) + ids(second)


def best_cut(scores: np.ndarray, lo: int, hi: int, floor: int) -> int:
    """Token index in ``[lo, hi]`` to cut before: the best score, the latest among equals. When every
    candidate there is forbidden, search back to ``floor``; failing that, cut at ``hi`` regardless."""
    for a in (max(lo, floor), floor):
        window = scores[a : hi + 1]  # [≤ hi - a + 1]
        if len(window) and window.max() >= 0:
            return hi - int(np.argmax(window[::-1]))
    return hi


def make_samples(
    documents: Iterable[Document | str | Sequence[Message]],
    tokenizer,
    max_tokens: int,
    stride: int | None = None,
    block_chars: int = 1 << 20,
    tally: CorpusTally | None = None,
) -> Iterator[Sample]:
    """Cut documents into samples whose tokenization by ``tokenizer`` (``add_special_tokens=True``) has at
    most ``max_tokens`` tokens.

    Pieces end at token boundaries mapped back to character offsets, preferring (within the last quarter of
    the budget) a blank line, then a newline, then a word boundary, so that a piece re-tokenizes to the
    tokens it was cut from; each piece is re-tokenized and shortened if it still does not fit.
    ``stride`` (tokens) makes consecutive pieces start ``stride`` tokens apart (overlapping); ``None``
    gives non-overlapping pieces. Whitespace-only pieces are skipped; so are chat pieces without any
    assistant text (they carry no loss). Ids are ``f"{document.index}:{piece}"``; plain strings and message
    lists get their position in ``documents`` as index. Documents longer than ``block_chars`` are first
    split at a newline so tokenizing one never holds more than a block's offsets in memory.

    A document that cannot be cut (:class:`DocumentError`: unreadable, a lone surrogate, a chat its template
    cannot render) goes to ``tally`` as rejected at the piece it stopped at, and empty documents are counted
    there; without a tally the error is raised, and empty documents are logged.
    """
    budget = max_tokens - tokenizer.num_special_tokens_to_add(pair=False)
    if budget < 2:
        raise ValueError(f"max_tokens = {max_tokens} leaves no room for text after the special tokens")
    if stride is not None and not 0 < stride <= budget:
        raise ValueError(f"stride must be in 1..{budget} (max_tokens minus special tokens), got {stride}")
    newline_cuts = newline_cuts_are_clean(tokenizer)
    empty = 0
    for position, item in enumerate(documents):
        doc = _as_document(position, item)
        where = doc.origin or f"document {doc.index}"
        piece = 0
        try:
            if doc.error is not None:
                raise DocumentError(doc.origin, doc.error)
            if doc.is_chat:
                text, spans = render_chat(doc.messages, tokenizer, where)
            else:
                text, spans = doc.text or "", None
            if not text.strip():
                if tally is not None:
                    tally.add_empty(doc)
                else:
                    empty += 1
                    _log_empty(doc, empty)
                continue
            check_text(text, where)  # the tokenizer would raise a bare TypeError
            bounds = _piece_bounds(text, tokenizer, budget, max_tokens, stride, newline_cuts, block_chars, where)
            for start, end, enc in bounds:
                piece_text = text[start:end]
                piece_spans = None if spans is None else _clip_spans(spans, start, end)
                if piece_text.strip() and piece_spans != ():
                    yield Sample(id=sample_id(doc, piece), text=piece_text, loss_spans=piece_spans, encoding=enc)
                piece += 1
        except DocumentError as e:
            if tally is None:
                raise
            tally.reject(doc, piece, e)


def corpus_samples(
    config: CorpusConfig, tokenizer, max_tokens: int, part: Part = "train", tally: CorpusTally | None = None, **cut
) -> Iterator[Sample]:
    """The samples of ``part`` (:func:`make_samples` keyword arguments in ``cut``). A mix is cut corpus by corpus
    and its *samples* interleaved by weight (:func:`interleave`), so a weight is a corpus's share of the
    training samples (≈ tokens, samples being mostly full), whatever the lengths of its documents. Bad and
    empty documents go to ``tally`` (see :func:`make_samples`)."""
    if config.sources is None:
        return make_samples(_documents(config, part, tally), tokenizer, max_tokens, tally=tally, **cut)
    streams = [
        (weight, make_samples(_documents(sub, part, tally, name), tokenizer, max_tokens, tally=tally, **cut))
        for name, weight, sub in config.corpora()
    ]
    return interleave(streams)



def _as_document(position: int, item) -> Document:
    if isinstance(item, Document):
        return item
    if isinstance(item, str):
        return Document(index=position, text=item)
    return Document(index=position, messages=tuple(item))


def _clip_spans(spans: tuple[tuple[int, int], ...], start: int, end: int) -> tuple[tuple[int, int], ...]:
    return tuple((max(s, start) - start, min(e, end) - start) for s, e in spans if s < end and e > start)


def _blocks(text: str, block_chars: int) -> Iterator[int]:
    """Start offsets of blocks of at most ``block_chars`` characters, cut after a newline (else a space)
    where possible."""
    start = 0
    while start < len(text):
        yield start
        if len(text) - start <= block_chars:
            return
        cut = text.rfind("\n", start + block_chars // 2, start + block_chars)
        if cut < 0:
            cut = text.rfind(" ", start + block_chars // 2, start + block_chars)
        start = cut + 1 if cut >= 0 else start + block_chars


def _piece_bounds(text, tokenizer, budget, max_tokens, stride, newline_cuts, block_chars, where) -> Iterator[tuple[int, int, Encoded]]:
    block_starts = list(_blocks(text, block_chars))
    for b, block_start in enumerate(block_starts):
        block_end = block_starts[b + 1] if b + 1 < len(block_starts) else len(text)
        block = text[block_start:block_end]
        for s, e, enc in _block_piece_bounds(block, tokenizer, budget, max_tokens, stride, newline_cuts, where):
            yield block_start + s, block_start + e, enc


def _block_piece_bounds(text, tokenizer, budget, max_tokens, stride, newline_cuts, where) -> Iterator[tuple[int, int, Encoded]]:
    """``(start, end, encoding)`` of each piece: the encoding (:func:`fuseflow.models.encode`) is the call that
    checked the piece fits, kept as the sample's (issue 25). A block that fits whole is tokenized once."""
    from fuseflow.models import encode  # torch stays out of config loading, which imports this module

    whole = encode(tokenizer, text)
    if len(whole.ids) <= max_tokens:  # as len(text tokens) <= budget: the special tokens are the same count
        yield 0, len(text), whole
        return
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # [L, 2]
    num_tokens = len(offsets)
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")  # [N]
    scores = cut_scores(codepoints, offsets, newline_cuts)  # [L]
    lookback = max(1, budget // 4)

    def char_at(token: int) -> int:
        return 0 if token == 0 else (len(text) if token >= num_tokens else int(offsets[token, 0]))

    s = 0
    while True:
        e = num_tokens if num_tokens - s <= budget else best_cut(scores, s + budget - lookback, s + budget, s + 1)
        while True:
            piece = encode(tokenizer, text[char_at(s) : char_at(e)])
            n = len(piece.ids)
            if n <= max_tokens:
                break
            hi = min(e, num_tokens) - (n - max_tokens)
            if hi <= s:
                raise DocumentError(where, f"cannot cut a piece of at most {max_tokens} tokens at token {s}")
            e = best_cut(scores, hi - lookback, hi, s + 1)
        yield char_at(s), char_at(e), piece
        if e >= num_tokens:
            return
        if stride is None:
            s = e
        else:
            s = best_cut(scores, s + stride - max(1, stride // 4), min(s + stride, e), s + 1)
