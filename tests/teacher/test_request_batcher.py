"""RequestBatcher with a fake engine whose scores are a function of the ids, so a result handed to the wrong
request, or rows from the wrong sequence, cannot pass for the right ones."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fuseflow.score.engine import Engine, Generated, NextTokenScores, ScoreError
from fuseflow.teacher.request_batcher import Cancelled, RequestBatcher, RequestTooLarge, ShuttingDown

VOCAB = 97


class IdTokenizer:
    """Token strings only: id 5 is "t5"."""

    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]


class KeyedEngine(Engine):
    """Row t of a sequence: ids ``(a[t+1] + j * 7) % V`` with logprobs ``-(j + 1) - a[t] / 1000`` (a function
    of the ids and the position only); ``gate`` holds every call until set. Records each call."""

    kind = "keyed-test"

    def __init__(self, max_length: int = 64, poison: int | None = None, tokenizer=None):
        self.name = "keyed"
        self.tokenizer = tokenizer if tokenizer is not None else IdTokenizer()
        self._vocab = len(tokenizer) if tokenizer is not None else VOCAB
        self.max_length = max_length
        self.max_top_k = None
        self.poison = poison  # an id that makes _score raise (a failure validation cannot foresee)
        self.calls: list[dict] = []
        self.threads: set[int] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def _score(self, ids, top_k, temperature):
        self.threads.add(threading.get_ident())
        self.calls.append({"ids": [a.tolist() for a in ids], "top_k": top_k, "temperature": temperature})
        self.entered.set()
        self.gate.wait(10)
        if self.poison is not None and any((a == self.poison).any() for a in ids):
            raise RuntimeError("poisoned sequence")
        return [keyed_scores(a, top_k, temperature) for a in ids]

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, top_p=1.0, stop_token_ids=(), seed=None):
        self.threads.add(threading.get_ident())
        prompt = self._check_generate_args(prompt_ids, max_new_tokens, temperature, top_p)
        ids = (prompt[-1] + 1 + np.arange(max_new_tokens)) % VOCAB
        return Generated(ids.astype(np.int32), -np.ones(max_new_tokens, np.float32), "length")


def keyed_scores(a: np.ndarray, top_k: int, temperature: float) -> NextTokenScores:
    """The reference: what one sequence scores alone (plain loops, obviously right)."""
    rows = len(a) - 1
    ids = np.zeros((rows, top_k), np.int32)
    lps = np.zeros((rows, top_k), np.float32)
    for t in range(rows):
        for j in range(top_k):
            ids[t, j] = (int(a[t + 1]) + j * 7) % VOCAB
            lps[t, j] = (-(j + 1) - int(a[t]) / 1000) / temperature
    gold = np.array([-int(a[t]) / 1000 for t in range(rows)], np.float32)
    return NextTokenScores(ids, lps, gold)


def random_request(rng, n: int, max_len: int = 12) -> list[np.ndarray]:
    return [rng.integers(0, VOCAB, size=int(rng.integers(2, max_len))).astype(np.int32) for _ in range(n)]


def assert_scored(got, seqs, top_k, temperature=1.0):
    assert len(got) == len(seqs)
    for s, seq in zip(got, seqs):
        ref = keyed_scores(seq, top_k, temperature)
        assert s.token_ids.tolist() == seq.tolist()
        np.testing.assert_array_equal(s.topk_ids, ref.topk_ids)
        np.testing.assert_array_equal(s.topk_logprobs, ref.topk_logprobs)
        np.testing.assert_array_equal(s.gold_logprobs, ref.gold_logprobs)


class Recorder:
    def __init__(self):
        self.batches: list[tuple[int, int, int]] = []
        self.depths: list[int] = []

    def observe_batch(self, requests, sequences, tokens, seconds):
        self.batches.append((requests, sequences, tokens))

    def set_queue_depth(self, depth):
        self.depths.append(depth)


@pytest.fixture
def engine():
    return KeyedEngine()


def hold(engine: KeyedEngine, batcher: RequestBatcher) -> object:
    """Occupy the batcher thread with a one-sequence request blocked in the engine; returns its stream."""
    engine.gate.clear()
    engine.entered.clear()
    stream = batcher.submit_ids([np.array([1, 2], np.int32)], top_k=1)
    assert engine.entered.wait(5)
    return stream


def test_queued_requests_merge_into_one_call_and_each_gets_its_own(engine):
    rng = np.random.default_rng(0)
    rec = Recorder()
    with RequestBatcher(engine, max_batch_tokens=10_000, max_wait_ms=0, observer=rec) as batcher:
        first = hold(engine, batcher)
        requests = [random_request(rng, int(n)) for n in (3, 1, 4, 2)]
        streams = [batcher.submit_ids(r, top_k=3) for r in requests]
        engine.gate.set()
        results = [s.result() for s in streams]
        first.result()
    for r, got in zip(requests, results):
        assert_scored(got, r, 3)
    assert len(engine.calls) == 2
    merged = engine.calls[1]["ids"]
    assert merged == [a.tolist() for r in requests for a in r]  # oldest request first, input order within
    assert rec.batches[1] == (4, 10, sum(len(a) for r in requests for a in r))


def test_token_budget_splits_batches_and_streams_a_large_request_in_order(engine):
    rng = np.random.default_rng(1)
    budget = 20
    with RequestBatcher(engine, max_batch_tokens=budget, max_wait_ms=0) as batcher:
        first = hold(engine, batcher)
        big = random_request(rng, 9, max_len=9)
        small = random_request(rng, 2, max_len=5)
        s_big, s_small = batcher.submit_ids(big, top_k=2), batcher.submit_ids(small, top_k=2)
        engine.gate.set()
        got_big = list(s_big)
        got_small = s_small.result()
        first.result()
    for call in engine.calls[1:]:
        assert sum(map(len, call["ids"])) <= budget or len(call["ids"]) == 1
    assert len(engine.calls) > 3  # 9 sequences of 2..8 tokens cannot fit in one call of 20 tokens
    assert [i for i, _ in got_big] == list(range(9))  # one request's sequences complete in input order
    assert_scored([s for _, s in got_big], big, 2)
    assert_scored(got_small, small, 2)


def test_sequence_longer_than_the_budget_runs_alone(engine):
    with RequestBatcher(engine, max_batch_tokens=4, max_wait_ms=0) as batcher:
        seq = np.arange(10, dtype=np.int32)
        assert_scored(batcher.score_ids([seq], top_k=2), [seq], 2)
    assert engine.calls[-1]["ids"] == [seq.tolist()]


def test_different_top_k_merge_and_each_keeps_its_own_columns(engine):
    rng = np.random.default_rng(2)
    with RequestBatcher(engine, max_wait_ms=0) as batcher:
        first = hold(engine, batcher)
        a, b = random_request(rng, 2), random_request(rng, 3)
        sa, sb = batcher.submit_ids(a, top_k=2), batcher.submit_ids(b, top_k=5)
        engine.gate.set()
        got_a, got_b = sa.result(), sb.result()
        first.result()
    assert len(engine.calls) == 2 and engine.calls[1]["top_k"] == 5
    assert_scored(got_a, a, 2)
    assert_scored(got_b, b, 5)


def test_different_temperatures_are_not_merged(engine):
    rng = np.random.default_rng(3)
    with RequestBatcher(engine, max_wait_ms=0) as batcher:
        first = hold(engine, batcher)
        a, b, c = random_request(rng, 2), random_request(rng, 2), random_request(rng, 2)
        streams = [batcher.submit_ids(a, 3, 1.0), batcher.submit_ids(b, 3, 2.0), batcher.submit_ids(c, 3, 1.0)]
        engine.gate.set()
        got = [s.result() for s in streams]
        first.result()
    assert [c["temperature"] for c in engine.calls[1:]] == [1.0, 2.0]
    assert engine.calls[1]["ids"] == [x.tolist() for x in a + c]
    assert_scored(got[0], a, 3, 1.0)
    assert_scored(got[1], b, 3, 2.0)
    assert_scored(got[2], c, 3, 1.0)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([np.array([1, 2]), np.array([3, VOCAB])], "token ids 1 holds id 97"),
        ([np.array([1, 2]), np.array([], np.int32)], "token ids 1 must be a non-empty"),
        ([np.array([1.0, 2.0])], "must be integers"),
        ([np.arange(65) % VOCAB], "text 0 has 65 tokens"),
    ],
)
def test_a_bad_request_fails_alone_before_it_is_queued(engine, bad, match):
    rng = np.random.default_rng(4)
    with RequestBatcher(engine, max_wait_ms=0) as batcher:
        first = hold(engine, batcher)
        good_before = random_request(rng, 2)
        s1 = batcher.submit_ids(good_before, top_k=2)
        with pytest.raises(ScoreError, match=match) as err:
            batcher.submit_ids(bad, top_k=2)
        assert err.value.index == (1 if "ids 1" in match else 0)
        good_after = random_request(rng, 2)
        s2 = batcher.submit_ids(good_after, top_k=2)
        engine.gate.set()
        assert_scored(s1.result(), good_before, 2)
        assert_scored(s2.result(), good_after, 2)
        first.result()
    assert all(VOCAB not in sum(c["ids"], []) for c in engine.calls)


@pytest.mark.parametrize("top_k, temperature, match", [(0, 1.0, "top_k must be a positive"), (VOCAB + 1, 1.0, "exceeds the vocabulary"), (2, 0.0, "temperature must be > 0")])
def test_request_level_checks_are_the_engines(engine, top_k, temperature, match):
    with RequestBatcher(engine) as batcher:
        with pytest.raises(ScoreError, match=match):
            batcher.submit_ids([np.array([1, 2])], top_k, temperature)
    assert engine.calls == []


def test_engine_failure_in_a_merged_batch_fails_only_the_culprit():
    engine = KeyedEngine(poison=13)
    rng = np.random.default_rng(5)
    with RequestBatcher(engine, max_wait_ms=0) as batcher:
        first = hold(engine, batcher)
        good1 = [a[a != 13] for a in random_request(rng, 2)]
        bad = [np.array([1, 13, 2], np.int32)]
        good2 = [a[a != 13] for a in random_request(rng, 3)]
        s1, sb, s2 = (batcher.submit_ids(r, top_k=2) for r in (good1, bad, good2))
        engine.gate.set()
        with pytest.raises(RuntimeError, match="poisoned"):
            sb.result()
        assert_scored(s1.result(), good1, 2)
        assert_scored(s2.result(), good2, 2)
        first.result()


def test_max_tokens_limit_raises_request_too_large(engine):
    with RequestBatcher(engine) as batcher:
        with pytest.raises(RequestTooLarge, match="21 tokens"):
            batcher.submit_ids([np.arange(1, 11), np.arange(1, 12)], top_k=1, max_tokens=20)
        assert len(batcher.score_ids([np.arange(1, 11)], top_k=1)) == 1


def test_texts_keep_offsets_and_tokens_as_the_engine_gives_them(bpe_tokenizer):
    engine = KeyedEngine(max_length=512, tokenizer=bpe_tokenizer)
    texts = ["def f(x):", "return x + 1", "a"]
    direct = engine.score_texts(texts, top_k=4)  # the engine's own path for texts is the reference
    with RequestBatcher(engine, max_wait_ms=0) as batcher:
        got = batcher.score_texts(texts, top_k=4)
        no_tokens = batcher.submit_texts(texts, top_k=4, return_tokens=False).result()
        with pytest.raises(ScoreError, match="text 1 is empty"):
            batcher.submit_texts(["ok", ""], top_k=1)
    for g, d, n in zip(got, direct, no_tokens):
        assert g.token_ids.tolist() == d.token_ids.tolist()
        np.testing.assert_array_equal(g.offsets, d.offsets)
        assert g.tokens == d.tokens and n.tokens is None
        np.testing.assert_array_equal(g.topk_ids, d.topk_ids)
        np.testing.assert_array_equal(g.topk_logprobs, d.topk_logprobs)


def test_only_the_batcher_thread_calls_the_engine(engine):
    rng = np.random.default_rng(6)
    with RequestBatcher(engine, max_wait_ms=1) as batcher:
        results = {}
        requests = {i: random_request(rng, 3) for i in range(1, 8, 2)}

        def client(i):
            if i % 2:
                results[i] = (requests[i], batcher.score_ids(requests[i], top_k=2))
            else:
                results[i] = batcher.generate(np.array([5, 6]), 3)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert engine.threads == {batcher._thread.ident}
    for i, r in results.items():
        if i % 2:
            assert_scored(r[1], r[0], 2)
        else:
            assert r.token_ids.tolist() == [7, 8, 9]


def test_waits_up_to_max_wait_for_company(engine):
    rng = np.random.default_rng(7)
    a, b = random_request(rng, 2), random_request(rng, 2)
    budget = sum(map(len, a + b))  # full exactly when both are queued: runs then, not at the deadline
    with RequestBatcher(engine, max_batch_tokens=budget, max_wait_ms=60_000) as batcher:
        sa = batcher.submit_ids(a, top_k=2)
        time.sleep(0.05)
        sb = batcher.submit_ids(b, top_k=2)
        sa.result(), sb.result()
    assert len(engine.calls) == 1 and engine.calls[0]["ids"] == [x.tolist() for x in a + b]


def test_generate_errors_reach_the_caller(engine):
    with RequestBatcher(engine) as batcher:
        with pytest.raises(ScoreError, match="max_new_tokens must be >= 0"):
            batcher.generate(np.array([1, 2]), -1)
        assert batcher.generate(np.array([1, 2]), 2).token_ids.tolist() == [3, 4]


def test_cancel_skips_the_rest_of_a_request(engine):
    with RequestBatcher(engine, max_batch_tokens=4, max_wait_ms=0) as batcher:
        first = hold(engine, batcher)
        seqs = [np.array([1, 2, 3], np.int32), np.array([4, 5, 6], np.int32), np.array([7, 8, 9], np.int32)]
        stream = batcher.submit_ids(seqs, top_k=1)
        stream.cancel()
        engine.gate.set()
        first.result()
        with pytest.raises(Cancelled):
            stream.result()
        batcher.score_ids([np.array([10, 11])], top_k=1)  # the thread is alive and the queue moved on
    assert [c["ids"] for c in engine.calls] == [[[1, 2]], [[10, 11]]]


def test_close_finishes_or_fails_pending_work_and_refuses_new(engine):
    batcher = RequestBatcher(engine, max_wait_ms=0)
    first = hold(engine, batcher)
    queued = batcher.submit_ids([np.array([3, 4])], top_k=1)
    gen = batcher.submit_generate(np.array([1]), 2)
    closer = threading.Thread(target=batcher.close, kwargs={"cancel_pending": True})
    closer.start()
    while not batcher.closed:  # queued work is failed under the lock before `closed` reads True
        time.sleep(0.001)
    engine.gate.set()
    closer.join(5)
    assert first.result()[0].token_ids.tolist() == [1, 2]  # in the engine already: finished
    with pytest.raises(ShuttingDown):
        queued.result()
    with pytest.raises(ShuttingDown):
        gen.result()
    with pytest.raises(ShuttingDown):
        batcher.submit_ids([np.array([1, 2])], top_k=1)

    graceful = RequestBatcher(engine, max_wait_ms=0)
    engine.gate.clear()
    pending = [graceful.submit_ids([np.array([5, 6])], top_k=1) for _ in range(3)]
    engine.gate.set()
    graceful.close()
    assert [p.result()[0].token_ids.tolist() for p in pending] == [[5, 6]] * 3
