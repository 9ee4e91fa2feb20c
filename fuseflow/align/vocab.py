"""Vocabulary maps: for every source (teacher) token id, the target token id it is projected onto.

A map is ``np.ndarray [V_src] int32`` with ``-1`` for source tokens that have no target counterpart
(their probability mass is dropped by :func:`fuseflow.align.project.project_to_target`). Methods are
registered with :func:`vocab_map` and chosen by the config field ``align.vocab_map``:

- ``exact``  — identical normalised strings (:mod:`fuseflow.align.tokens`);
- ``mined``  — FuseLLM's MinED: exact, else the target token at minimum edit distance;
- ``first-token`` — the first token the target tokenizer itself produces for the source token's text
  (:func:`target_splits`): a teacher's whole-word prediction `` wird`` goes to the target's first piece of
  it (`` w``), not to a look-alike (`` bird``, issue 21);
- ``stats``  — FuseChat's statistics-based alignment: the target token most often aligned with the source
  token over a corpus, the first-token map for tokens never seen.

In every method special tokens are paired by role (bos/eos/pad/unk) and otherwise left unmapped.
:func:`build_vocab_map` caches each map on disk, keyed by both vocabularies (and the texts, for ``stats``).
:func:`target_splits` (cached alike) also serves the projection's chain rule at target positions inside a
source token (:func:`fuseflow.align.project.chain_rule_rows`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fuseflow.align.levenshtein import levenshtein_indexed
from fuseflow.registry import Registry
from fuseflow.align.tokens import ROLES, VocabInfo, as_numpy_strings, code_points, token_strings, vocab_info

__all__ = [
    "VOCAB_MAPS",
    "vocab_map",
    "build_vocab_map",
    "exact_map",
    "mined_map",
    "stats_map",
    "role_map",
    "TargetSplits",
    "target_splits",
    "split_source_strings",
    "token_strings",
]

log = logging.getLogger(__name__)

# Bump when a method's output changes, so stale maps on disk are not reused.
_CACHE_VERSION = "2"

VocabMapFn = Callable[..., np.ndarray]
VOCAB_MAPS: Registry[VocabMapFn] = Registry("vocab map", field="align.vocab_map")


def vocab_map(name: str):
    """Register ``fn(src: VocabInfo, tgt: VocabInfo, *, src_tokenizer, tgt_tokenizer, texts, cache_dir)``
    returning ``[V_src] int32`` (entries take ``**_`` for the arguments they do not use)."""
    return VOCAB_MAPS.register(name)


# ----------------------------------------------------------------------------------------------------------
# Pure functions on arrays of normalised strings.
# ----------------------------------------------------------------------------------------------------------


def role_map(src_roles: dict[str, int], tgt_roles: dict[str, int], src_size: int) -> np.ndarray:
    """Special tokens paired by role: ``[V_src] int32``, -1 except at the source's bos/eos/pad/unk ids."""
    out = np.full(src_size, -1, dtype=np.int32)  # [V_src]
    for role in reversed(ROLES):  # earlier roles win when one id holds several (pad == eos is common)
        if role in src_roles and role in tgt_roles:
            out[src_roles[role]] = tgt_roles[role]
    return out


def exact_map(
    src_strings: np.ndarray,
    tgt_strings: np.ndarray,
    src_skip: np.ndarray | None = None,
    tgt_skip: np.ndarray | None = None,
) -> np.ndarray:
    """``[V_src] int32``: the target id with the identical string, or -1.

    ``src_strings [V_src]`` / ``tgt_strings [V_tgt]`` are numpy unicode arrays; ``*_skip`` (bool) marks
    entries never matched (special tokens). Where the target vocabulary holds a string twice, the lower id wins.
    """
    src_skip = np.zeros(len(src_strings), bool) if src_skip is None else src_skip
    tgt_skip = np.zeros(len(tgt_strings), bool) if tgt_skip is None else tgt_skip
    out = np.full(len(src_strings), -1, dtype=np.int32)  # [V_src]
    tgt_ids = np.flatnonzero(~tgt_skip)  # [N]
    if len(tgt_ids) == 0:
        return out
    order = np.lexsort((tgt_ids, tgt_strings[tgt_ids]))  # by string, then id
    sorted_str = tgt_strings[tgt_ids][order]  # [N]
    sorted_ids = tgt_ids[order]  # [N]
    src_ids = np.flatnonzero(~src_skip)  # [M]
    pos = np.searchsorted(sorted_str, src_strings[src_ids], side="left")  # [M] first (= lowest id) equal
    pos_c = np.minimum(pos, len(sorted_str) - 1)
    hit = (pos < len(sorted_str)) & (sorted_str[pos_c] == src_strings[src_ids])
    out[src_ids[hit]] = sorted_ids[pos_c[hit]]
    return out


