"""The Cool-Fusion decoder: with scripted teachers (real tokenizers, known preferences) for the rules, and
with tiny random models for determinism and the one-source case."""

from __future__ import annotations

import numpy as np
import pytest

from fuseflow.ensemble.boundaries import token_boundary_mask
from fuseflow.ensemble.decoder import CoolFusionDecoder, DecodeParams, generate_single, stream_single
from fuseflow.ensemble.sources import completion_prompt

from ensemble_scripted import scripted_source

PROMPT = "Count:"


def _decode(sources, params=DecodeParams(max_tokens=64), prompt=PROMPT, **kw):
    decoder = CoolFusionDecoder(sources, **kw)
    return decoder.generate(completion_prompt(sources, prompt), params)


# ----------------------------------------------------------------------------------------------------------
# Rules, with scripted teachers.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rerank", ["mean_perplexity", "mean_logprob", "mean_bits_per_byte"])
def test_candidate_both_sources_like_wins_until_eos(bpe_tokenizer, spm_tokenizer, rerank):
    a = scripted_source("a", bpe_tokenizer, " one two three four", likes="one two three four")
    b = scripted_source("b", spm_tokenizer, " alpha beta gamma", likes="alpha beta gamma one two three four")
    c = _decode([a, b], rerank=rerank)
    assert c.text == " one two three four"
    assert c.finish_reason == "stop"
    # The last segment is " four" + a's EOS: the end of a final proposal is a boundary.
    assert [s.text for s in c.segments] == [" one", " two", " three", " four"]
    assert all(s.winner == "a" for s in c.segments)
    assert c.segments[-1].final and not any(s.final for s in c.segments[:-1])
    for s in c.segments:
        assert s.at_common_boundary
        assert {x["text"] for x in s.candidates} == {s.text, " alpha"}
        assert max(s.candidates, key=lambda x: x["score"])["text"] == s.text


def test_other_sources_retokenize_the_winner_and_the_proposer_keeps_its_ids(bpe_tokenizer, spm_tokenizer):
    a = scripted_source("a", bpe_tokenizer, " one two", likes="alpha beta gamma")
    b = scripted_source("b", spm_tokenizer, " alpha beta gamma", likes="alpha beta gamma")
    c = _decode([a, b])
    assert c.text == " alpha beta gamma" and c.finish_reason == "stop"
    assert [s.winner for s in c.segments] == ["b"] * 3  # " alpha", " beta", " gamma" + EOS
    calls_a, calls_b = a.teacher.generate_calls, b.teacher.generate_calls
    # a did not propose " alpha": it continues from its own tokenization of the text.
    np.testing.assert_array_equal(calls_a[1], bpe_tokenizer(PROMPT + " alpha")["input_ids"])
    # b proposed it: its context grows by exactly the ids it generated, then the ids it had generated past the
    # cut (its carry) start its next proposal instead of being thrown away.
    enc = spm_tokenizer(PROMPT + " alpha", return_offsets_mapping=True, add_special_tokens=False)
    own = [i for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]) if e > len(PROMPT)]
    np.testing.assert_array_equal(calls_b[1][: len(calls_b[0]) + len(own)], np.concatenate([calls_b[0], own]))
    carried = spm_tokenizer.decode(calls_b[1], skip_special_tokens=True)
    assert len(calls_b[1]) > len(calls_b[0]) + len(own) and (PROMPT + " alpha beta gamma").startswith(carried)


def test_stop_string_cuts_and_streaming_holds_back(bpe_tokenizer, spm_tokenizer):
    likes = "one two three four"
    a = scripted_source("a", bpe_tokenizer, " one two three four", likes=likes)
    b = scripted_source("b", spm_tokenizer, " one two three four", likes=likes)
    params = DecodeParams(max_tokens=64, stop=(" thr",))
    decoder = CoolFusionDecoder([a, b])
    events = list(decoder.stream(completion_prompt([a, b], PROMPT), params))
    completion = events[-1].completion
    assert completion.text == " one two" and completion.finish_reason == "stop"
    assert "".join(e.delta for e in events) == completion.text
    assert all("thr" not in e.delta for e in events)
    # " two" could not be shown before " three" arrived? It could: no stop string starts with "o".
    assert events[1].delta == " two"


