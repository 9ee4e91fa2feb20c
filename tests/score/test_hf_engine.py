"""HFEngine against a dense reference: full forward, full fp32 log-softmax, torch.topk, per text."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fuseflow.models import builtin_text, load
from fuseflow.score.engine import ScoreError, create_engine
from fuseflow.kernels.head import LogitTransform, topk_logprobs_with_head
from fuseflow.score.hf_engine import HFEngine

ATOL = 2e-5


@pytest.fixture(scope="module")
def loaded(request, tiny_llama, tiny_gemma, tiny_qwen):
    paths = {"llama": tiny_llama, "gemma": tiny_gemma, "qwen": tiny_qwen}
    return {arch: load(path) for arch, path in paths.items()}


@pytest.fixture(scope="module")
def texts():
    """Texts of very different lengths, neither sorted nor reverse sorted."""
    text = builtin_text(40_000)
    rng = np.random.default_rng(0)
    sizes = [300, 7, 1200, 40, 1, 650, 90, 2000, 15]
    starts = rng.integers(0, len(text) - 2000, size=len(sizes))
    return [text[s : s + n] for s, n in zip(starts, sizes)]


def dense_reference(model, ids: np.ndarray, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities [L-1, V] from the model's own full forward (logits of every position)."""
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None]).logits[0, :-1].float()  # [L-1, V]
    return torch.log_softmax(logits / temperature, dim=-1)


def assert_matches_dense(scored, model, k: int, temperature: float = 1.0):
    ids = scored.token_ids
    dense = dense_reference(model, ids, temperature)  # [L-1, V]
    ref_values, _ = torch.topk(dense, k, dim=-1)  # [L-1, k]
    assert scored.topk_ids.shape == (len(ids) - 1, k) and scored.topk_ids.dtype == np.int32
    assert scored.topk_logprobs.shape == (len(ids) - 1, k) and scored.topk_logprobs.dtype == np.float32
    assert scored.gold_logprobs.shape == (len(ids) - 1,) and scored.gold_logprobs.dtype == np.float32
    # The k best values, in descending order…
    np.testing.assert_allclose(scored.topk_logprobs, ref_values.numpy(), atol=ATOL, rtol=0)
    # …and the ids are the ones holding those values (equal up to exact ties).
    gathered = torch.gather(dense, 1, torch.from_numpy(scored.topk_ids).long()).numpy()  # [L-1, k]
    np.testing.assert_allclose(gathered, scored.topk_logprobs, atol=ATOL, rtol=0)
    for row in scored.topk_ids:
        assert len(set(row.tolist())) == k
    gold = torch.gather(dense, 1, torch.as_tensor(ids[1:], dtype=torch.long)[:, None])[:, 0].numpy()  # [L-1]
    np.testing.assert_allclose(scored.gold_logprobs, gold, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 100_000])
def test_score_texts_matches_dense(loaded, texts, arch, chunk):
    lm = loaded[arch]
    # A small token budget forces several batches with padding; chunk 7 never divides the row count evenly.
    engine = HFEngine(lm, head_chunk_tokens=chunk, max_batch_tokens=512, max_batch_size=4)
    k = 5
    out = engine.score_texts(texts, top_k=k)
    assert len(out) == len(texts)
    enc = lm.tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    for i, scored in enumerate(out):
        # Request order: text i's own tokens, BOS first.
        np.testing.assert_array_equal(scored.token_ids, enc["input_ids"][i])
        assert scored.token_ids[0] == lm.tokenizer.bos_token_id
        np.testing.assert_array_equal(scored.offsets, np.asarray(enc["offset_mapping"][i]).reshape(-1, 2))
        assert scored.tokens == enc.tokens(i)
        assert_matches_dense(scored, lm.model, k)


