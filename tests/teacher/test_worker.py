"""The teacher's Redis worker (``fuseflow.teacher.worker.run_worker``) on both transports, with a fake aligner:
results, dead letters, engine faults, takeover of a dead replica's work, a Redis restart."""

from __future__ import annotations

import threading
import time
import zlib

import numpy as np
import pytest

from fuseflow.sparse import AlignedDist, Sample
from fuseflow.score.aligner import AlignedResult
from fuseflow.teacher.worker import EngineFailure, run_worker
from fuseflow.wire.inprocess import InProcessTransport

TEACHERS = ["alpha", "beta"]


def expected_dist(teacher: str, sample: Sample) -> AlignedDist:
    """Deterministic per (teacher, sample): what the fake aligner answers, so results can be checked."""
    rng = np.random.default_rng(zlib.crc32(f"{teacher}/{sample.id}".encode()))
    t, k = 3 + len(sample.text) % 5, 4
    lp = -np.sort(rng.exponential(2.0, size=(t, k)), axis=1).astype(np.float16).astype(np.float32)  # [T, k]
    return AlignedDist(
        ids=rng.integers(0, 500, size=(t, k)).astype(np.int32),  # [T, k]
        logprobs=lp,
        gold_logprobs=-rng.exponential(1.0, size=t).astype(np.float32),  # [T]
        aligned=np.ones(t, dtype=bool),  # [T]
        meta={"teacher": teacher, "source_tokens": t + 1},
    )


class FakeAligner:
    """``TeacherAligner``'s contract: empty text → an error result; ``raise_for`` ids raise like the engine would
    (``ValueError`` for a batch of one bad sample); ``faults`` makes the next calls raise ``RuntimeError``."""

    def __init__(self, name, raise_for=(), faults=0, broken=False, delay_s=0.0):
        self.name, self.raise_for, self.faults, self.broken, self.delay_s = name, set(raise_for), faults, broken, delay_s
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()

    def run(self, samples):
        with self.lock:
            self.calls.append([s.id for s in samples])
            if self.broken or self.faults > 0:
                self.faults -= 1
                raise RuntimeError("CUDA error: an illegal memory access")
        time.sleep(self.delay_s)
        bad = [s for s in samples if s.id in self.raise_for]
        if bad and len(samples) == 1:
            raise ValueError(f"text 0 has 999 tokens, more than max_length 64 of {self.name}")
        if bad:
            raise ValueError("one bad text fails the whole batch")
        return [AlignedResult(s, None, "empty text") if not s.text.strip() else AlignedResult(s, expected_dist(self.name, s))
                for s in samples]


def texts(n, prefix="s"):
    return [Sample(f"{prefix}{i}", f"sample text {i} " * (1 + i % 3)) for i in range(n)]


class Workers:
    """``run_worker`` threads; ``stop()`` joins them and returns their stats (re-raising a worker's error)."""

    def __init__(self):
        self.stop_event = threading.Event()
        self.threads, self.results, self.errors = [], {}, {}

    def start(self, aligner, transport, consumer, **kw):
        def target():
            try:
                self.results[consumer] = run_worker(aligner, transport, consumer, self.stop_event, **kw)
            except BaseException as e:  # noqa: BLE001 - checked by the test
                self.errors[consumer] = e

        th = threading.Thread(target=target, daemon=True)
        th.start()
        self.threads.append(th)
        return th

    def stop(self):
        self.stop_event.set()
        for th in self.threads:
            th.join(10)
            assert not th.is_alive(), "a worker did not stop within 10 s of stop_event"
        return self.results


def drain(tr, n_expected, timeout_s=20.0):
    """Read and ack ready samples until ``n_expected`` arrived (or the timeout); returns them by id."""
    got = {}
    deadline = time.monotonic() + timeout_s
    while len(got) < n_expected and time.monotonic() < deadline:
        for r in tr.next_ready("rank0", 16, 50):
            assert r.sample.id not in got, f"sample {r.sample.id} ready twice"
            got[r.sample.id] = r
            tr.ack_ready([r])
    return got


def assert_dist_equal(got: AlignedDist, want: AlignedDist):
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.logprobs, want.logprobs)  # fp16-representable: exact on both wires
    np.testing.assert_array_equal(got.gold_logprobs, want.gold_logprobs)
    np.testing.assert_array_equal(got.aligned, want.aligned)


