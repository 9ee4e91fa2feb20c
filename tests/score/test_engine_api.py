"""The Engine base class and registry, with a stand-in backend whose scores are easy to predict."""

from __future__ import annotations

import numpy as np
import pytest

from fuseflow.score.engine import (
    ENGINES,
    Engine,
    Generated,
    NextTokenScores,
    ScoreError,
    create_engine,
    register_engine,
)


class UniformEngine(Engine):
    """Every next token equally likely: logprob -log(V) everywhere, top-k ids 0..k-1."""

    def __init__(self, model, tokenizer=None, max_length=64, max_top_k=None):
        self.name = str(model)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_top_k = max_top_k
        self.calls: list[list[np.ndarray]] = []

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def _score(self, ids, top_k, temperature):
        self.calls.append(ids)
        v = self.vocab_size
        return [
            NextTokenScores(
                np.tile(np.arange(top_k, dtype=np.int32), (len(a) - 1, 1)),
                np.full((len(a) - 1, top_k), -np.log(v), dtype=np.float32),
                np.full(len(a) - 1, -np.log(v), dtype=np.float32),
            )
            for a in ids
        ]

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, top_p=1.0, stop_token_ids=(), seed=None):
        self._check_generate_args(prompt_ids, max_new_tokens, temperature, top_p)
        return Generated(np.zeros(max_new_tokens, np.int32), np.zeros(max_new_tokens, np.float32), "length")


@pytest.fixture
def registered():
    register_engine("uniform-test")(UniformEngine)
    yield
    ENGINES.pop("uniform-test", None)


def test_create_engine_passes_options(registered, bpe_tokenizer):
    engine = create_engine("uniform-test", "m", tokenizer=bpe_tokenizer, max_length=10)
    assert isinstance(engine, UniformEngine) and engine.kind == "uniform-test"
    assert engine.name == "m" and engine.max_length == 10


def test_register_twice_is_an_error(registered):
    class Other(UniformEngine):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_engine("uniform-test")(Other)


def test_unknown_kind_lists_known(registered):
    with pytest.raises(ValueError, match="hf.*uniform-test"):
        create_engine("llamacpp", "m")


def test_score_texts_tokenizes_with_specials_and_offsets(bpe_tokenizer):
    engine = UniformEngine("m", bpe_tokenizer)
    texts = ["def f(x):", "return x + 1"]
    out = engine.score_texts(texts, top_k=3)
    (ids,) = engine.calls
    for text, got, sent in zip(texts, out, ids):
        expected = bpe_tokenizer(text)["input_ids"]
        assert expected[0] == bpe_tokenizer.bos_token_id
        assert sent.dtype == np.int32 and sent.tolist() == expected
        assert got.token_ids.tolist() == expected
        assert got.offsets.shape == (len(expected), 2) and got.offsets.dtype == np.int32
        # Non-special tokens' offsets cover the text they came from.
        for (s, e), tok in zip(got.offsets[1:], got.tokens[1:]):
            assert text[s:e].replace(" ", "Ġ") == tok
        assert got.topk_ids.shape == (len(expected) - 1, 3)
        assert got.ce == pytest.approx(np.log(len(bpe_tokenizer)), rel=1e-6)


def test_limits_checked_before_the_backend_runs(bpe_tokenizer):
    engine = UniformEngine("m", bpe_tokenizer, max_length=5, max_top_k=4)
    with pytest.raises(ScoreError, match=r"text 1 has \d+ tokens, more than max_length 5"):
        engine.score_texts(["ab", "a much longer text than five tokens"], top_k=2)
    with pytest.raises(ScoreError, match="max_top_k 4"):
        engine.score_texts(["ab"], top_k=5)
    with pytest.raises(ScoreError, match="text 0 is not a string"):
        engine.score_texts([None], top_k=2)
    with pytest.raises(ScoreError, match="must be integers"):
        engine.score_ids([np.array([1.0, 2.0])], top_k=2)
    with pytest.raises(ScoreError, match="temperature must be >= 0"):
        engine.generate(np.array([1, 2]), 2, temperature=-1.0)
    assert engine.calls == []


@pytest.mark.parametrize("kind", ["hf", "vllm"])
def test_options_model_matches_the_constructor(kind):
    """The typed options (checked at config load) are exactly the engine's keyword arguments, same defaults."""
    import inspect

    cls = ENGINES.lookup(kind)
    params = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
              if p.kind is inspect.Parameter.KEYWORD_ONLY}
    fields = {n: f.default for n, f in cls.Options.model_fields.items()}
    assert fields == params


def test_create_engine_checks_options_before_loading():
    with pytest.raises(ValueError, match=r"hf engine option pakc: unknown option \(typo\?\)"):
        create_engine("hf", "never-loaded", pakc=False)
    with pytest.raises(ValueError, match="vllm engine option tensor_parallel_size: Input should be greater"):
        create_engine("vllm", "never-loaded", tensor_parallel_size=0)
