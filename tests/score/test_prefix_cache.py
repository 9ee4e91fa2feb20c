"""Prefix KV-cache reuse in the hf engine's generate: the same tokens and logprobs as without it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuseflow.models import load
from fuseflow.score.hf_engine import HFEngine
from fuseflow.score.prefix_cache import PrefixCache, common_prefix_length


@given(st.lists(st.integers(0, 3), max_size=12), st.lists(st.integers(0, 3), max_size=12))
def test_common_prefix_length_matches_a_loop(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    assert common_prefix_length(np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)) == n


def test_bad_size():
    with pytest.raises(ValueError, match="prefix_cache must be >= 0"):
        PrefixCache(-1)


@pytest.fixture(scope="module")
def models(tiny_llama, tiny_gemma, tiny_qwen):
    return {"llama": load(tiny_llama), "gemma": load(tiny_gemma), "qwen": load(tiny_qwen)}


def conversation(engine: HFEngine, prompt: np.ndarray, rng: np.random.Generator, steps: int = 6):
    """Cool-Fusion's pattern: each step continues the context, then the context grows by an accepted
    segment that is sometimes this source's own proposal and sometimes another text."""
    out = []
    context = prompt
    for step in range(steps):
        g = engine.generate(context, max_new_tokens=4, temperature=0.8 if step % 2 else 0.0, seed=step)
        out.append((g.token_ids.tolist(), g.logprobs))
        accepted = g.token_ids[:2] if step % 3 else rng.integers(5, 200, size=3).astype(np.int32)
        context = np.concatenate([context, accepted])
    again = engine.generate(prompt, max_new_tokens=3)  # back to a prefix of what is cached
    none = engine.generate(context, max_new_tokens=0)  # nothing generated: the cache is put back as it is
    out.append((again.token_ids.tolist(), again.logprobs))
    out.append((none.token_ids.tolist(), none.logprobs))
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma", "qwen"])
def test_generations_with_the_prefix_cache_equal_those_without(models, arch):
    lm = models[arch]
    prompt = np.asarray(lm.tokenizer("The class statement defines")["input_ids"], dtype=np.int32)
    plain = conversation(HFEngine(lm, prefix_cache=0), prompt, np.random.default_rng(0))
    engine = HFEngine(lm, prefix_cache=2)
    cached = conversation(engine, prompt, np.random.default_rng(0))
    assert engine.prefix_cache.reused_tokens > 6 * len(prompt)  # most of every context came from the cache
    for (t1, lp1), (t2, lp2) in zip(plain, cached):
        assert t1 == t2
        np.testing.assert_allclose(lp2, lp1, atol=1e-4, rtol=0)


def test_a_sliding_window_that_cannot_roll_back_falls_back_to_a_full_run(tiny_gemma, tmp_path):
    """Gemma-3's sliding-window layers drop states past the window; cropping back into them is impossible,
    so the engine runs the prompt from scratch — the output is the same either way."""
    import json
    import shutil

    path = tmp_path / "gemma-window-8"
    shutil.copytree(tiny_gemma, path)
    config = json.loads((path / "config.json").read_text())
    config["sliding_window"] = 8
    (path / "config.json").write_text(json.dumps(config))
    lm = load(path)
    prompt = np.asarray(lm.tokenizer("The class statement defines a new class object")["input_ids"], dtype=np.int32)
    assert len(prompt) > 8
    plain = conversation(HFEngine(lm, prefix_cache=0), prompt, np.random.default_rng(1))
    cached = conversation(HFEngine(lm, prefix_cache=4), prompt, np.random.default_rng(1))
    for (t1, lp1), (t2, lp2) in zip(plain, cached):
        assert t1 == t2
        np.testing.assert_allclose(lp2, lp1, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma", "qwen"])
def test_score_tails_equal_score_ids_and_reuse_the_context(models, arch):
    """Cool-Fusion's rerank: candidates continuing one context, scored after a generation of that context.
    The tail logprobs equal score_ids' gold logprobs; the context is not run again."""
    lm = models[arch]
    engine = HFEngine(lm, prefix_cache=4)
    rng = np.random.default_rng(3)
    context = np.asarray(lm.tokenizer("The class statement defines a new class")["input_ids"], dtype=np.int64)
    engine.generate(context, max_new_tokens=4)
    before = engine.prefix_cache.reused_tokens
    seqs = [np.concatenate([context, rng.integers(5, 300, size=n)]) for n in (1, 3, 6)]
    starts = [len(context) - 2, len(context), len(context) + 2]
    tails = engine.score_tails(seqs, starts)
    assert engine.prefix_cache.reused_tokens - before >= 3 * (len(context) - 3)
    full = engine.score_ids(seqs, top_k=1)
    for seq, start, tail, scored in zip(seqs, starts, tails, full):
        assert tail.shape == (len(seq) - start,) and tail.dtype == np.float32
        np.testing.assert_allclose(tail, scored.gold_logprobs[start - 1 :], atol=1e-4, rtol=0)
    assert engine.score_tails([seqs[0]], [len(seqs[0])])[0].shape == (0,)


def test_score_tails_errors(models):
    from fuseflow.score.engine import ScoreError

    engine = HFEngine(models["llama"])
    with pytest.raises(ScoreError, match="start must be in"):
        engine.score_tails([np.arange(5)], [0])
    with pytest.raises(ScoreError, match="outside"):
        engine.score_tails([np.array([1, 10**6])], [1])
    with pytest.raises(ScoreError, match="2 sequences but 1 starts"):
        engine.score_tails([np.arange(5), np.arange(4)], [1])