@pytest.mark.parametrize("arch", ["llama", "gemma", "qwen"])
def test_batched_equals_single(loaded, texts, arch):
    engine = HFEngine(loaded[arch], head_chunk_tokens=13, max_batch_tokens=4096, max_batch_size=64)
    together = engine.score_texts(texts, top_k=3)
    for text, scored in zip(texts, together):
        (alone,) = engine.score_texts([text], top_k=3)
        np.testing.assert_array_equal(alone.token_ids, scored.token_ids)
        np.testing.assert_allclose(alone.topk_logprobs, scored.topk_logprobs, atol=ATOL, rtol=0)
        np.testing.assert_allclose(alone.gold_logprobs, scored.gold_logprobs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma", "qwen"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_equal_padded_batches(loaded, texts, arch, attn):
    """Sequences packed end to end (restarted position ids) score exactly as padded ones: attention never
    crosses a sequence, Gemma-3's sliding-window layers included. The spy proves rows really held several."""
    lm = loaded[arch]
    lm.model.config._attn_implementation = attn  # both kernels that take the dense packed mask on CPU
    try:
        padded = HFEngine(lm, pack=False, max_batch_tokens=4096).score_texts(texts, top_k=4)
        engine = HFEngine(lm, pack=True, max_batch_tokens=4096)
        rows_seen = []
        inner = engine._hidden

        def spy(input_ids, position_ids=None):
            rows_seen.append(position_ids is not None)  # position ids are passed only when a row holds several
            return inner(input_ids, position_ids)

        engine._hidden = spy
        packed = engine.score_texts(texts, top_k=4)
    finally:
        lm.model.config._attn_implementation = "sdpa"
    assert any(rows_seen)
    for a, b in zip(padded, packed):
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_allclose(b.topk_logprobs, a.topk_logprobs, atol=ATOL, rtol=0)
        np.testing.assert_allclose(b.gold_logprobs, a.gold_logprobs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_logits(loaded, texts, temperature):
    lm = loaded["gemma"]
    engine = HFEngine(lm, head_chunk_tokens=32)
    out = engine.score_texts(texts[:4], top_k=4, temperature=temperature)
    for scored in out:
        assert_matches_dense(scored, lm.model, 4, temperature)
    plain = engine.score_texts(texts[:1], top_k=4)[0]
    assert np.abs(plain.gold_logprobs - out[0].gold_logprobs).max() > 1e-3


def test_score_ids_matches_dense(loaded):
    lm = loaded["llama"]
    engine = HFEngine(lm, head_chunk_tokens=5, max_batch_tokens=128)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, engine.vocab_size, size=n).astype(np.int64) for n in (33, 2, 120, 1, 57)]
    out = engine.score_ids(seqs, top_k=6)
    for seq, scored in zip(seqs, out):
        np.testing.assert_array_equal(scored.token_ids, seq)
        assert scored.offsets is None
        assert scored.tokens == lm.tokenizer.convert_ids_to_tokens(seq.tolist())
        if len(seq) == 1:
            assert scored.topk_ids.shape == (0, 6) and scored.gold_logprobs.shape == (0,)
        else:
            assert_matches_dense(scored, lm.model, 6)


def test_gemma_final_logit_softcapping(tiny_gemma, tmp_path, texts):
    # A cap small enough to bend the tiny model's logits (|z| ~ 0.1), so ignoring it would show.
    path = tmp_path / "capped"
    shutil.copytree(tiny_gemma, path)
    config = json.loads((path / "config.json").read_text())
    config["final_logit_softcapping"] = 0.05
    (path / "config.json").write_text(json.dumps(config))
    engine = create_engine("hf", str(path), head_chunk_tokens=16)
    assert engine._transform.softcap == 0.05
    out = engine.score_texts(texts[:3], top_k=4)
    for scored in out:
        assert_matches_dense(scored, engine.model, 4)
    # The model's own forward applies the cap; without it the reference would differ from the engine.
    with torch.no_grad():
        ids = torch.as_tensor(out[0].token_ids, dtype=torch.long)[None]
        raw = engine.model.lm_head(engine.model.model(input_ids=ids).last_hidden_state)[0, :-1].float()
    uncapped = torch.log_softmax(raw, -1).gather(1, ids[0, 1:, None])[:, 0].numpy()
    assert np.abs(uncapped - out[0].gold_logprobs).max() > 1e-2