def test_max_tokens_counts_the_first_sources_tokens(bpe_tokenizer, spm_tokenizer):
    script = " one two three four"
    a = scripted_source("a", bpe_tokenizer, script, likes=script)
    b = scripted_source("b", spm_tokenizer, script, likes=script)
    enc = bpe_tokenizer(PROMPT + script, return_offsets_mapping=True)
    ends = [e for s, e in enc["offset_mapping"] if e > len(PROMPT)]
    for n in (1, 3, 5):
        c = _decode([a, b], DecodeParams(max_tokens=n))
        assert c.finish_reason == "length"
        assert c.completion_tokens == n
        assert c.text == (PROMPT + script)[len(PROMPT) : ends[n - 1]]
    assert _decode([a, b], DecodeParams(max_tokens=0)).text == ""


def test_prompt_errors_name_the_fix(bpe_tokenizer):
    a = scripted_source("a", bpe_tokenizer, " x", likes="x", max_length=8)
    with pytest.raises(ValueError, match="not less than its max_length"):
        _decode([a], prompt="word " * 20)


def test_duplicate_source_names_and_unknown_rerank_are_refused(bpe_tokenizer):
    a = scripted_source("a", bpe_tokenizer, " x", likes="x")
    with pytest.raises(ValueError, match="unique"):
        CoolFusionDecoder([a, a])
    with pytest.raises(ValueError, match="decoding.rerank"):
        CoolFusionDecoder([a], rerank="best")


@pytest.mark.parametrize("streaming", [False, True], ids=["window", "stop_when"])
def test_identical_candidates_are_not_scored_and_every_proposer_is_credited(bpe_tokenizer, spm_tokenizer, streaming):
    script = " one two three"
    a = scripted_source("a", bpe_tokenizer, script, likes=script, streaming=streaming)
    b = scripted_source("b", spm_tokenizer, script, likes=script, streaming=streaming)
    c = _decode([a, b])
    assert c.text == script and c.finish_reason == "stop"
    assert a.teacher.score_calls == b.teacher.score_calls == 0  # the single-candidate shortcut
    for s in c.segments:
        assert not s.contested and s.proposers == ["a", "b"] and len(s.candidates) == 1


def test_distinct_candidates_are_scored_once_per_source_per_step(bpe_tokenizer, spm_tokenizer):
    a = scripted_source("a", bpe_tokenizer, " one two", likes="alpha beta")
    b = scripted_source("b", spm_tokenizer, " alpha beta", likes="alpha beta")
    c = _decode([a, b])
    assert c.text == " alpha beta"
    contested = sum(s.contested for s in c.segments)
    assert contested >= 1
    # A proposer scores its own candidate from its generation: each source scores only the other's, once.
    assert a.teacher.score_calls == b.teacher.score_calls == contested


@pytest.mark.parametrize("streaming", [False, True], ids=["window", "stop_when"])
def test_whitespace_joins_the_next_word(bpe_tokenizer, spm_tokenizer, streaming):
    """No segment is only whitespace or ends on it (but the final one): a space or newline before a word,
    a digit or punctuation belongs to that word's segment."""
    script = " 4 2 apples.\n\nQuestion:  how  many ?\n"
    a = scripted_source("a", bpe_tokenizer, script, likes=script, streaming=streaming)
    b = scripted_source("b", spm_tokenizer, script, likes=script, streaming=streaming)
    c = _decode([a, b])
    assert c.text == script and len(c.segments) > 5
    for s in c.segments[:-1]:
        assert s.text.strip() and not s.text[-1].isspace(), [x.text for x in c.segments]