def test_every_sample_answered_and_bad_ones_dead_lettered(make_transport):
    tr = make_transport()
    samples = texts(20)
    samples[5] = Sample("s5", "   ")  # empty text: the aligner's own error result
    tr.submit(samples)
    tr.finish_submissions()
    w = Workers()
    w.start(FakeAligner("alpha", raise_for={"s9"}), tr, "a0", batch_size=4, block_ms=50)
    w.start(FakeAligner("beta"), tr, "b0", batch_size=3, block_ms=50)
    got = drain(tr, 18)
    stats = w.stop()
    assert not w.errors
    assert sorted(got) == sorted(s.id for s in samples if s.id not in {"s5", "s9"})
    for s in samples:
        if s.id in got:
            for t in TEACHERS:
                assert_dist_equal(got[s.id].dists[t], expected_dist(t, s))
    dead = {d["sample_id"]: d for d in tr.dead_letters()}
    assert set(dead) == {"s5", "s9"}
    assert dead["s5"]["reason"] == "empty text"
    assert "max_length 64" in dead["s9"]["reason"] and dead["s9"]["teacher"] == "alpha"
    # s5 may be dead-lettered by beta before alpha ever sees it (its work entry is then gone)
    assert stats["a0"].ok == 18 and stats["a0"].failed in (1, 2)
    assert stats["a0"].source_tokens == sum(expected_dist("alpha", s).meta["source_tokens"] for s in samples
                                            if s.id in got)
    assert tr.is_finished()


def test_transient_engine_fault_is_retried_not_dead_lettered(make_transport):
    tr = make_transport(teachers=["alpha"])
    tr.submit(texts(6))
    aligner = FakeAligner("alpha", faults=2)
    w = Workers()
    w.start(aligner, tr, "a0", batch_size=6, block_ms=50)
    got = drain(tr, 6)
    w.stop()
    assert len(got) == 6 and not tr.dead_letters() and not w.errors
    assert len(aligner.calls) == 3  # two faults, then the same batch again


def test_broken_engine_stops_the_worker_and_leaves_the_work_pending(make_transport):
    tr = make_transport(teachers=["alpha"])
    tr.submit(texts(3))
    w = Workers()
    th = w.start(FakeAligner("alpha", broken=True), tr, "a0", batch_size=3, block_ms=50)
    th.join(20)
    assert isinstance(w.errors.get("a0"), EngineFailure)
    assert not tr.dead_letters()
    assert tr.stats()["teachers"]["alpha"]["pending"] == 3  # for a healthy replica to reclaim
    w.stop()


def test_a_live_replica_takes_over_the_work_of_a_dead_one(make_transport):
    tr = make_transport(teachers=["alpha"])
    tr.submit(texts(10))
    dead = tr.claim_work("alpha", "dead-replica", count=4, block_ms=0)  # claimed, never completed
    assert len(dead) == 4
    w = Workers()
    w.start(FakeAligner("alpha"), tr, "a1", batch_size=4, block_ms=50, reclaim_idle_ms=300)
    got = drain(tr, 10)
    stats = w.stop()
    assert sorted(got) == sorted(s.id for s in texts(10))
    assert stats["a1"].reclaimed == 4
    assert tr.stats()["teachers"]["alpha"]["pending"] == 0


def test_unknown_teacher_name_is_rejected():
    tr = InProcessTransport("w", TEACHERS)
    with pytest.raises(ValueError, match="--source"):
        run_worker(FakeAligner("gamma"), tr, "c", threading.Event())


def test_metrics_get_outcomes_and_lag():
    from fuseflow.teacher.metrics import TeacherMetrics

    tr = InProcessTransport("w", ["alpha"])
    samples = texts(5) + [Sample("blank", "")]
    tr.submit(samples)
    metrics = TeacherMetrics()
    w = Workers()
    w.start(FakeAligner("alpha"), tr, "a0", metrics=metrics, batch_size=8, block_ms=50)
    drain(tr, 5)
    w.stop()
    assert metrics.value("worker_samples_total", {"outcome": "ok"}) == 5
    assert metrics.value("worker_samples_total", {"outcome": "error"}) == 1
    assert metrics.value("worker_tokens_total") == sum(expected_dist("alpha", s).meta["source_tokens"] for s in samples[:5])




