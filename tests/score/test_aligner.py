"""The teacher-side aligner (fuseflow/score/aligner.py) on a real hf engine: what reaches the projection."""

from __future__ import annotations

import numpy as np
import pytest

from fuseflow.align.sequence import align_offsets
from fuseflow.models import builtin_text, encode
from fuseflow.score.aligner import TeacherAligner
from fuseflow.score.engine import create_engine
from fuseflow.sparse import Sample

# Whitespace runs collapsed: the tiny SentencePiece vocabulary has no newline (an <unk>, which the DP must
# resynchronise across), and these tests are about everything else.
TEXTS = [" ".join(builtin_text(20_000)[i : i + 600].split()) for i in range(2_000, 14_000, 3_000)]


@pytest.fixture(scope="module")
def gemma_engine(tiny_gemma):
    return create_engine("hf", str(tiny_gemma))


def test_engine_token_strings_are_raw_and_mined_dp_links_as_offsets_do(gemma_engine, bpe_tokenizer):
    """The hf engine returns the tokenizer's raw strings ('▁der'); the DP compares normalised strings, so the
    aligner must normalise them (issue 21: as wired before, mined-dp linked 26 % of positions against 66 %)."""
    scored = gemma_engine.score_texts(TEXTS[:1], top_k=4)[0]
    assert scored.tokens is not None and any("▁" in t for t in scored.tokens)
    samples = [Sample(f"s{i}", t) for i, t in enumerate(TEXTS)]
    plain = dict(top_k=4, vocab_map_method="mined", chain_rule=False)
    dp = TeacherAligner("gemma", gemma_engine, bpe_tokenizer, sequence_method="mined-dp", **plain).run(samples)
    off = TeacherAligner("gemma", gemma_engine, bpe_tokenizer, sequence_method="offsets", **plain).run(samples)
    for a, b, s in zip(dp, off, samples):
        assert a.error is None and b.error is None
        pos_map = align_offsets(encode(gemma_engine.tokenizer, s.text).offsets, encode(bpe_tokenizer, s.text).offsets)
        assert b.dist.aligned.mean() == pytest.approx((pos_map >= 0).mean())
        # the DP finds the offsets' links, but for a few around the tiny vocabulary's <unk> (as wired before the
        # fix: 17-72 % of them, raw '▁' strings against normalised ' ')
        assert a.dist.aligned.sum() >= 0.9 * b.dist.aligned.sum()


def test_chain_rule_adds_rows_inside_teacher_tokens_and_keeps_the_linked_ones(gemma_engine, bpe_tokenizer):
    samples = [Sample(f"s{i}", t) for i, t in enumerate(TEXTS)]
    common = dict(top_k=8, vocab_map_method="first-token", sequence_method="offsets")
    plain = TeacherAligner("gemma", gemma_engine, bpe_tokenizer, chain_rule=False, **common).run(samples)
    chained = TeacherAligner("gemma", gemma_engine, bpe_tokenizer, chain_rule=True, **common).run(samples)
    gained = 0
    for a, b in zip(plain, chained):
        b.dist.validate()
        linked = a.dist.aligned
        assert b.dist.aligned[linked].all()
        assert np.array_equal(b.dist.ids[linked], a.dist.ids[linked])
        gained += int(b.dist.aligned.sum() - linked.sum())
    assert gained > 0  # a random tiny teacher still agrees with the text now and then


def test_more_candidates_are_scored_than_sent_and_the_engine_caps_them(gemma_engine, bpe_tokenizer, monkeypatch):
    """align.score_top_k: the teacher scores 32 candidates, the rows it sends hold top_k; an engine with a
    smaller max_top_k scores what it can."""
    samples = [Sample(f"s{i}", t) for i, t in enumerate(TEXTS)]
    asked = []
    real = gemma_engine.score_texts
    monkeypatch.setattr(gemma_engine, "score_texts", lambda texts, top_k, temperature=1.0: asked.append(top_k) or
                        real(texts, top_k=top_k, temperature=temperature))
    few = TeacherAligner("gemma", gemma_engine, bpe_tokenizer, top_k=4, score_top_k=4).run(samples)
    many = TeacherAligner("gemma", gemma_engine, bpe_tokenizer, top_k=4, score_top_k=32).run(samples)
    assert asked == [4, 32]
    for a, b in zip(few, many):
        assert b.dist.top_k == 4 and b.dist.aligned.sum() >= a.dist.aligned.sum()
    assert sum(int(b.dist.aligned.sum()) for b in many) > sum(int(a.dist.aligned.sum()) for a in few)
    monkeypatch.setattr(gemma_engine, "max_top_k", 16)
    assert TeacherAligner("gemma", gemma_engine, bpe_tokenizer, top_k=4, score_top_k=32).score_top_k == 16


def test_the_targets_own_tokenizer_gives_a_row_at_every_position(tiny_llama, bpe_tokenizer):
    """Same tokenizer on both sides: position t is position t, byte-level pieces of a character included
    (offsets link no position that begins inside a character)."""
    engine = create_engine("hf", str(tiny_llama))
    text = "Grüße aus Köln — 東京 and ✓ done. " * 3
    (res,) = TeacherAligner("self", engine, bpe_tokenizer, top_k=4).run([Sample("u", text)])
    enc = encode(bpe_tokenizer, text)
    assert (align_offsets(enc.offsets, enc.offsets) < 0).any()  # pieces inside characters: offsets skip them
    assert res.dist.aligned.all()