def _check_cuts(tokenizers, script, monkeypatch, streaming, prompt=PROMPT, **kw):
    """Decode ``script`` (every source proposes it, likes it) and check every cut as it is made: at a token
    boundary of every source's tokenization of the text known when cutting (the text so far + the whole
    proposal), never right after whitespace. Returns (completion, cuts inside words)."""
    from fuseflow.ensemble import decoder as decoder_module

    cuts = []
    original = decoder_module._Proposal.candidate

    def spy(self, position, at_boundary):
        cuts.append(([st.text for st in self.req.states], self.text(), position, self.stopped))
        return original(self, position, at_boundary)

    monkeypatch.setattr(decoder_module._Proposal, "candidate", spy)
    sources = [scripted_source(f"s{k}", tok, script, likes=script, streaming=streaming)
               for k, tok in enumerate(tokenizers)]
    c = _decode(sources, prompt=prompt, **kw)
    assert c.text == script and all(s.at_common_boundary for s in c.segments)
    assert len(cuts) >= len(c.segments)
    inside_words = 0
    for contexts, text, position, stopped in cuts:
        if stopped and position == len(text):
            continue  # the end of a final proposal
        assert 0 < position < len(text)
        for context, tok in zip(contexts, tokenizers):
            offsets = tok(context + text, return_offsets_mapping=True)["offset_mapping"]
            assert token_boundary_mask(offsets, len(context), len(text))[position], (tok.name_or_path, text, position)
        assert not text[position - 1].isspace()  # whitespace joins the next word
        inside_words += text[position - 1].isalnum() and text[position].isalnum()
    return c, inside_words


@pytest.mark.parametrize("streaming", [False, True], ids=["window", "stop_when"])
@pytest.mark.parametrize("boundary", ["word", "token"])
def test_cuts_are_never_inside_a_token_of_any_source(bpe_tokenizer, spm_tokenizer, boundary, streaming, monkeypatch):
    """Long words, many tokens without a space: past segment_max_tokens the guard cuts at a boundary of every
    source's tokenization, never inside a token of either tokenizer, whether the proposal is cut after a
    window (a served teacher) or inside the generation (``stop_when``, the in-process engine)."""
    script = " Antidisestablishmentarianism counterrevolutionaries, pneumonoultramicroscopic."
    c, inside_words = _check_cuts([bpe_tokenizer, spm_tokenizer], script, monkeypatch, streaming,
                                  segment_max_tokens=2, boundary=boundary)
    assert len(c.segments) > 3
    assert inside_words > 0  # the guard did cut long words


@pytest.mark.parametrize("streaming", [False, True], ids=["window", "stop_when"])
def test_word_rule_cuts_only_between_words_before_the_guard(bpe_tokenizer, spm_tokenizer, streaming, monkeypatch):
    """Short words and a generous guard: the ``word`` rule never cuts between two word characters."""
    script = " one two, three 42 four.\nfive-six seven"
    c, inside_words = _check_cuts([bpe_tokenizer, spm_tokenizer], script, monkeypatch, streaming,
                                  segment_max_tokens=16, boundary="word")
    assert inside_words == 0 and len(c.segments) >= 6


def _pretrained_tokenizer(name: str):
    from pathlib import Path

    # The converted HF dirs live in the user's cache; the test session points FUSEFLOW_CACHE elsewhere.
    dirs = [d for d in sorted((Path.home() / ".cache" / "fuseflow" / "hf").glob(f"{name}-*"))
            if (d / "tokenizer.json").exists()]
    if not dirs:
        pytest.skip(f"{name} is not converted in ~/.cache/fuseflow (fuseflow models prepare {name})")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(dirs[0]), local_files_only=True)


