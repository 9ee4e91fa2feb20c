"""Held-out evaluation against a dense reference: full forward, F.cross_entropy, one window at a time."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fuseflow.models import builtin_text
from fuseflow.trainer import evaluate as ev
from fuseflow.trainer.evaluate import bits_per_byte, evaluate_lm, rolling_windows

TEXTS = [
    builtin_text()[:1500],
    "Short one.",
    "naïve café — 日本語のテキスト 🙂 and ASCII after it. " * 6,
    builtin_text()[20_000:20_700],
    "",
]


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def dense_reference(model, tokenizer, texts, max_length):
    """Each window through the full model, every vocabulary entry in the softmax, one token window at a time."""
    nll, tokens = 0.0, 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id  # the tiny tokenizers add <s> themselves
        start = 0
        while len(ids) >= 2:
            end = min(start + max_length, len(ids))
            window = torch.tensor([ids[start:end]])
            with torch.no_grad():
                logits = model(input_ids=window).logits[0].double()
            nll += F.cross_entropy(logits[:-1], window[0, 1:], reduction="sum").item()
            tokens += end - start - 1
            if end == len(ids):
                break
            start = end - 1
    return nll, tokens


@pytest.mark.parametrize("num_tokens, max_length", [(0, 4), (1, 4), (2, 2), (5, 2), (10, 4), (11, 4), (100, 7), (7, 100)])
def test_rolling_windows_predict_every_token_once(num_tokens, max_length):
    windows = rolling_windows(num_tokens, max_length)
    predicted = [t for start, end in windows for t in range(start + 1, end)]
    assert predicted == list(range(1, num_tokens))
    assert all(end - start <= max_length for start, end in windows)
    assert all(windows[k + 1][0] == windows[k][1] - 1 for k in range(len(windows) - 1))


def test_rolling_windows_rejects_length_one():
    with pytest.raises(ValueError, match="max_length"):
        rolling_windows(10, 1)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma", "tiny_qwen"])
def test_matches_dense_reference(request, fixture):
    model, tok = load(request.getfixturevalue(fixture))
    got = evaluate_lm(model, tok, TEXTS, max_length=96, batch_tokens=300, chunk_tokens=7)
    nll, tokens = dense_reference(model, tok, TEXTS, max_length=96)
    assert got["tokens"] == tokens == sum(len(tok(t)["input_ids"]) - 1 for t in TEXTS)
    assert got["nll"] == pytest.approx(nll, rel=1e-5)
    assert got["bytes"] == sum(len(t.encode("utf-8")) for t in TEXTS)
    assert got["texts"] == len(TEXTS) and got["windows"] > len(TEXTS)
    assert got["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert got["bpb"] == pytest.approx(nll / math.log(2) / got["bytes"], rel=1e-5)


def test_window_length_and_batching_do_not_change_a_single_window(tiny_llama):
    model, tok = load(tiny_llama)
    short = ["A short text.", "Another, slightly longer, short text for the batch."]
    a = evaluate_lm(model, tok, short, max_length=512, batch_tokens=8)
    b = evaluate_lm(model, tok, short, max_length=256, batch_tokens=4096)
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-6) and a["windows"] == b["windows"] == 2


def test_gemma_soft_capping_is_applied(tiny_gemma):
    model, tok = load(tiny_gemma)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)  # logits of order 10: capping at 1 changes them all
    model.config.final_logit_softcapping = 1.0
    got = evaluate_lm(model, tok, TEXTS[:2], max_length=64)
    nll, _ = dense_reference(model, tok, TEXTS[:2], max_length=64)
    assert got["nll"] == pytest.approx(nll, rel=1e-5)
    model.config.final_logit_softcapping = None
    assert evaluate_lm(model, tok, TEXTS[:2], max_length=64)["nll"] != pytest.approx(nll, rel=0.05)


def test_tokenizer_without_bos_gets_it_prepended(tiny_llama):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    model, tok = load(tiny_llama)
    spec = json.loads(tok.backend_tokenizer.to_str())
    spec["post_processor"] = None
    no_bos = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )
    assert no_bos("abc")["input_ids"][0] != no_bos.bos_token_id
    assert ev.prefix_token(no_bos) == tok.bos_token_id and ev.prefix_token(tok) is None
    with_bos = evaluate_lm(model, tok, TEXTS, max_length=80)
    prefixed = evaluate_lm(model, no_bos, TEXTS, max_length=80)
    assert prefixed["nll"] == pytest.approx(with_bos["nll"], rel=1e-6)
    assert prefixed["tokens"] == with_bos["tokens"] and prefixed["bytes"] == with_bos["bytes"]


def permuted_vocab(model, tok, seed=0):
    """The same model and tokenizer with the ids of all non-special tokens shuffled consistently."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    specials = {t["id"] for t in spec["added_tokens"]}
    movable = np.array(sorted(set(vocab.values()) - specials))
    perm = np.arange(len(vocab))  # perm[old id] = new id
    perm[movable] = np.random.default_rng(seed).permutation(movable)
    spec["model"]["vocab"] = {token: int(perm[i]) for token, i in vocab.items()}
    new_tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )
    new_model = copy.deepcopy(model)
    with torch.no_grad():
        weight = new_model.get_input_embeddings().weight  # tied with the output head in tiny_llama
        weight[torch.from_numpy(perm)] = model.get_input_embeddings().weight.clone()
    return new_model, new_tok


