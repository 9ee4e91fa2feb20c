"""Vocabulary maps: for every source (teacher) token id, the target token id it is projected onto.

A map is ``np.ndarray [V_src] int32`` with ``-1`` for source tokens that have no target counterpart
(their probability mass is dropped by :func:`fuseflow.align.project.project_to_target`). Methods are
registered with :func:`vocab_map` and chosen by the config field ``align.vocab_map``:

- ``exact``  — identical normalised strings (:mod:`fuseflow.align.tokens`);
- ``mined``  — FuseLLM's MinED: exact, else the target token at minimum edit distance;
- ``stats``  — FuseChat's statistics-based alignment: the target token most often aligned with the source
  token over a corpus, MinED for tokens never seen.

In every method special tokens are paired by role (bos/eos/pad/unk) and otherwise left unmapped.
:func:`build_vocab_map` caches each map on disk, keyed by both vocabularies (and the texts, for ``stats``).
"""

from __future__ import annotations

import hashlib
import logging
import os
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
    "token_strings",
]

log = logging.getLogger(__name__)

# Bump when a method's output changes, so stale maps on disk are not reused.
_CACHE_VERSION = "1"

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


@vocab_map("stats")
def _stats(src: VocabInfo, tgt: VocabInfo, *, src_tokenizer, tgt_tokenizer, texts, cache_dir=None, **_) -> np.ndarray:
    """Statistics-based (FuseChat, arXiv 2402.16107 §3.2): most frequent co-aligned target token over
    ``texts`` (offsets alignment), MinED for source tokens the texts never produce."""
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
    fallback = build_vocab_map("mined", src_tokenizer, tgt_tokenizer, cache_dir=cache_dir)  # cached on disk too
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
    if cache_dir is None:
        from fuseflow.models import cache_dir as default_cache_dir

        cache_dir = default_cache_dir()
    path = Path(cache_dir) / "vocab_maps" / f"{method}-{key.hexdigest()[:16]}.npy"
    if path.exists():
        m = np.load(path)
        if m.shape == (src.size,) and m.dtype == np.int32:
            return m
        log.warning("ignoring vocab map %s: shape %s, expected (%d,)", path, m.shape, src.size)
    m = VOCAB_MAPS[method](
        src, tgt, src_tokenizer=src_tokenizer, tgt_tokenizer=tgt_tokenizer, texts=texts, cache_dir=cache_dir
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
    np.save(tmp, m)
    os.replace(tmp, path)  # atomic: concurrent teachers never read a half-written map
    return m