@pytest.mark.pretrained
@pytest.mark.parametrize("streaming", [False, True], ids=["window", "stop_when"])
@pytest.mark.parametrize("script", [
    " Die Datei wird mit Zugriffsberechtigungsüberprüfung geöffnet, z.B. 0644 (Standardeinstellung).",
    " L'option --no-préserve-racine désactive la vérification ; voir « chmod(1) ».\n\n  Exemple : 42",
    " The function os.path.join() returns 'a/b' unless PYTHONDONTWRITEBYTECODE=1.",
])
def test_cuts_are_never_inside_a_token_of_smollm2_or_gemma3(script, streaming, monkeypatch):
    """The real pair (byte-level BPE 49k vs SentencePiece 262k) on German, French and English technical
    text with long compounds, digits, accents and punctuation: every cut is a boundary of both."""
    tokenizers = [_pretrained_tokenizer("smollm2-135m"), _pretrained_tokenizer("gemma3-270m")]
    _check_cuts(tokenizers, script, monkeypatch, streaming, prompt="Text:", segment_max_tokens=3)


# ----------------------------------------------------------------------------------------------------------
# Tiny random models.
# ----------------------------------------------------------------------------------------------------------

TINY_PROMPT = "The value of the expression is"


def test_greedy_is_deterministic(llama_source, gemma_source):
    params = DecodeParams(max_tokens=16)
    first = _decode([llama_source, gemma_source], params, TINY_PROMPT, rerank="mean_bits_per_byte")
    second = _decode([llama_source, gemma_source], params, TINY_PROMPT, rerank="mean_bits_per_byte")
    assert first.text == second.text and first.text
    assert {s.winner for s in first.segments} == {"llama", "gemma"}  # both proposers' paths are exercised
    # The second run reuses the first's prefix caches: the same numbers in another order (fp32 rounding).
    for x, y in zip(first.segments, second.segments, strict=True):
        assert (x.text, x.winner, x.proposers, x.contested) == (y.text, y.winner, y.proposers, y.contested)
        for cx, cy in zip(x.candidates, y.candidates, strict=True):
            assert cx["text"] == cy["text"] and cx["score"] == pytest.approx(cy["score"], abs=1e-4)
    assert "".join(s.text for s in first.segments) == first.text
    assert all(s.winner in s.proposers for s in first.segments)


@pytest.mark.parametrize("hidden", [("score_continuations",), ("score_continuations", "score_tails")])
def test_tail_scoring_on_the_prefix_cache_decodes_like_whole_sequence_scoring(
    llama_source, gemma_source, without_attribute, hidden
):
    """The in-process reranking path (score_continuations on cached contexts) and the served-teacher path
    (score_ids of whole sequences) pick the same candidates."""
    import dataclasses
    import functools

    params = DecodeParams(max_tokens=20)
    cached = _decode([llama_source, gemma_source], params, TINY_PROMPT, rerank="mean_bits_per_byte")
    plain_sources = [  # each teacher as a served vllm one looks: whole-sequence score_ids only, no batched continuations
        dataclasses.replace(s, teacher=functools.reduce(without_attribute, hidden, s.teacher))
        for s in (llama_source, gemma_source)
    ]
    plain = _decode(plain_sources, params, TINY_PROMPT, rerank="mean_bits_per_byte")
    assert cached.text == plain.text and len(cached.segments) > 1
    for a, b in zip(cached.segments, plain.segments):
        assert a.winner == b.winner
        for ca, cb in zip(a.candidates, b.candidates):
            assert ca["text"] == cb["text"] and ca["score"] == pytest.approx(cb["score"], abs=1e-4)


@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_one_source_equals_its_own_greedy_generation(which, llama_source, gemma_source):
    source = {"llama": llama_source, "gemma": gemma_source}[which]
    params = DecodeParams(max_tokens=24)
    fused = _decode([source], params, TINY_PROMPT)
    alone = generate_single(source, TINY_PROMPT, True, params)
    assert len(fused.segments) > 1  # it really went segment by segment
    assert fused.text == alone.text
    assert fused.completion_tokens == alone.completion_tokens
    assert fused.finish_reason == alone.finish_reason


