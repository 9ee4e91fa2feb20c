"""Projection onto target positions and vocabulary (fuseflow/align/project.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fuseflow.align.project import align_scored, project_to_target
from fuseflow.align.sequence import align_offsets
from fuseflow.align.tokens import token_strings
from fuseflow.align.vocab import build_vocab_map
from fuseflow.models import builtin_text, encode
from fuseflow.sparse import ScoredText


def _random_scored(rng: np.random.Generator, n_tokens: int, vocab: int, k: int) -> ScoredText:
    probs = rng.dirichlet(np.full(k + 3, 0.5), size=n_tokens - 1)[:, :k]  # a top-k: mass < 1
    lp = np.sort(np.log(probs), axis=1)[:, ::-1].astype(np.float32)
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n_tokens - 1)]).astype(np.int32)
    pad = rng.random((n_tokens - 1, k)) < 0.1  # some rows are short: -inf padding at the end
    pad[:, 0] = False
    pad = np.cumsum(pad, axis=1) > 0
    lp[pad], ids[pad] = -np.inf, 0
    return ScoredText(
        token_ids=rng.integers(0, vocab, n_tokens).astype(np.int32), offsets=None, tokens=None,
        topk_ids=ids, topk_logprobs=lp, gold_logprobs=-np.abs(rng.normal(-2, 1, n_tokens - 1)).astype(np.float32),
    )


def _project_reference(scored, pos_map, vocab_map, target_ids, k):
    """One row at a time, with dicts: the obviously correct version."""
    t_len = len(target_ids) - 1
    ids = np.zeros((t_len, k), np.int32)
    lps = np.full((t_len, k), -np.inf, np.float32)
    gold = np.zeros(t_len, np.float32)
    aligned = np.zeros(t_len, bool)
    for t in range(t_len):
        j = int(pos_map[t])
        merged: dict[int, float] = {}
        if j >= 0:
            for sid, lp in zip(scored.topk_ids[j].tolist(), scored.topk_logprobs[j].tolist()):
                tid = int(vocab_map[sid]) if 0 <= sid < len(vocab_map) else -1
                if tid < 0 or not math.isfinite(lp):
                    continue
                merged[tid] = math.log(math.exp(merged[tid]) + math.exp(lp)) if tid in merged else lp
        if merged:
            best = sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
            for c, (tid, lp) in enumerate(best):
                ids[t, c], lps[t, c] = tid, lp
            gold[t] = scored.gold_logprobs[j]
            aligned[t] = True
        else:
            ids[t, 0], lps[t, 0] = target_ids[t + 1], 0.0
    return ids, lps, gold, aligned


@pytest.mark.parametrize("seed,k", [(0, 4), (1, 8), (2, 12), (3, 1)])
def test_projection_matches_per_row_reference(seed, k):
    rng = np.random.default_rng(seed)
    v_src, v_tgt, k_src = 60, 25, 8
    scored = _random_scored(rng, 40, v_src, k_src)
    scored.topk_ids[0, 1] = v_src + 5  # an id beyond the map (a padded embedding row): dropped
    vocab_map = rng.integers(-1, v_tgt, v_src).astype(np.int32)  # many-to-one and unmapped entries
    vocab_map[scored.topk_ids[5]] = -1  # one row loses every entry
    target_ids = rng.integers(0, v_tgt, 51).astype(np.int32)
    pos_map = rng.integers(-1, 39, 50).astype(np.int32)
    pos_map[7] = 5
    got = project_to_target(scored, pos_map, vocab_map, target_ids, k)
    got.validate()
    ids, lps, gold, aligned = _project_reference(scored, pos_map, vocab_map, target_ids, k)
    assert np.array_equal(got.aligned, aligned)
    assert not got.aligned[7] and got.ids[7, 0] == target_ids[8]
    assert np.array_equal(got.ids, ids)
    np.testing.assert_allclose(got.logprobs, lps, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got.gold_logprobs, gold)
    assert got.logprobs.dtype == np.float32 and got.ids.dtype == np.int32


def test_duplicates_merge_by_summing_probabilities():
    scored = ScoredText(
        token_ids=np.zeros(2, np.int32), offsets=None, tokens=None,
        topk_ids=np.array([[0, 1, 2, 3]], np.int32),
        topk_logprobs=np.log(np.array([[0.4, 0.3, 0.2, 0.1]], np.float32)),
        gold_logprobs=np.array([-1.5], np.float32),
    )
    got = project_to_target(scored, np.array([0]), np.array([7, 5, 7, -1], np.int32), np.array([0, 9]), 3)
    assert got.ids.tolist() == [[7, 5, 0]]
    np.testing.assert_allclose(np.exp(got.logprobs[0, :2]), [0.6, 0.3], rtol=1e-6)
    assert got.logprobs[0, 2] == -np.inf and got.gold_logprobs[0] == np.float32(-1.5)


def test_errors_name_the_problem():
    scored = ScoredText(np.zeros(3, np.int32), None, None, np.zeros((2, 2), np.int32),
                        np.zeros((2, 2), np.float32), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="pos_map"):
        project_to_target(scored, np.array([0]), np.arange(3, dtype=np.int32), np.arange(4), 2)
    with pytest.raises(ValueError, match="source row"):
        project_to_target(scored, np.array([0, 5, 1]), np.arange(3, dtype=np.int32), np.arange(4), 2)
    with pytest.raises(ValueError, match="align.sequence"):
        align_scored(scored, np.arange(4), None, None, np.arange(3, dtype=np.int32), "nope", 2)


@pytest.mark.parametrize("method", ["offsets", "mined-dp"])
def test_align_scored_on_tiny_tokenizers(method, spm_tokenizer, bpe_tokenizer, tmp_path):
    text = builtin_text(6_000)[1_000:6_000]
    s, t = encode(spm_tokenizer, text), encode(bpe_tokenizer, text)
    rng = np.random.default_rng(0)
    scored = _random_scored(rng, len(s.ids), len(spm_tokenizer), 10)
    scored.offsets = s.offsets
    src_strings, tgt_strings = token_strings(spm_tokenizer), token_strings(bpe_tokenizer)
    scored.tokens = [src_strings[i] for i in s.ids]
    vocab_map = build_vocab_map("mined", spm_tokenizer, bpe_tokenizer, cache_dir=tmp_path)
    got = align_scored(scored, t.ids, t.offsets, [tgt_strings[i] for i in t.ids], vocab_map, method, k=5)
    got.validate()
    assert got.num_positions == len(t.ids) - 1 and got.top_k == 5
    assert got.meta["sequence_method"] == method
    pos_map = align_offsets(s.offsets, t.offsets)
    assert got.aligned.mean() > 0.4
    if method == "offsets":
        assert np.array_equal(got.aligned, pos_map >= 0)  # the mined map leaves no text token unmapped
    else:  # string alignment around <unk> (tabs, newlines in this vocab) may rarely link wrongly
        assert (got.aligned & (pos_map < 0)).sum() <= 0.01 * got.aligned.sum()
    both = got.aligned & (pos_map >= 0)
    agree = got.gold_logprobs[both] == scored.gold_logprobs[pos_map[both]]
    assert agree.mean() > (0.99 if method == "mined-dp" else 1.0 - 1e-9)
    unaligned = ~got.aligned
    assert np.array_equal(got.ids[unaligned, 0], t.ids[1:][unaligned])