def test_the_engines_head_epilogue_on_random_tensors():
    """The engine's head path (fuseflow.kernels.head with the model's head module) against a dense reference."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16)  # [N, H]
    head = torch.nn.Linear(16, 300, bias=True)
    gold = torch.randint(0, 300, (37,))  # [N]
    full = torch.log_softmax(head(hidden).float() / 0.7, dim=-1)  # [N, V]
    for chunk in (1, 4, 37, 50):
        ids, lp, gl = topk_logprobs_with_head(
            hidden, head, gold, 8, transform=LogitTransform(temperature=0.7), chunk_tokens=chunk
        )
        values, ref_ids = torch.topk(full, 8, dim=-1)
        torch.testing.assert_close(lp, values)
        torch.testing.assert_close(ids, ref_ids)
        torch.testing.assert_close(gl, full.gather(1, gold[:, None])[:, 0])


# ----------------------------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------------------------


def test_errors_name_index_and_limit(loaded):
    engine = HFEngine(loaded["llama"], max_length=16, max_top_k=20)
    with pytest.raises(ScoreError, match="text 1 is empty") as e:
        engine.score_texts(["hello", ""], top_k=3)
    assert e.value.index == 1
    long_text = "the quick brown fox jumps over the lazy dog " * 4
    n = len(loaded["llama"].tokenizer(long_text)["input_ids"])
    with pytest.raises(ScoreError, match=rf"text 2 has {n} tokens, more than max_length 16") as e:
        engine.score_texts(["a b", "c d", long_text], top_k=3)
    assert e.value.index == 2
    with pytest.raises(ScoreError, match="max_top_k 20"):
        engine.score_texts(["hello"], top_k=21)
    with pytest.raises(ScoreError, match="positive"):
        engine.score_texts(["hello"], top_k=0)
    with pytest.raises(ScoreError, match="temperature"):
        engine.score_texts(["hello"], top_k=3, temperature=0.0)
    with pytest.raises(ScoreError, match=r"token ids 1 holds id 512, outside the vocabulary \[0, 512\)"):
        engine.score_ids([np.array([1, 2]), np.array([3, 512])], top_k=3)
    with pytest.raises(ScoreError, match="token ids 0 must be a non-empty"):
        engine.score_ids([np.array([], dtype=np.int64)], top_k=3)
    unlimited = HFEngine(loaded["llama"])
    with pytest.raises(ScoreError, match="exceeds the vocabulary size 512"):
        unlimited.score_texts(["hello"], top_k=513)
    assert unlimited.score_texts(["hello world"], top_k=512)[0].topk_ids.shape[1] == 512
    assert unlimited.score_texts([], top_k=3) == []


def test_bad_options():
    with pytest.raises(ValueError, match="unknown engine kind 'nope'"):
        create_engine("nope", "x")


def test_bad_engine_options(loaded):
    with pytest.raises(ValueError, match="max_length 5000"):
        HFEngine(loaded["llama"], max_length=5000)
    with pytest.raises(ValueError, match="head_chunk_tokens"):
        HFEngine(loaded["llama"], head_chunk_tokens=0)
    with pytest.raises(ValueError, match="dtype"):
        create_engine("hf", "unused-because-dtype-fails-first", dtype="float8")


def test_properties(loaded):
    engine = HFEngine(loaded["gemma"], name="g")
    assert engine.kind == "hf" and engine.name == "g"
    assert engine.vocab_size == 640 and engine.max_length == 1024
    assert engine.tokenizer is loaded["gemma"].tokenizer


# ----------------------------------------------------------------------------------------------------------
# Generation.
# ----------------------------------------------------------------------------------------------------------


def greedy_reference(model, prompt: np.ndarray, n: int) -> tuple[list[int], list[float]]:
    """Argmax continuation recomputing the whole sequence every step (no cache)."""
    ids = torch.as_tensor(prompt, dtype=torch.long)[None]
    tokens, logprobs = [], []
    with torch.no_grad():
        for _ in range(n):
            lp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)  # [V]
            t = int(lp.argmax())
            tokens.append(t)
            logprobs.append(float(lp[t]))
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return tokens, logprobs


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_generate_greedy_equals_argmax(loaded, arch):
    lm = loaded[arch]
    engine = HFEngine(lm)
    prompt = np.asarray(lm.tokenizer("The class statement")["input_ids"])
    out = engine.generate(prompt, max_new_tokens=12)
    tokens, logprobs = greedy_reference(lm.model, prompt, 12)
    assert out.token_ids.dtype == np.int32 and out.logprobs.dtype == np.float32
    assert out.token_ids.tolist() == tokens
    np.testing.assert_allclose(out.logprobs, logprobs, atol=1e-4, rtol=0)
    assert out.finish_reason == "length"

    stop = tokens[4]
    first = tokens.index(stop)
    stopped = engine.generate(prompt, max_new_tokens=12, stop_token_ids=[stop])
    assert stopped.token_ids.tolist() == tokens[: first + 1]
    assert stopped.finish_reason == "stop"


def test_generate_sampling(loaded):
    lm = loaded["llama"]
    engine = HFEngine(lm)
    prompt = np.asarray(lm.tokenizer("Assignment statements")["input_ids"])
    a = engine.generate(prompt, 10, temperature=1.0, seed=3)
    b = engine.generate(prompt, 10, temperature=1.0, seed=3)
    c = engine.generate(prompt, 10, temperature=1.0, seed=4)
    assert a.token_ids.tolist() == b.token_ids.tolist()
    assert a.token_ids.tolist() != c.token_ids.tolist()
    # Logprobs are the model's raw ones: recompute them with a dense forward over prompt + continuation.
    full = np.concatenate([prompt, a.token_ids])
    dense = dense_reference(lm.model, full)[len(prompt) - 1 :]  # [10, V]
    chosen = dense.gather(1, torch.as_tensor(a.token_ids).long()[:, None])[:, 0]  # [10]
    np.testing.assert_allclose(a.logprobs, chosen, atol=1e-4)
    # A nucleus that holds only the best token is greedy decoding.
    nucleus = engine.generate(prompt, 10, temperature=1.0, top_p=1e-6, seed=5)
    assert nucleus.token_ids.tolist() == engine.generate(prompt, 10).token_ids.tolist()


def test_generate_errors(loaded):
    engine = HFEngine(loaded["llama"], max_length=32)
    with pytest.raises(ScoreError, match="max_length 32"):
        engine.generate(np.arange(1, 30), max_new_tokens=8)
    with pytest.raises(ScoreError, match="top_p"):
        engine.generate(np.arange(1, 4), max_new_tokens=2, top_p=0.0)
    with pytest.raises(ScoreError, match="non-empty"):
        engine.generate(np.array([], dtype=np.int64), max_new_tokens=2)
    empty = engine.generate(np.arange(1, 4), max_new_tokens=0)
    assert empty.token_ids.shape == (0,) and empty.finish_reason == "length"


@pytest.mark.slow
def test_compiled_trunk_scores_like_eager(tiny_llama, texts):
    """engine option compile: torch.compile'd trunk (dynamic shapes, packed rows) gives the eager scores."""
    eager = HFEngine(load(tiny_llama), max_batch_tokens=2048).score_texts(texts, top_k=4)
    engine = HFEngine(load(tiny_llama), max_batch_tokens=2048, compile=True)
    assert engine._trunk._compiled_call_impl is not None
    compiled = engine.score_texts(texts, top_k=4)
    for a, b in zip(eager, compiled):
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_allclose(b.topk_logprobs, a.topk_logprobs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(b.gold_logprobs, a.gold_logprobs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("logit_scale", [0.25, -0.5])
def test_cohere_logit_scale(bpe_tokenizer, tmp_path, texts, logit_scale):
    """Cohere multiplies its logits by ``logit_scale`` after the lm_head: the engine's logit transform must
    follow, including a negative scale (top-k is then taken from the smallest raw logits)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.CohereConfig(
        vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, logit_scale=logit_scale,
        bos_token_id=bpe_tokenizer.bos_token_id, eos_token_id=bpe_tokenizer.eos_token_id,
        pad_token_id=bpe_tokenizer.pad_token_id,
    )
    model = transformers.CohereForCausalLM(config)
    with torch.no_grad():  # a larger scale than the init gives, so that a missing logit_scale would show
        model.get_output_embeddings().weight.normal_(0, 2.0)
    model.save_pretrained(tmp_path)
    bpe_tokenizer.save_pretrained(tmp_path)
    engine = HFEngine(str(tmp_path), head_chunk_tokens=7)
    assert engine._transform.logit_scale == logit_scale
    for scored in engine.score_texts(texts[:3], top_k=5):
        assert_matches_dense(scored, engine.model, 5)


@pytest.mark.slow
def test_flex_attention_packs_whole_batches_into_one_row(tmp_path, bpe_tokenizer, texts):
    """With a varlen kernel (flex_attention runs on CPU too) rows take the whole batch budget, and the
    block-sparse document mask keeps sequences apart: scores equal the padded SDPA ones.

    Head dim 32 (hidden 128, 4 heads), not the session's tiny Llama (head dim 8): torch 2.13's compiled CPU
    flex-attention kernel returns wrong, run-to-run different outputs for head dims of 8 and 16 (any
    transformers; measured against SDPA, issue 12), which the engine's probe rejects; real models have 64+."""
    from fuseflow.models import make_tiny_model

    model_dir = make_tiny_model(tmp_path, "llama", tokenizer=bpe_tokenizer, hidden_size=128, seed=0)
    padded = HFEngine(load(model_dir), pack=False, max_batch_tokens=8192).score_texts(texts, top_k=4)
    engine = HFEngine(model_dir, max_batch_tokens=8192, attn_implementation="flex_attention")
    assert engine.attn_implementation == "flex_attention"
    rows = []
    inner = engine._hidden
    engine._hidden = lambda ids, pos=None: (rows.append(ids.shape), inner(ids, pos))[1]
    packed = engine.score_texts(texts, top_k=4)
    assert rows and rows[0][0] == 1  # one row held every sequence of the batch
    for a, b in zip(padded, packed):
        np.testing.assert_allclose(b.topk_logprobs, a.topk_logprobs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(b.gold_logprobs, a.gold_logprobs, atol=1e-4, rtol=0)


def test_varlen_kernels_get_one_packed_row_per_forward(loaded, texts, monkeypatch):
    """flash_attention_2 reads packed position ids only from a batch of one row (several rows would attend
    across sequences): the engine hands a varlen kernel one row per forward. The kernel itself is not on this
    CPU, so the model runs SDPA while the engine plans for flash_attention_2; rows are made short (capacity
    100) so that several would fit one forward's budget."""
    import fuseflow.score.hf_engine as hf

    lm = loaded["llama"]
    padded = HFEngine(lm, pack=False).score_texts(texts, top_k=3)
    monkeypatch.setattr(hf, "row_capacity", lambda lengths, attn, budget: max(100, int(max(lengths))))
    engine = HFEngine(lm, max_batch_tokens=4096)
    engine.attn_implementation = "flash_attention_2"
    shapes = []
    inner = engine._hidden
    engine._hidden = lambda ids, pos=None: (shapes.append((ids.shape[0], pos is not None)), inner(ids, pos))[1]
    packed = engine.score_texts(texts, top_k=3)
    assert len(shapes) > 1 and all(b == 1 for b, _ in shapes) and any(p for _, p in shapes)
    for a, b in zip(padded, packed):
        np.testing.assert_allclose(b.topk_logprobs, a.topk_logprobs, atol=ATOL, rtol=0)