def _reverse_rows(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each row's first ``length`` code points reversed, zero padding kept at the end: ``[N, W]``."""
    w = codes.shape[1]
    cols = np.arange(w)  # [W]
    src = lengths[:, None] - 1 - cols  # [N, W]
    rev = np.take_along_axis(codes, np.clip(src, 0, w - 1), axis=1)
    rev[src < 0] = 0
    return rev


def _as_strings(codes: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(codes.astype(np.uint32)).view(f"<U{codes.shape[1]}").ravel()


def mined_map(
    src_strings: np.ndarray,
    tgt_strings: np.ndarray,
    src_skip: np.ndarray | None = None,
    tgt_skip: np.ndarray | None = None,
    window: int = 8,
    return_distance: bool = False,
):
    """MinED (FuseLLM, arXiv 2401.10491 §3.3; ``find_best_mapping`` in its ``vocab_mapping.py``): the exact
    target string when there is one, else the target token at minimum edit distance.

    FuseLLM scans the whole target vocabulary for every unmatched source token (262k × 49k distances for
    Gemma-3 → SmolLM2: hours). Here the candidates are pruned: in the target strings sorted as they are and
    sorted reversed, the ``window`` entries either side of where the source string would sit, i.e. the
    targets sharing the longest prefix and the longest suffix with it (``np.searchsorted``). Distances to
    those ``4 * window`` candidates are computed in batches (:mod:`fuseflow.align.levenshtein`).

    When the pruning can miss the global minimum: when the best target shares no long prefix or suffix with
    the source (a match in the middle: ``"xabcx"`` → ``"abc"``) or when more than ``window`` targets share a
    longer prefix than the best one. A result at distance 1 is always globally optimal (there is no exact
    match, so no target is closer); ``return_distance=True`` also returns the distances ``[V_src] int32``
    (0 = exact, -1 = unmapped) so callers can count how many are certified. Ties go to the lower target id.
    """
    src_skip = np.zeros(len(src_strings), bool) if src_skip is None else src_skip
    tgt_skip = np.zeros(len(tgt_strings), bool) if tgt_skip is None else tgt_skip
    out = exact_map(src_strings, tgt_strings, src_skip, tgt_skip)  # [V_src]
    dist = np.where(out >= 0, 0, -1).astype(np.int32)  # [V_src]
    todo = np.flatnonzero((out < 0) & ~src_skip)  # [U] source ids without an exact match
    tgt_ids = np.flatnonzero(~tgt_skip)  # [N]
    if len(todo) == 0 or len(tgt_ids) == 0:
        return (out, dist) if return_distance else out

    src_codes, src_len = code_points(src_strings[todo])  # [U, Ws], [U]
    tgt_codes, tgt_len = code_points(tgt_strings[tgt_ids])  # [N, Wt], [N]
    n = len(tgt_ids)
    offsets = np.arange(-window, window)  # [2w]
    candidates = []
    for s_codes, t_codes in (
        (src_codes, tgt_codes),
        (_reverse_rows(src_codes, src_len), _reverse_rows(tgt_codes, tgt_len)),
    ):
        t_str = _as_strings(t_codes)  # [N]
        order = np.argsort(t_str, kind="stable")  # [N]
        pos = np.searchsorted(t_str[order], _as_strings(s_codes))  # [U]
        cand = np.clip(pos[:, None] + offsets, 0, n - 1)  # [U, 2w] positions in sorted order
        candidates.append(order[cand])  # [U, 2w] indices into tgt_ids
    cand = np.concatenate(candidates, axis=1)  # [U, 4w]
    rows = np.repeat(np.arange(len(todo)), cand.shape[1])  # [U * 4w]
    d = levenshtein_indexed(src_codes, src_len, rows, tgt_codes, tgt_len, cand.ravel())  # [U * 4w]
    d = d.reshape(cand.shape)  # [U, 4w]
    # Minimum distance, ties to the lower target id: one argmin over a combined key.
    key = d.astype(np.int64) * (int(tgt_ids.max()) + 1) + tgt_ids[cand]  # [U, 4w]
    best = np.argmin(key, axis=1)  # [U]
    pick = np.arange(len(todo))
    out[todo] = tgt_ids[cand[pick, best]]
    dist[todo] = d[pick, best]
    return (out, dist) if return_distance else out


def stats_map(
    src_ids: np.ndarray, tgt_ids: np.ndarray, src_size: int, tgt_size: int, fallback: np.ndarray
) -> np.ndarray:
    """Statistics-based map (FuseChat, arXiv 2402.16107 §3.2): each source token goes to the target token it
    is co-aligned with most often; ``fallback [V_src]`` where it was never seen.

    ``src_ids`` / ``tgt_ids`` ``[P]`` are the co-aligned (source, target) token pairs of a corpus: the
    tokens predicted at linked positions (:mod:`fuseflow.align.sequence`). Count ties go to the lower target id.
    """
    out = fallback.astype(np.int32).copy()  # [V_src]
    if len(src_ids) == 0:
        return out
    codes = src_ids.astype(np.int64) * tgt_size + tgt_ids.astype(np.int64)  # [P] one code per pair
    pair, count = np.unique(codes, return_counts=True)  # [Q]
    s, t = pair // tgt_size, pair % tgt_size  # [Q]
    order = np.lexsort((t, -count, s))  # by source, most frequent first, then lower target id
    first = np.unique(s[order], return_index=True)[1]  # [S] the top pair of each source id
    out[s[order][first]] = t[order][first]
    return out


# ----------------------------------------------------------------------------------------------------------
# How the target tokenizer splits each source token's text (first-token map, chain rule).
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetSplits:
    """How the target tokenizer splits the text of every source token (built by :func:`split_source_strings`).

    For source id ``v`` with normalised string ``w`` of ``n = ptr[v+1] - ptr[v]`` characters:
    ``codes[ptr[v] + i]`` is ``w[i]`` (a code point) and ``next_id[ptr[v] + o]`` (``0 <= o < n``) is the
    target token that begins at character ``o`` of ``w`` when the target tokenizes ``w``, or -1 where none
    begins there (``o`` falls inside a target token, the token there runs past ``w``'s end, or it is a special
    token). ``next_id[ptr[v]]`` is the first-token map; ``o > 0`` serves the chain rule over strings at target
    positions inside a source token (:func:`fuseflow.align.project.chain_rule_rows`).
    """

    ptr: np.ndarray  # [V_src + 1] int64
    codes: np.ndarray  # [sum n] int32
    next_id: np.ndarray  # [sum n] int32

    @property
    def size(self) -> int:
        return len(self.ptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.ptr)  # [V_src]

    def first_token(self) -> np.ndarray:
        """``[V_src] int32``: the target token the target tokenizer produces first for each source token's text."""
        n = self.lengths
        return np.where(n > 0, self.next_id[np.minimum(self.ptr[:-1], max(len(self.next_id) - 1, 0))], -1).astype(np.int32)


def _target_context(tgt_tokenizer) -> str:
    """The text put before every source string when the target tokenizes it: nothing when the target splits a
    text's start as it splits the same characters after other text (byte-level BPE; Gemma-3's SentencePiece),
    a newline when it marks a text's start with a space of its own (``Metaspace(prepend_scheme='first')``,
    Llama-2's dummy prefix), which would turn a word's continuation ``ird`` into ``▁ird``."""
    ids = tgt_tokenizer("a", add_special_tokens=False)["input_ids"]
    strings = token_strings(tgt_tokenizer)
    return "" if "".join(strings[i] for i in ids) == "a" else "\n"


def split_source_strings(src: VocabInfo, tgt: VocabInfo, tgt_tokenizer) -> TargetSplits:
    """Tokenize every source token's text with the target tokenizer, in one batch, as it occurs in running text:
    after the context of :func:`_target_context`, and, when it ends in whitespace, before a letter (a
    whitespace run splits differently at the end of a text: SmolLM2 writes ``"\\n\\n"`` as one token there
    and as two before a word, which is where a teacher's ``"\\n\\n"`` is followed by more text).

    Target tokens begin where :func:`fuseflow.align.sequence.token_starts` says (the offsets rule of the
    sequence alignment); tokens past the source text's end (the appended letter) are not its split.
    One Python pass over the vocabulary hands the strings to the tokenizer and reads its lists back; the
    rest is array code. Source special tokens and strings holding a partial UTF-8 character get -1.
    """
    ctx = _target_context(tgt_tokenizer)
    strings = src.strings
    lengths = np.fromiter(map(len, strings), dtype=np.int64, count=len(strings))  # [V]
    ptr = np.concatenate([[0], np.cumsum(lengths)])  # [V+1]
    codes = np.frombuffer("".join(strings).encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int32)
    partial = (codes >= 0xD800) & (codes < 0xE000)  # lone surrogates: a token that is part of a character
    seg_of_code = np.repeat(np.arange(len(strings)), lengths)
    bad = src.special.copy()  # [V]
    bad[np.unique(seg_of_code[partial])] = True
    todo = np.flatnonzero(~bad & (lengths > 0))  # [U]
    next_id = np.full(int(ptr[-1]), -1, dtype=np.int32)
    if len(todo) == 0:
        return TargetSplits(ptr=ptr, codes=codes, next_id=next_id)
    texts = [ctx + w + ("a" if w[-1].isspace() else "") for w in (strings[i] for i in todo)]
    enc = tgt_tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    counts = np.fromiter(map(len, enc["input_ids"]), dtype=np.int64, count=len(texts))  # [U] tokens per text
    total = int(counts.sum())
    ids = np.fromiter(chain.from_iterable(enc["input_ids"]), dtype=np.int64, count=total)  # [N]
    off = np.fromiter(chain.from_iterable(chain.from_iterable(enc["offset_mapping"])), dtype=np.int64,
                      count=2 * total).reshape(total, 2)  # [N, 2]
    seg = np.repeat(np.arange(len(texts)), counts)  # [N] text of each token
    # token_starts per text, all texts at once: a running max that never crosses into the next text.
    start, end = off[:, 0], off[:, 1]
    real = end > start
    big = int(max(int(end.max(initial=0)), 1)) + 1
    covered = np.maximum.accumulate(np.where(real, end, 0) + seg * big) - seg * big  # [N]
    first = np.concatenate([[True], seg[1:] != seg[:-1]])  # [N] first token of its text
    prev_end = np.where(first, 0, np.concatenate([[0], covered[:-1]]))
    rel = prev_end - len(ctx)  # [N] where the token begins in the source string
    n_w = lengths[todo][seg]  # [N]
    keep = real & (start >= prev_end) & (rel >= 0) & (rel < n_w) & (end - len(ctx) <= n_w)
    keep &= ~tgt.special[np.clip(ids, 0, tgt.size - 1)] & (ids < tgt.size)
    next_id[ptr[todo][seg[keep]] + rel[keep]] = ids[keep]
    return TargetSplits(ptr=ptr, codes=codes, next_id=next_id)


def target_splits(src_tokenizer, tgt_tokenizer, cache_dir: str | os.PathLike | None = None) -> TargetSplits:
    """:func:`split_source_strings` for two tokenizers, cached on disk as the vocab maps are
    (``<cache_dir>/vocab_maps/splits-*.npz``, keyed by both vocabularies)."""
    src, tgt = vocab_info(src_tokenizer), vocab_info(tgt_tokenizer)
    key = hashlib.sha1(f"{_CACHE_VERSION}:splits:{src.digest}:{tgt.digest}".encode()).hexdigest()[:16]
    path = _cache_root(cache_dir) / f"splits-{key}.npz"
    if path.exists():
        with np.load(path) as z:
            splits = TargetSplits(ptr=z["ptr"], codes=z["codes"], next_id=z["next_id"])
        if splits.size == src.size:
            return splits
        log.warning("ignoring target splits %s: %d source tokens, expected %d", path, splits.size, src.size)
    splits = split_source_strings(src, tgt, tgt_tokenizer)
    _atomic_save(path, lambda f: np.savez(f, ptr=splits.ptr, codes=splits.codes, next_id=splits.next_id))
    return splits


# ----------------------------------------------------------------------------------------------------------
# Registered methods: tokenizers in, map out.
# ----------------------------------------------------------------------------------------------------------


def _with_roles(m: np.ndarray, src: VocabInfo, tgt: VocabInfo) -> np.ndarray:
    roles = role_map(src.roles, tgt.roles, src.size)
    return np.where(src.special, roles, m).astype(np.int32)


@vocab_map("exact")
def _exact(src: VocabInfo, tgt: VocabInfo, **_) -> np.ndarray:
    """Identical normalised strings only (the baseline every method starts from)."""
    m = exact_map(as_numpy_strings(src.strings), as_numpy_strings(tgt.strings), src.special, tgt.special)
    return _with_roles(m, src, tgt)


@vocab_map("mined")
def _mined(src: VocabInfo, tgt: VocabInfo, **_) -> np.ndarray:
    """MinED (FuseLLM, arXiv 2401.10491 §3.3): exact, else minimum edit distance (pruned, see :func:`mined_map`)."""
    m = mined_map(as_numpy_strings(src.strings), as_numpy_strings(tgt.strings), src.special, tgt.special)
    return _with_roles(m, src, tgt)


@vocab_map("first-token")
def _first_token(src: VocabInfo, tgt: VocabInfo, *, src_tokenizer, tgt_tokenizer, cache_dir=None, **_) -> np.ndarray:
    """Each source token → the first token the target tokenizer produces for its text in running text
    (fuseflow, issue 21; :class:`TargetSplits`). Where the target's first token of a whole-word source token
    is a piece of it, the map says so, which is what the target is trained to emit at that position."""
    return _with_roles(target_splits(src_tokenizer, tgt_tokenizer, cache_dir).first_token(), src, tgt)


@vocab_map("stats")
def _stats(src: VocabInfo, tgt: VocabInfo, *, src_tokenizer, tgt_tokenizer, texts, cache_dir=None, **_) -> np.ndarray:
    """Statistics-based (FuseChat, arXiv 2402.16107 §3.2): most frequent co-aligned target token over
    ``texts`` (offsets alignment), the first-token map for source tokens the texts never produce (FuseChat
    falls back to MinED; the first-token map misses the gold token less often, issue 21)."""
    from fuseflow.align.sequence import align_offsets
    from fuseflow.models import encode

    if not texts:
        raise ValueError("vocab map 'stats' needs texts to count over (config: align.stats_documents > 0)")
    pairs_s, pairs_t = [], []
    for text in texts:
        s = encode(src_tokenizer, text)
        t = encode(tgt_tokenizer, text)
        pos_map = align_offsets(s.offsets, t.offsets)  # [Lt-1]
        linked = np.flatnonzero(pos_map >= 0)  # target positions with a source prediction
        pairs_s.append(s.ids[pos_map[linked] + 1])  # the tokens those positions predict
        pairs_t.append(t.ids[linked + 1])
    src_ids = np.concatenate(pairs_s) if pairs_s else np.zeros(0, np.int32)
    tgt_ids = np.concatenate(pairs_t) if pairs_t else np.zeros(0, np.int32)
    keep = ~src.special[src_ids] & ~tgt.special[tgt_ids]
    fallback = build_vocab_map("first-token", src_tokenizer, tgt_tokenizer, cache_dir=cache_dir)  # cached too
    m = stats_map(src_ids[keep], tgt_ids[keep], src.size, tgt.size, fallback)
    return _with_roles(m, src, tgt)


# ----------------------------------------------------------------------------------------------------------
# Entry point with the disk cache.
# ----------------------------------------------------------------------------------------------------------


def _texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha1()
    for t in texts:
        h.update(hashlib.sha1(t.encode("utf-8", errors="surrogatepass")).digest())
    return h.hexdigest()


def build_vocab_map(
    method: str,
    src_tokenizer,
    tgt_tokenizer,
    texts: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> np.ndarray:
    """The ``method`` map (:data:`VOCAB_MAPS`) from ``src_tokenizer`` to ``tgt_tokenizer``: ``[V_src] int32``.

    Identical vocabularies give the identity without computing anything. Otherwise the map is read from, or
    written to, ``<cache_dir>/vocab_maps/`` (``cache_dir`` defaults to :func:`fuseflow.models.cache_dir`),
    keyed by a hash of both vocabularies, the method and, for ``stats``, the texts.
    """
    VOCAB_MAPS.lookup(method)  # an unknown name fails here, before any work
    src, tgt = vocab_info(src_tokenizer), vocab_info(tgt_tokenizer)
    if src.digest == tgt.digest:
        return np.arange(src.size, dtype=np.int32)
    key = hashlib.sha1(f"{_CACHE_VERSION}:{method}:{src.digest}:{tgt.digest}".encode())
    if method == "stats":
        key.update(_texts_digest(texts or []).encode())
    path = _cache_root(cache_dir) / f"{method}-{key.hexdigest()[:16]}.npy"
    if path.exists():
        m = np.load(path)
        if m.shape == (src.size,) and m.dtype == np.int32:
            return m
        log.warning("ignoring vocab map %s: shape %s, expected (%d,)", path, m.shape, src.size)
    m = VOCAB_MAPS[method](
        src, tgt, src_tokenizer=src_tokenizer, tgt_tokenizer=tgt_tokenizer, texts=texts, cache_dir=cache_dir
    )
    _atomic_save(path, lambda f: np.save(f, m))
    return m


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        from fuseflow.models import cache_dir as default_cache_dir

        cache_dir = default_cache_dir()
    return Path(cache_dir) / "vocab_maps"


def _atomic_save(path: Path, write: Callable) -> None:
    """Write through a temporary file and rename: concurrent teachers never read a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)
