"""The first-token map and the chain rule over strings (issue 21): fuseflow/align/vocab.py (TargetSplits),
fuseflow/align/project.py (chain_rule_rows), each against a slow reference that asks the tokenizers directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuseflow.align.project import align_scored, chain_rule_rows, project_to_target
from fuseflow.align.sequence import align_offsets, token_starts
from fuseflow.align.tokens import token_strings, vocab_info
from fuseflow.align.vocab import build_vocab_map, split_source_strings, target_splits
from fuseflow.models import builtin_text, encode
from fuseflow.sparse import ScoredText

TEXT = builtin_text(40_000)


def _reference_split(tgt_tokenizer, w: str) -> dict[int, int]:
    """{character of ``w``: target id of the token beginning there}, one string at a time, spelt out."""
    special = set(tgt_tokenizer.all_special_ids)
    first = tgt_tokenizer("a", add_special_tokens=False)["input_ids"]
    ctx = "" if "".join(token_strings(tgt_tokenizer)[i] for i in first) == "a" else "\n"
    text = ctx + w + ("a" if w[-1].isspace() else "")
    enc = tgt_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    out, covered = {}, 0
    for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
        if e > s and s >= covered:
            begin = covered - len(ctx)
            if 0 <= begin < len(w) and e - len(ctx) <= len(w) and tid not in special:
                out[begin] = tid
        if e > s:
            covered = max(covered, e)
    return out


@pytest.mark.parametrize("direction", ["spm->bpe", "bpe->spm"])
def test_target_splits_match_the_tokenizer_string_by_string(direction, spm_tokenizer, bpe_tokenizer):
    src_tok, tgt_tok = (spm_tokenizer, bpe_tokenizer) if direction == "spm->bpe" else (bpe_tokenizer, spm_tokenizer)
    src = vocab_info(src_tok)
    splits = split_source_strings(src, vocab_info(tgt_tok), tgt_tok)
    rng = np.random.default_rng(0)
    checked = 0
    for v in rng.choice(src.size, 200, replace=False):
        w = src.strings[v]
        got = splits.next_id[splits.ptr[v] : splits.ptr[v + 1]]
        assert len(got) == len(w)
        if src.special[v] or not w or any(0xD800 <= ord(ch) < 0xE000 for ch in w):
            assert (got == -1).all()
            continue
        ref = _reference_split(tgt_tok, w)
        assert {o: int(t) for o, t in enumerate(got) if t >= 0} == ref, (v, w)
        assert "".join(chr(c) for c in splits.codes[splits.ptr[v] : splits.ptr[v + 1]]) == w
        checked += 1
    assert checked > 120  # the byte-level vocabulary spends ~60 ids on partial UTF-8 characters


def test_first_token_map_sends_whole_words_to_their_first_piece(spm_tokenizer, bpe_tokenizer, tmp_path):
    """The look-alike failure of MinED (issue 21: ' wird' → ' bird'): here every mapped source token's text
    begins with its target token's text, which MinED does not give."""
    src, tgt = vocab_info(spm_tokenizer), vocab_info(bpe_tokenizer)
    first = build_vocab_map("first-token", spm_tokenizer, bpe_tokenizer, cache_dir=tmp_path)
    mined = build_vocab_map("mined", spm_tokenizer, bpe_tokenizer, cache_dir=tmp_path)
    text_ids = np.flatnonzero(~src.special & (first >= 0))
    assert len(text_ids) > 0.9 * (~src.special).sum()
    def spelt(s: str) -> bytes:  # a byte-level piece of a character is a lone surrogate (tokens.py)
        return s.encode("utf-8", "surrogateescape")

    prefix = [spelt(src.strings[v]).startswith(spelt(tgt.strings[first[v]])) for v in text_ids]
    assert all(prefix)
    mined_prefix = [spelt(src.strings[v]).startswith(spelt(tgt.strings[mined[v]])) for v in text_ids if mined[v] >= 0]
    assert np.mean(mined_prefix) < 0.95  # the look-alikes this map exists to avoid
    # Role tokens are paired as in every map; the cache serves the same array again.
    assert first[src.roles["eos"]] == tgt.roles["eos"]
    assert np.array_equal(build_vocab_map("first-token", spm_tokenizer, bpe_tokenizer, cache_dir=tmp_path), first)