def test_equal_nll_gives_equal_bpb_whatever_the_token_ids(tiny_llama):
    model, tok = load(tiny_llama)
    other_model, other_tok = permuted_vocab(model, tok)
    assert other_tok(TEXTS[0])["input_ids"] != tok(TEXTS[0])["input_ids"]
    a = evaluate_lm(model, tok, TEXTS, max_length=128)
    b = evaluate_lm(other_model, other_tok, TEXTS, max_length=128)
    assert b["nll"] == pytest.approx(a["nll"], rel=1e-6)
    assert b["bpb"] == pytest.approx(a["bpb"], rel=1e-6) and b["bytes"] == a["bytes"]


def test_bytes_do_not_depend_on_the_tokenizer(tiny_llama, tiny_gemma):
    llama, llama_tok = load(tiny_llama)
    gemma, gemma_tok = load(tiny_gemma)
    a = evaluate_lm(llama, llama_tok, TEXTS, max_length=128)
    b = evaluate_lm(gemma, gemma_tok, TEXTS, max_length=128)
    assert a["tokens"] != b["tokens"]
    assert a["bytes"] == b["bytes"] == sum(len(t.encode("utf-8")) for t in TEXTS)
    for r in (a, b):
        assert r["bpb"] == pytest.approx(bits_per_byte(r["nll"], r["bytes"]), rel=1e-12)


def test_logits_are_computed_in_chunks(tiny_gemma):
    model, tok = load(tiny_gemma)
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: rows.append(out.reshape(-1, out.shape[-1]).shape[0])
    )
    try:
        result = evaluate_lm(model, tok, TEXTS, max_length=128, batch_tokens=512, chunk_tokens=32)
    finally:
        handle.remove()
    assert max(rows[2:]) <= 32  # rows[:2]: the 16-position check against the model's own logits
    assert rows[:2] == [16, 16] and sum(rows[2:]) == result["tokens"]


def test_mismatched_logits_are_refused(tiny_llama, monkeypatch):
    model, tok = load(tiny_llama)
    real = ev.logits_function
    monkeypatch.setattr(ev, "logits_function", lambda m: (lambda h: real(m)(h) * 2.0))
    with pytest.raises(ValueError, match="LlamaForCausalLM: logits .* differ"):
        evaluate_lm(model, tok, TEXTS[:1], max_length=32)


def test_nothing_to_score_and_mode_restored(tiny_llama):
    model, tok = load(tiny_llama)
    model.train()
    result = evaluate_lm(model, tok, [], max_length=32)
    assert result["tokens"] == 0 and math.isnan(result["bpb"]) and math.isnan(result["perplexity"])
    assert model.training
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        evaluate_lm(model, tok, ["x"], max_length=1)


def test_per_text_nll_matches_each_text_scored_alone(tiny_llama):
    model, tok = load(tiny_llama)
    got = evaluate_lm(model, tok, TEXTS, max_length=96, batch_tokens=300)
    assert got["text_bytes"] == [len(t.encode("utf-8")) for t in TEXTS]
    assert sum(got["text_nll"]) == pytest.approx(got["nll"], rel=1e-9)
    for text, nll in zip(TEXTS, got["text_nll"]):
        assert nll == pytest.approx(evaluate_lm(model, tok, [text], max_length=96)["nll"], rel=1e-5, abs=1e-6)


def test_group_bpb_sums_within_each_group():
    got = ev.group_bpb([1.0, 2.0, 4.0], [10, 20, 40], ["de", "en", "de"])
    assert list(got) == ["de", "en"]
    assert got["de"] == pytest.approx(bits_per_byte(5.0, 50)) and got["en"] == pytest.approx(bits_per_byte(2.0, 20))


def test_paired_bootstrap_brackets_the_difference_and_shrinks_with_pairing():
    rng = np.random.default_rng(0)
    nbytes = rng.integers(500, 3000, size=40)
    difficulty = rng.uniform(0.5, 2.0, size=40) * nbytes  # shared by both models: varies a lot
    base = difficulty
    better = difficulty * 0.97 + rng.normal(0, 2, size=40)  # 3 % fewer nats on every document
    paired = ev.bootstrap_bpb(better, nbytes, baseline_nll=base, seed=1)
    assert paired["value"] == pytest.approx(bits_per_byte(better.sum() - base.sum(), nbytes.sum()))
    assert paired["low"] < paired["value"] < paired["high"] < 0  # a consistent gain is resolved
    unpaired_width = [ev.bootstrap_bpb(x, nbytes, seed=1) for x in (better, base)]
    assert paired["high"] - paired["low"] < min(u["high"] - u["low"] for u in unpaired_width) / 5
    same = ev.bootstrap_bpb(base, nbytes, baseline_nll=base)
    assert same["low"] == same["high"] == same["value"] == 0.0
