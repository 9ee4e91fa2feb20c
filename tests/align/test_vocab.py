"""Vocabulary maps (fuseflow/align/vocab.py) against brute-force references."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from fuseflow.align import vocab as vocab_mod
from fuseflow.align.levenshtein import levenshtein_python
from fuseflow.align.tokens import as_numpy_strings, vocab_info
from fuseflow.align.vocab import VOCAB_MAPS, build_vocab_map, exact_map, mined_map, role_map, stats_map


def _vocab(rng: random.Random, n: int, alphabet: str = "abcde ") -> list[str]:
    out = set()
    while len(out) < n:
        out.add("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7))))
    return sorted(out, key=lambda _: rng.random())


def _brute_mined(src: list[str], tgt: list[str], tgt_skip: set[int]) -> list[tuple[int, int]]:
    """FuseLLM's find_best_mapping, as a plain loop: (target id, distance) per source token."""
    out = []
    for s in src:
        best = min((levenshtein_python(s, t), j) for j, t in enumerate(tgt) if j not in tgt_skip)
        out.append((best[1], best[0]))
    return out


def test_exact_map_matches_dict():
    rng = random.Random(0)
    src, tgt = _vocab(rng, 300), _vocab(rng, 200)
    tgt_skip = np.zeros(len(tgt), bool)
    tgt_skip[:5] = True
    got = exact_map(as_numpy_strings(src), as_numpy_strings(tgt), None, tgt_skip)
    lookup = {t: j for j, t in enumerate(tgt) if not tgt_skip[j]}
    assert got.tolist() == [lookup.get(s, -1) for s in src]
    assert (got >= 0).sum() > 10  # the test exercises matches, not only misses


def test_mined_with_full_window_is_global_minimum():
    rng = random.Random(1)
    src, tgt = _vocab(rng, 120), _vocab(rng, 60)
    skip = np.zeros(len(tgt), bool)
    skip[[3, 7]] = True
    got, dist = mined_map(
        as_numpy_strings(src), as_numpy_strings(tgt), None, skip, window=len(tgt), return_distance=True
    )
    ref = _brute_mined(src, tgt, {3, 7})
    assert got.tolist() == [j for j, _ in ref]
    assert dist.tolist() == [d for _, d in ref]


def test_mined_pruned_is_consistent_and_certified_at_distance_one():
    rng = random.Random(2)
    src, tgt = _vocab(rng, 400, "abcdefgh "), _vocab(rng, 300, "abcdefgh ")
    got, dist = mined_map(as_numpy_strings(src), as_numpy_strings(tgt), window=2, return_distance=True)
    ref = _brute_mined(src, tgt, set())
    for i, s in enumerate(src):
        assert dist[i] == levenshtein_python(s, tgt[got[i]])  # the reported distance is the real one
        assert dist[i] >= ref[i][1]  # pruning can only lose the minimum, never beat it
        if dist[i] <= 1:
            assert dist[i] == ref[i][1]
    assert (dist == np.array([d for _, d in ref])).mean() > 0.6  # and usually finds it


def test_stats_map_matches_counter():
    rng = np.random.default_rng(3)
    src_ids = rng.integers(0, 20, 500)
    tgt_ids = (src_ids * 3 + rng.integers(0, 3, 500)) % 30
    fallback = np.full(25, -7, dtype=np.int32)
    got = stats_map(src_ids, tgt_ids, 25, 30, fallback)
    counts: dict[int, Counter] = {}
    for s, t in zip(src_ids.tolist(), tgt_ids.tolist()):
        counts.setdefault(s, Counter())[t] += 1
    for s in range(25):
        if s in counts:
            top = max(counts[s].values())
            assert got[s] == min(t for t, c in counts[s].items() if c == top)
        else:
            assert got[s] == -7


def test_role_map_pairs_specials():
    m = role_map({"bos": 1, "eos": 2, "pad": 2}, {"bos": 5, "eos": 6, "pad": 7, "unk": 8}, 4)
    assert m.tolist() == [-1, 5, 6, -1]  # eos wins over pad for the shared id


@pytest.mark.parametrize("method", ["exact", "mined", "stats"])
def test_build_vocab_map_tiny(method, spm_tokenizer, bpe_tokenizer, tmp_path):
    from fuseflow.models import builtin_text

    texts = builtin_text(20_000).split("\n\n")[:40]
    m = build_vocab_map(method, spm_tokenizer, bpe_tokenizer, texts=texts, cache_dir=tmp_path)
    src, tgt = vocab_info(spm_tokenizer), vocab_info(bpe_tokenizer)
    assert m.shape == (len(spm_tokenizer),) and m.dtype == np.int32
    assert m[spm_tokenizer.bos_token_id] == bpe_tokenizer.bos_token_id
    normal = np.flatnonzero(~src.special)
    mapped = m[normal]
    assert not tgt.special[mapped[mapped >= 0]].any()  # no text token maps onto a special one
    exact = [i for i in normal if src.strings[i] in set(tgt.strings)]
    if method in ("exact", "mined"):
        assert all(tgt.strings[m[i]] == src.strings[i] for i in exact)
    if method == "mined":
        assert (mapped >= 0).all()
    assert len(list((tmp_path / "vocab_maps").glob(f"{method}-*.npy"))) == 1


def test_build_vocab_map_uses_disk_cache(spm_tokenizer, bpe_tokenizer, tmp_path, monkeypatch):
    first = build_vocab_map("exact", spm_tokenizer, bpe_tokenizer, cache_dir=tmp_path)
    monkeypatch.setitem(VOCAB_MAPS, "exact", lambda *a, **k: pytest.fail("recomputed a cached map"))
    again = build_vocab_map("exact", spm_tokenizer, bpe_tokenizer, cache_dir=tmp_path)
    assert np.array_equal(first, again)


def test_identical_tokenizers_short_circuit(bpe_tokenizer, tmp_path):
    m = build_vocab_map("mined", bpe_tokenizer, bpe_tokenizer, cache_dir=tmp_path)
    assert np.array_equal(m, np.arange(len(bpe_tokenizer)))
    assert not (tmp_path / "vocab_maps").exists()


def test_unknown_method_names_the_config_field(bpe_tokenizer, spm_tokenizer):
    with pytest.raises(ValueError, match="align.vocab_map"):
        build_vocab_map("nope", spm_tokenizer, bpe_tokenizer)


def test_stats_needs_texts(bpe_tokenizer, spm_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="texts"):
        build_vocab_map("stats", spm_tokenizer, bpe_tokenizer, texts=None, cache_dir=tmp_path)


def test_registry_entries_cite_papers():
    for name in ("mined", "stats"):
        assert "arXiv" in (VOCAB_MAPS[name].__doc__ or ""), name
    assert set(VOCAB_MAPS) >= {"exact", "mined", "stats"}
    assert vocab_mod.mined_map.__doc__ and "miss" in vocab_mod.mined_map.__doc__