def _dense_scored(rng, src_tokenizer, text: str, skill: float = 2.0) -> ScoredText:
    """A teacher whose 'top-k' is its whole vocabulary: every row a full, peaked distribution that favours the
    real next token by ``skill`` (a logit bonus, on average)."""
    enc = encode(src_tokenizer, text)
    v = len(src_tokenizer)
    n = len(enc.ids) - 1
    logits = rng.normal(0, 3, (n, v))
    logits[np.arange(n), enc.ids[1:]] += rng.normal(skill, 2, n)  # the real next token is often likely
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    order = np.argsort(-lp, axis=1, kind="stable")
    return ScoredText(
        token_ids=enc.ids, offsets=enc.offsets, tokens=None,
        topk_ids=order.astype(np.int32), topk_logprobs=np.take_along_axis(lp, order, 1).astype(np.float32),
        gold_logprobs=lp[np.arange(n), enc.ids[1:]].astype(np.float32),
    )


def _reference_inner(scored: ScoredText, text: str, tgt_offsets, pos_map, src_tokenizer, tgt_tokenizer):
    """{target position: ({target id: conditional prob}, gold conditional logprob)}: the dense teacher
    distribution at the source token's position, conditioned on the text read so far and marginalised to the
    target token each candidate's text begins with next, position by position, with the tokenizers asked."""
    strings = token_strings(src_tokenizer)
    s_start = token_starts(scored.offsets)
    t_start = token_starts(tgt_offsets)[1:]
    splits_cache: dict[int, dict[int, int]] = {}
    out = {}
    for t, c in enumerate(t_start):
        if pos_map[t] >= 0 or c < 0:
            continue
        qs = [q for q in range(1, len(s_start)) if 0 <= s_start[q] < c < scored.offsets[q][1]]
        if not qs:
            continue
        q = qs[-1]
        a, o = int(s_start[q]), int(c - s_start[q])
        seen = text[a:c]
        mass: dict[int, float] = {}
        z, own_counted = 0.0, False
        for v, lp in zip(scored.topk_ids[q - 1].tolist(), scored.topk_logprobs[q - 1].tolist()):
            w = strings[v]
            if vocab_info(src_tokenizer).special[v] or len(w) <= o or not w.startswith(seen):
                continue
            if any(0xD800 <= ord(ch) < 0xE000 for ch in w):
                continue
            if v not in splits_cache:
                splits_cache[v] = _reference_split(tgt_tokenizer, w)
            nxt = splits_cache[v].get(o)
            if nxt is not None:
                mass[nxt] = mass.get(nxt, 0.0) + math.exp(lp)
                z += math.exp(lp)
                own_counted = own_counted or v == scored.token_ids[q]
        if not own_counted:  # the teacher's own token is the text: it agrees, in the top-k and split or not
            z += math.exp(float(scored.gold_logprobs[q - 1]))
        if mass:
            out[t] = ({x: m / z for x, m in mass.items()}, float(scored.gold_logprobs[q - 1]) - math.log(z))
    return out


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), start=st.integers(0, 30_000), length=st.integers(40, 300))
def test_chain_rule_rows_equal_the_dense_reference(seed, start, length, spm_tokenizer, bpe_tokenizer):
    text = TEXT[start : start + length]
    if len(text.strip()) < 10:
        return
    rng = np.random.default_rng(seed)
    scored = _dense_scored(rng, spm_tokenizer, text)
    tgt = encode(bpe_tokenizer, text)
    pos_map = align_offsets(scored.offsets, tgt.offsets)
    splits = target_splits(spm_tokenizer, bpe_tokenizer)
    inner = chain_rule_rows(scored, text, tgt.offsets, pos_map, splits)
    ref = _reference_inner(scored, text, tgt.offsets, pos_map, spm_tokenizer, bpe_tokenizer)
    assert sorted(inner.rows.tolist()) == sorted(ref)
    k = len(spm_tokenizer)
    dist = project_to_target(scored, pos_map, np.full(k, -1, np.int32), tgt.ids, k, inner=inner)
    for t, (probs, gold) in ref.items():
        assert dist.aligned[t]
        row = {int(i): math.exp(lp) for i, lp in zip(dist.ids[t], dist.logprobs[t]) if np.isfinite(lp)}
        assert row.keys() == probs.keys()
        for x, p in probs.items():
            assert row[x] == pytest.approx(p, rel=1e-4, abs=1e-7)
        assert dist.gold_logprobs[t] == pytest.approx(gold, abs=1e-4)
    # every other position: no teacher row at all (the vocab map above maps nothing)
    assert not dist.aligned[np.setdiff1d(np.arange(dist.num_positions), list(ref))].any()


