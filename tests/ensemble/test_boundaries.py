"""Common token boundaries, against a character-by-character reference, on random spans and on real
tokenizer pairs with different space handling (byte-level BPE ``Ġ`` vs SentencePiece ``▁``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fuseflow.ensemble.boundaries import (
    common_boundary_mask,
    cut_at_token,
    first_boundary,
    own_token_mask,
    space_boundary_mask,
    token_boundary_mask,
    word_boundary_mask,
)


def reference_mask(offsets, start: int, length: int) -> np.ndarray:
    """Obviously correct and slow: p is a boundary iff a non-empty token ends at start + p and none spans it."""
    spans = [(int(s), int(e)) for s, e in offsets if e > s]
    out = np.zeros(length + 1, dtype=bool)
    for p in range(length + 1):
        q = start + p
        out[p] = any(e == q for _, e in spans) and not any(s < q < e for s, e in spans)
    return out


def random_offsets(rng: np.random.Generator, n_chars: int) -> np.ndarray:
    """A random segmentation of n_chars characters, with byte-split characters (repeated spans), a BOS
    (0, 0) and, sometimes, overlapping spans as SentencePiece's prepended ``▁`` gives."""
    cuts = np.unique(np.concatenate([[0, n_chars], rng.integers(1, n_chars, size=rng.integers(1, n_chars))]))
    spans = [(0, 0)]
    for s, e in zip(cuts[:-1], cuts[1:]):
        spans.extend([(s, e)] * int(rng.integers(1, 3)))
    if rng.random() < 0.5:
        a = int(rng.integers(0, n_chars - 1))
        spans.append((a, int(rng.integers(a + 1, n_chars + 1))))
    return np.asarray(spans, dtype=np.int32)


@pytest.mark.parametrize("seed", range(20))
def test_token_boundary_mask_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    offsets = random_offsets(rng, n)
    start = int(rng.integers(0, n))
    length = int(rng.integers(0, n - start + 5))  # the window may run past the text
    np.testing.assert_array_equal(token_boundary_mask(offsets, start, length), reference_mask(offsets, start, length))


def test_own_token_mask_ignores_unclean_prefixes():
    mask = own_token_mask(np.array([2, -1, 5, 9]), 6)  # 9 is past the window
    np.testing.assert_array_equal(np.flatnonzero(mask), [2, 5])


def test_first_boundary_excludes_the_end_unless_final():
    mask = np.array([True, False, False, True, False, True])  # n = 5
    assert first_boundary(mask) == 3
    assert first_boundary(mask, min_chars=4) is None
    assert first_boundary(mask, min_chars=4, include_end=True) == 5
    assert first_boundary(np.array([True]), include_end=True) is None  # an empty window has no position >= 1


@pytest.mark.parametrize("text", ["", "a", "one two, x_y 42.", "  héllo wörld!\n", "日本語 text", "a-b"])
def test_word_boundary_mask_matches_reference(text):
    ref = [p == 0 or p == len(text) or not ((text[p - 1].isalnum() or text[p - 1] == "_")
                                            and (text[p].isalnum() or text[p] == "_"))
           for p in range(len(text) + 1)]
    np.testing.assert_array_equal(word_boundary_mask(text), ref)


def test_cut_at_token_counts_tokens_after_the_window_start():
    offsets = np.array([[0, 0], [0, 3], [3, 5], [5, 9], [9, 12]])
    assert cut_at_token(offsets, 3, 1) == 2
    assert cut_at_token(offsets, 3, 3) == 9
    assert cut_at_token(offsets, 3, 4) is None
    assert cut_at_token(offsets, 3, 0) == 0


def _mask(tokenizer, text: str) -> np.ndarray:
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    return token_boundary_mask(np.asarray(enc["offset_mapping"]).reshape(-1, 2), 0, len(text))


def _check_pair(tok_a, tok_b, text: str) -> None:
    a, b = _mask(tok_a, text), _mask(tok_b, text)
    common = common_boundary_mask(np.stack([a, b]))
    np.testing.assert_array_equal(common, a & b)
    # Both tokenizers attach a space to the token after it: the end of a word followed by a space and another
    # word is a boundary for both, hence common (a word boundary in the paper's sense).
    word_ends = [i for i in range(1, len(text) - 1) if text[i] == " " and text[i - 1].isalnum() and text[i + 1].isalnum()]
    assert len(word_ends) > 20
    assert common[word_ends].all(), [text[i - 8 : i + 8] for i in word_ends if not common[i]][:5]
    # …and the tokenizations do differ: some boundaries of each are not boundaries of the other.
    assert (a & ~b).any() and (b & ~a).any()


def test_common_boundaries_bpe_vs_sentencepiece(bpe_tokenizer, spm_tokenizer):
    from fuseflow.models import builtin_text

    text = builtin_text(302_000)[300_000:]
    _check_pair(bpe_tokenizer, spm_tokenizer, text)
    # A concrete case: "Hello| world": 'lo' / 'o' end at 5 in both; 6 is inside BPE's 'Ġw…' but SentencePiece
    # has a lone '▁' ending there.
    sample = "Hello world, the answer is 42."
    common = common_boundary_mask(np.stack([_mask(bpe_tokenizer, sample), _mask(spm_tokenizer, sample)]))
    assert common[5] and not common[6]


def _pretrained_tokenizer(name: str):
    # The converted HF dirs live in the user's cache; the test session points FUSEFLOW_CACHE elsewhere.
    dirs = sorted((Path.home() / ".cache" / "fuseflow" / "hf").glob(f"{name}-*"))
    dirs = [d for d in dirs if (d / "tokenizer.json").exists()]
    if not dirs:
        pytest.skip(f"{name} is not converted in ~/.cache/fuseflow (fuseflow models prepare {name})")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(dirs[0]), local_files_only=True)


@pytest.mark.pretrained
def test_common_boundaries_smollm2_vs_gemma3():
    from fuseflow.models import builtin_text

    _check_pair(_pretrained_tokenizer("smollm2-135m"), _pretrained_tokenizer("gemma3-270m"), builtin_text(302_000)[300_000:])


@pytest.mark.parametrize("text", ["", " ", "a b", "one  two\n\nthree ", " 42", "x\t", "日本 語"])
def test_space_boundary_mask_matches_reference(text):
    """Whitespace joins the next word: no boundary right after a whitespace character, but at the end."""
    ref = [p == 0 or p == len(text) or not text[p - 1].isspace() for p in range(len(text) + 1)]
    np.testing.assert_array_equal(space_boundary_mask(text), ref)
