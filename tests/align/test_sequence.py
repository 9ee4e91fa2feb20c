"""Sequence alignment (fuseflow/align/sequence.py): offsets and MinED DTW."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuseflow.align.sequence import SEQUENCE_ALIGNERS, align_mined_dp, align_offsets, dtw_path, token_starts
from fuseflow.align.tokens import token_strings, vocab_info
from fuseflow.models import builtin_text, encode


def _starts_reference(offsets) -> list[int]:
    """Where each token's text begins, one token at a time: after the text the earlier spans covered."""
    out, covered = [], 0
    for s, e in offsets.tolist():
        if e <= s or s < covered:
            out.append(-1)  # zero-width (special) or inside text already covered (a byte piece)
        else:
            out.append(covered)
        if e > s:
            covered = max(covered, e)
    return out


def _pos_map_reference(src_offsets, tgt_offsets) -> list[int]:
    src = _starts_reference(src_offsets)
    first_at = {}
    for j in range(len(src) - 1):
        if src[j + 1] >= 0:
            first_at.setdefault(src[j + 1], j)
    tgt = _starts_reference(tgt_offsets)
    return [first_at.get(tgt[t + 1], -1) if tgt[t + 1] >= 0 else -1 for t in range(len(tgt) - 1)]


def test_token_starts_handcrafted():
    # BOS, " Hello" with its space, "  " run, "world" whose span excludes the space before it, byte pieces.
    offsets = np.array([[0, 0], [0, 6], [6, 7], [8, 13], [13, 15], [14, 15], [14, 15], [15, 16]])
    assert token_starts(offsets).tolist() == [-1, 0, 6, 7, 13, -1, -1, 15]
    assert token_starts(offsets).tolist() == _starts_reference(offsets)


def test_leading_space_in_or_out_of_the_span_aligns_the_same():
    tgt = np.array([[0, 0], [0, 5], [5, 11], [11, 12]])  # Hello | Ġworld (5,11) | !
    src = np.array([[0, 0], [0, 5], [6, 11], [11, 12]])  # Hello | ▁world trimmed to (6,11) | !
    assert align_offsets(src, tgt).tolist() == [0, 1, 2]


def test_predicted_token_not_input_token():
    # Target splits "ab" in two, source keeps it whole: only the position predicting "a" has a partner,
    # and that partner is the source position predicting "ab" (FuseLLM issue #27 pairs inputs instead).
    tgt = np.array([[0, 0], [0, 1], [1, 2], [2, 3]])  # <s> a b c
    src = np.array([[0, 0], [0, 2], [2, 3]])  # <s> ab c
    assert align_offsets(src, tgt).tolist() == [0, -1, 1]


def test_double_space_split_differently_is_not_linked():
    # Gemma-3: ▁Hello | ▁▁ | world ; SmolLM2: ĠHello | Ġ | Ġworld (real tokenizations of " Hello  world").
    src = np.array([[0, 0], [0, 6], [6, 8], [8, 13]])
    tgt = np.array([[0, 6], [6, 7], [7, 13]])
    assert align_offsets(src, tgt).tolist() == [1, -1]  # "Ġ" ↔ "▁▁" (same text read); "Ġworld" ↔ nothing


def test_offsets_match_reference_on_tiny_tokenizers(spm_tokenizer, bpe_tokenizer):
    text = builtin_text(30_000)[10_000:30_000]
    s, t = encode(spm_tokenizer, text), encode(bpe_tokenizer, text)
    got = align_offsets(s.offsets, t.offsets)
    assert got.dtype == np.int32 and got.shape == (len(t.ids) - 1,)
    assert got.tolist() == _pos_map_reference(s.offsets, t.offsets)
    assert (got >= 0).mean() > 0.5