def test_chain_rule_counts_the_teachers_own_token_when_outside_its_top_k(spm_tokenizer, bpe_tokenizer):
    """With a real top-k the gold source token may be missing: its known logprob still normalises the row."""
    text = TEXT[2_000:2_400]
    rng = np.random.default_rng(3)
    dense = _dense_scored(rng, spm_tokenizer, text)
    tgt = encode(bpe_tokenizer, text)
    pos_map = align_offsets(dense.offsets, tgt.offsets)
    splits = target_splits(spm_tokenizer, bpe_tokenizer)
    full = chain_rule_rows(dense, text, tgt.offsets, pos_map, splits)
    k = 8
    cut = ScoredText(dense.token_ids, dense.offsets, None, dense.topk_ids[:, :k].copy(),
                     dense.topk_logprobs[:, :k].copy(), dense.gold_logprobs)
    top = chain_rule_rows(cut, text, tgt.offsets, pos_map, splits)
    assert set(top.rows.tolist()) <= set(full.rows.tolist()) and len(top.rows) > 0
    for r, t in enumerate(top.rows):
        live = top.ids[r] >= 0
        total = np.exp(top.logprobs[r][live]).sum()
        assert total <= 1 + 1e-6 and np.isfinite(top.gold[r]) and top.gold[r] <= 1e-6
    # Truncating to the top-k never adds mass: each kept candidate's conditional is at least its dense one.
    full_by_row = {int(t): i for i, t in enumerate(full.rows)}
    for r, t in enumerate(top.rows):
        fr = full_by_row[int(t)]
        assert top.gold[r] >= full.gold[fr] - 1e-5


def test_align_scored_gives_a_teacher_row_to_most_target_positions(spm_tokenizer, bpe_tokenizer, tmp_path):
    text = TEXT[5_000:9_000]
    rng = np.random.default_rng(1)
    dense = _dense_scored(rng, spm_tokenizer, text, skill=8.0)  # a teacher that knows the text, as a real one
    k = 10
    scored = ScoredText(dense.token_ids, dense.offsets, None, dense.topk_ids[:, :k].copy(),
                        dense.topk_logprobs[:, :k].copy(), dense.gold_logprobs)
    tgt = encode(bpe_tokenizer, text)
    vmap = build_vocab_map("first-token", spm_tokenizer, bpe_tokenizer, cache_dir=tmp_path)
    plain = align_scored(scored, tgt.ids, tgt.offsets, None, vmap, "offsets", k)
    chained = align_scored(scored, tgt.ids, tgt.offsets, None, vmap, "offsets", k, text=text,
                           splits=target_splits(spm_tokenizer, bpe_tokenizer, tmp_path))
    chained.validate()
    assert chained.aligned.mean() > plain.aligned.mean() + 0.05
    assert np.array_equal(chained.aligned[plain.aligned], plain.aligned[plain.aligned])  # linked rows unchanged
    same = plain.aligned
    assert np.array_equal(chained.ids[same], plain.ids[same])
    assert np.array_equal(chained.gold_logprobs[same], plain.gold_logprobs[same])