@pytest.mark.integration
def test_worker_survives_a_redis_restart(restartable_redis_server):
    """The server goes away for 2 s mid-run (graceful stop, append-only file on): no crash, no lost work."""
    from fuseflow.wire.redis_streams import RedisTransport

    server = restartable_redis_server
    tr = RedisTransport(server.url, "restart", ["alpha"], window=64, poll_s=0.01)
    samples = texts(30)
    tr.submit(samples)
    tr.finish_submissions()
    w = Workers()
    w.start(FakeAligner("alpha", delay_s=0.02), tr, "a0", batch_size=2, block_ms=50)
    got = drain(tr, 8)
    server.stop()  # down long enough for redis-py's own retries to give up
    time.sleep(2.0)
    server.start()
    got.update(drain(tr, 30 - len(got)))
    stats = w.stop()
    assert not w.errors
    assert sorted(got) == sorted(s.id for s in samples)
    assert stats["a0"].retries > 0  # it did see the outage
    assert tr.is_finished()
    tr.close()


def test_a_claim_whose_reply_is_lost_is_answered_without_waiting_for_reclaim(redis_server):
    """A Redis restart can lose a reply: the server ran XREADGROUP (the entries are pending to this consumer, in
    the append-only file too) but the worker never got them. Nobody else reads them before the reclaim idle time
    (30 s by default), so the worker re-reads its own pending entries after an outage."""
    import redis

    from fuseflow.wire.redis_streams import RedisTransport

    run = "lost-claim"
    tr = RedisTransport(redis_server.url, run, ["alpha"], window=64, poll_s=0.01)
    tr.reset()
    worker_tr = RedisTransport(redis_server.url, run, ["alpha"], window=64, poll_s=0.01)
    real_xreadgroup, lost = worker_tr.r.xreadgroup, []

    def xreadgroup(*args, **kwargs):
        reply = real_xreadgroup(*args, **kwargs)
        if reply and not lost:
            lost.append(reply)
            raise redis.ConnectionError("Connection closed by server.")  # executed there, reply lost here
        return reply

    worker_tr.r.xreadgroup = xreadgroup
    samples = texts(10)
    tr.submit(samples)
    tr.finish_submissions()
    w = Workers()
    w.start(FakeAligner("alpha"), worker_tr, "a0", batch_size=3, block_ms=50, reclaim_idle_ms=600_000)
    got = drain(tr, 10, timeout_s=15.0)
    stats = w.stop()
    assert not w.errors and lost
    assert sorted(got) == sorted(s.id for s in samples)
    assert stats["a0"].retries == 1 and stats["a0"].reclaimed == 0
    assert tr.is_finished()
    tr.reset()
    tr.close()
    worker_tr.close()


class RogueAligner(FakeAligner):
    """Answers like FakeAligner, with the values a broken teacher sends for the samples in ``rogue``: a NaN
    logprob, a +inf gold logprob (it would win MinCE everywhere), an id past any vocabulary, a 1-D array."""

    ROGUE = {
        "s1": lambda d: d.logprobs.__setitem__((0, 0), np.nan),
        "s2": lambda d: d.gold_logprobs.__setitem__(0, np.inf),
        "s3": lambda d: d.logprobs.__setitem__((1, 1), 0.5),
        "s4": lambda d: setattr(d, "ids", d.ids[:, 0].copy()),
    }

    def run(self, samples):
        out = super().run(samples)
        for r in out:
            if r.dist is not None and r.sample.id in self.ROGUE:
                self.ROGUE[r.sample.id](r.dist)
        return out


def test_invalid_distributions_are_dead_lettered_by_the_teacher_not_fatal(make_transport):
    """Issue 15: NaN logprobs from one teacher turned distillation off for a whole run (exit 0)."""
    tr = make_transport()
    samples = texts(8)
    tr.submit(samples)
    tr.finish_submissions()
    w = Workers()
    w.start(RogueAligner("alpha"), tr, "a0", batch_size=4, block_ms=50)
    w.start(FakeAligner("beta"), tr, "b0", batch_size=4, block_ms=50)
    got = drain(tr, 4)
    w.stop()
    assert not w.errors
    assert sorted(got) == ["s0", "s5", "s6", "s7"]
    dead = {d["sample_id"]: d for d in tr.dead_letters()}
    assert set(dead) == set(RogueAligner.ROGUE) and {d["teacher"] for d in dead.values()} == {"alpha"}
    assert "not NaN" in dead["s1"]["reason"] and "gold logprobs must be finite" in dead["s2"]["reason"]
    assert "<= 0" in dead["s3"]["reason"] and "[T, k]" in dead["s4"]["reason"]
    assert tr.is_finished()