def test_segments_end_on_boundaries_of_both_tokenizers(llama_source, gemma_source):
    c = _decode([llama_source, gemma_source], DecodeParams(max_tokens=24), TINY_PROMPT, segment_max_tokens=6,
                rerank="mean_bits_per_byte", boundary="token")
    full = TINY_PROMPT + c.text
    masks = []
    for s in (llama_source, gemma_source):
        (enc,) = s.encode([full], True)
        masks.append(token_boundary_mask(enc.offsets, 0, len(full)))
    end, checked = len(TINY_PROMPT), 0
    for seg in c.segments[:-1]:
        end += len(seg.text)
        # Before a space the boundary cannot move with what follows, so it must still be one in the final text.
        if seg.at_common_boundary and full[end : end + 1].isspace():
            assert masks[0][end] and masks[1][end], (seg, full[end - 5 : end + 5])
            checked += 1
    assert checked >= 3


def test_sampling_is_seeded(llama_source, gemma_source):
    def run(seed):
        return _decode([llama_source, gemma_source], DecodeParams(max_tokens=12, temperature=1.0, seed=seed), TINY_PROMPT).text

    assert run(7) == run(7)
    assert len({run(s) for s in (1, 2, 3)}) > 1


def test_word_segments_end_outside_words(llama_source, gemma_source):
    c = _decode([llama_source, gemma_source], DecodeParams(max_tokens=24), TINY_PROMPT, rerank="mean_bits_per_byte")
    full, end = TINY_PROMPT + c.text, len(TINY_PROMPT)
    for s in c.segments[:-1]:
        end += len(s.text)
        if s.at_common_boundary and len(s.text) and end < len(full):
            assert not (full[end - 1].isalnum() and full[end].isalnum()) or len(s.candidates) > 0
            assert not full[end - 1].isspace()


def _forward_calls(engine):
    counter = {"n": 0}
    handle = engine.model.register_forward_pre_hook(lambda module, args: counter.__setitem__("n", counter["n"] + 1))
    return counter, handle


def test_single_source_streams_token_by_token_and_stops_at_a_stop_string_while_generating(gemma_source):
    prompt, params = "Once upon a time", DecodeParams(max_tokens=40)
    plain = generate_single(gemma_source, prompt, True, params)
    assert plain.completion_tokens == 40
    cut = next(k for k in range(30, len(plain.text) - 3) if plain.text.find(plain.text[k : k + 3]) == k)
    stop = plain.text[cut : cut + 3]  # first seen after several tokens
    counter, handle = _forward_calls(gemma_source.teacher)
    try:
        events = list(stream_single(gemma_source, prompt, True, DecodeParams(max_tokens=40, stop=(stop,))))
    finally:
        handle.remove()
    c = events[-1].completion
    assert c.text == plain.text[:cut] and c.finish_reason == "stop"
    assert "".join(e.delta for e in events) == c.text
    assert len([e for e in events if e.delta]) > 2  # token by token, not one chunk at the end
    # It stopped generating once the stop string appeared: one forward per token up to it, not max_tokens.
    n_prompt = gemma_source.encode([prompt], True)[0].ids.size
    needed = gemma_source.encode([prompt + plain.text[: cut + len(stop)]], True)[0].ids.size - n_prompt
    assert counter["n"] <= needed + 1 < 40


@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_score_continuations_equals_whole_sequence_scoring(which, llama_source, gemma_source):
    source = {"llama": llama_source, "gemma": gemma_source}[which]
    engine = source.teacher
    (enc,) = source.encode([TINY_PROMPT + " and more words here"], True)
    context, rest = enc.ids[:6], enc.ids[6:]
    conts = [rest[:1], rest[:4], rest[2:5], rest]
    engine.prefix_cache.clear()
    engine.generate(context, max_new_tokens=3)  # a cache entry longer than the context, as after a proposal
    for _ in range(2):  # from the cached context, then again: the entry is copied, not spent
        got = engine.score_continuations(context, conts)
        for cont, lp in zip(conts, got, strict=True):
            want = engine.score_ids([np.concatenate([context, cont])], top_k=1)[0].gold_logprobs[len(context) - 1 :]
            np.testing.assert_allclose(lp, want, atol=1e-4)