_ALPHABET = st.sampled_from(
    list("abcdefghij ABC,.;:'\"()-_=+0123456789") + [" ", " ", "  ", "\n", "\t", "é", "東", "😀", "ß"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(_ALPHABET, min_size=1, max_size=60))
def test_offsets_only_link_tokens_that_start_at_the_same_character(pieces, spm_tokenizer, bpe_tokenizer):
    text = "".join(pieces)
    for src_tok, tgt_tok in ((spm_tokenizer, bpe_tokenizer), (bpe_tokenizer, spm_tokenizer)):
        s, t = encode(src_tok, text), encode(tgt_tok, text)
        pos_map = align_offsets(s.offsets, t.offsets)
        assert pos_map.tolist() == _pos_map_reference(s.offsets, t.offsets)
        s_start, t_start = _starts_reference(s.offsets), _starts_reference(t.offsets)
        for tgt_t, j in enumerate(pos_map.tolist()):
            if j < 0:
                continue
            at = t_start[tgt_t + 1]
            assert at >= 0 and s_start[j + 1] == at
            # Independent of offsets: each predicted token's own text continues the text from there.
            rest = text[at:].encode("utf-8")
            for tok, ids, idx in ((tgt_tok, t.ids, tgt_t + 1), (src_tok, s.ids, j + 1)):
                info = vocab_info(tok)
                piece = info.strings[ids[idx]]
                if idx == 1 and piece.startswith(" ") and not text.startswith(" "):
                    piece = piece[1:]  # Metaspace's prefix ▁, which stands for no character of the text
                if not info.special[ids[idx]]:
                    assert rest.startswith(piece.encode("utf-8", "surrogateescape")), (text, at, piece)


def _dtw_reference(cost: np.ndarray) -> list[tuple[int, int]]:
    """FuseLLM's dtw (simpledtw): full matrix, Python loops, argmin over (diag, up, left) when walking back."""
    n, m = cost.shape
    d = np.full((n + 1, m + 1), np.inf)
    d[0, 0] = 0
    for i in range(n):
        for j in range(m):
            d[i + 1, j + 1] = cost[i, j] + min(d[i, j + 1], d[i + 1, j], d[i, j])
    d = d[1:, 1:]
    i, j, path = n - 1, m - 1, []
    while i > 0 or j > 0:
        path.append((i, j))
        options = [d[i - 1, j - 1] if i > 0 and j > 0 else np.inf, d[i - 1, j] if i > 0 else np.inf,
                   d[i, j - 1] if j > 0 else np.inf]
        move = int(np.argmin(options))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    path.append((0, 0))
    return path[::-1]


@pytest.mark.parametrize("seed", range(5))
def test_dtw_path_matches_fuselm_dtw(seed):
    rng = np.random.default_rng(seed)
    n, m = rng.integers(1, 30, 2)
    cost = rng.integers(0, 4, (n, m))
    lo, hi = np.zeros(n, np.int64), np.full(n, m, np.int64)
    pi, pj = dtw_path([cost[i] for i in range(n)], lo, hi)
    assert list(zip(pi.tolist(), pj.tolist())) == _dtw_reference(cost)


def _ids_to_strings(tok, ids):
    strings = token_strings(tok)
    return [strings[i] for i in ids]


@pytest.mark.parametrize("start", [0, 3000, 9000])
def test_mined_dp_equals_offsets_where_both_spell_the_text(start, spm_tokenizer, bpe_tokenizer):
    # Single-spaced ASCII words starting with a space: both tiny tokenizers spell every character (no
    # <unk>, no Metaspace prefix), so string alignment must recover exactly what the offsets give.
    words = [w for w in builtin_text(20_000)[start:].split() if w.isascii()][:300]
    text = " " + " ".join(words)
    s, t = encode(spm_tokenizer, text), encode(bpe_tokenizer, text)
    want = align_offsets(s.offsets, t.offsets)
    got = align_mined_dp(
        _ids_to_strings(spm_tokenizer, s.ids), _ids_to_strings(bpe_tokenizer, t.ids),
        vocab_info(spm_tokenizer).special[s.ids], vocab_info(bpe_tokenizer).special[t.ids],
    )
    assert got.tolist() == want.tolist()
    assert (want >= 0).mean() > 0.5


def test_mined_dp_resynchronises_after_unknown_characters(spm_tokenizer, bpe_tokenizer):
    # Tabs and newlines are <unk> in the tiny SentencePiece vocab: nothing may be linked wrongly, and
    # most positions are still found.
    text = builtin_text(12_000)[2_000:12_000]
    s, t = encode(spm_tokenizer, text), encode(bpe_tokenizer, text)
    want = align_offsets(s.offsets, t.offsets)
    got = align_mined_dp(
        _ids_to_strings(spm_tokenizer, s.ids), _ids_to_strings(bpe_tokenizer, t.ids),
        vocab_info(spm_tokenizer).special[s.ids], vocab_info(bpe_tokenizer).special[t.ids],
    )
    linked = got >= 0
    assert (got[linked] == want[linked]).mean() > 0.99
    assert linked.sum() > 0.6 * (want >= 0).sum()


def test_registry_and_errors():
    assert set(SEQUENCE_ALIGNERS) == {"offsets", "mined-dp"}
    with pytest.raises(ValueError, match="mined-dp"):
        SEQUENCE_ALIGNERS["offsets"](src_offsets=None, tgt_offsets=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="shape"):
        align_offsets(np.zeros((3, 3)), np.zeros((3, 2)))


def converted_tokenizer(name: str):
    """A pretrained tokenizer already converted under the user's cache (the tests' cache is a fresh tmp
    dir, and converting a GGUF here would take minutes); skip when there is none."""
    from pathlib import Path

    from fuseflow.models import load_tokenizer

    dirs = sorted((Path.home() / ".cache" / "fuseflow" / "hf").glob(f"{name}-*/tokenizer.json"))
    if not dirs:
        pytest.skip(f"{name} not converted yet (run fuseflow.models.load_tokenizer({name!r}) once)")
    return load_tokenizer(dirs[0].parent)


@pytest.mark.pretrained
def test_real_pair_mined_dp_equals_offsets():
    src, tgt = converted_tokenizer("gemma3-270m"), converted_tokenizer("smollm2-135m")
    text = builtin_text(50_000)[40_000:50_000]
    s, t = encode(src, text), encode(tgt, text)
    want = align_offsets(s.offsets, t.offsets)
    got = align_mined_dp(_ids_to_strings(src, s.ids), _ids_to_strings(tgt, t.ids),
                         vocab_info(src).special[s.ids], vocab_info(tgt).special[t.ids])
    assert (want >= 0).mean() > 0.85
    assert got.tolist() == want.tolist()
