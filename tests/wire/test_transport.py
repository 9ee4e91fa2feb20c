"""Transport semantics, checked identically on the in-process and the Redis-streams implementations."""

from __future__ import annotations

import threading
import time
import zlib

import numpy as np
import pytest

from fuseflow.sparse import Sample

TEACHERS = ["llama", "gemma"]


def samples(n: int, prefix: str = "s") -> list[Sample]:
    return [Sample(f"{prefix}{i}", f"text number {i} — ünïcode ✓") for i in range(n)]


def assert_same_dist(got, sent):
    """Equal up to float16 rounding of the logprobs (the Redis wire), padding included."""
    np.testing.assert_array_equal(got.ids, sent.ids)
    np.testing.assert_array_equal(got.aligned, sent.aligned)
    np.testing.assert_array_equal(got.gold_logprobs, sent.gold_logprobs)
    np.testing.assert_allclose(got.logprobs, sent.logprobs, rtol=2.0**-11, atol=0)
    assert got.meta == sent.meta


def answer_all(tr, teacher, make_dist, consumer="w0", error_for=(), seed=0):
    """Claim everything ``teacher`` has and answer it; return {sample id: dist sent}."""
    sent = {}
    while items := tr.claim_work(teacher, consumer, count=100, block_ms=20):
        for it in items:
            if it.sample.id in error_for:
                tr.complete_work(teacher, it, error=f"{teacher} cannot score {it.sample.id}")
            else:
                sent[it.sample.id] = make_dist(
                    7, 3, seed=zlib.crc32(f"{teacher}/{it.sample.id}/{seed}".encode()), meta={"teacher": teacher}
                )
                tr.complete_work(teacher, it, dist=sent[it.sample.id])
    return sent


def test_ready_only_when_every_teacher_answered(make_transport, make_dist):
    tr = make_transport()
    tr.submit(samples(3))
    sent_llama = answer_all(tr, "llama", make_dist)
    assert sorted(sent_llama) == ["s0", "s1", "s2"]
    assert tr.next_ready("rank0", count=10, block_ms=30) == []

    items = tr.claim_work("gemma", "g0", count=2, block_ms=50)
    for it in items:
        tr.complete_work("gemma", it, dist=make_dist(7, 3, seed=1, meta={"teacher": "gemma"}))
    ready = tr.next_ready("rank0", count=10, block_ms=200)
    assert sorted(r.sample.id for r in ready) == sorted(it.sample.id for it in items)
    for r in ready:
        assert sorted(r.dists) == sorted(TEACHERS)
        assert r.sample == Sample(r.sample.id, f"text number {r.sample.id[1:]} — ünïcode ✓")
        assert_same_dist(r.dists["llama"], sent_llama[r.sample.id])
        assert_same_dist(r.dists["gemma"], make_dist(7, 3, seed=1, meta={"teacher": "gemma"}))
    st = tr.stats()
    assert st["submitted"] == 3 and st["in_flight"] == 3 and st["ready"] == 2
    assert st["teachers"]["gemma"]["lag"] == 1 and st["teachers"]["llama"]["lag"] == 0
    assert st["trainer"]["pending"] == 2


def test_duplicate_result_is_ignored_first_answer_wins(make_transport, make_dist):
    tr = make_transport(teachers=["llama"])
    tr.submit(samples(1))
    (item,) = tr.claim_work("llama", "w0", count=5, block_ms=50)
    first, second = make_dist(5, 2, seed=10), make_dist(5, 2, seed=11)
    tr.complete_work("llama", item, dist=first)
    tr.complete_work("llama", item, dist=second)  # a redelivered copy answered again
    tr.complete_work("llama", item, error="late failure of a duplicate")  # must not dead-letter it
    (ready,) = tr.next_ready("rank0", count=5, block_ms=200)
    assert_same_dist(ready.dists["llama"], first)
    assert tr.next_ready("rank0", count=5, block_ms=30) == []  # ready exactly once
    assert tr.stats()["dead_letters"] == 0 and tr.dead_letters() == []


def test_complete_many_stores_results_and_dead_letters_in_one_call(make_transport, make_dist):
    tr = make_transport(teachers=["llama"])
    tr.submit(samples(3))
    items = tr.claim_work("llama", "w0", count=3, block_ms=50)
    sent = make_dist(6, 4, seed=7)
    tr.complete_many(
        "llama",
        [
            (items[0], sent, None),
            (items[1], None, "bad text"),
            (items[2], sent, None),
            (items[0], make_dist(6, 4, seed=8), None),
        ],
    )  # a duplicate in the same batch
    ready = tr.next_ready("rank0", count=10, block_ms=200)
    assert sorted(r.sample.id for r in ready) == ["s0", "s2"]
    for r in ready:
        assert_same_dist(r.dists["llama"], sent)
    assert [d["sample_id"] for d in tr.dead_letters()] == ["s1"]
    with pytest.raises(ValueError, match="exactly one of dist and error"):
        tr.complete_many("llama", [(items[0], None, None)])


def test_resubmitting_an_in_flight_sample_is_ignored(make_transport):
    tr = make_transport()
    tr.submit(samples(2) + samples(2))  # duplicates in one call
    tr.submit(samples(1))  # and in a later call
    assert tr.stats()["submitted"] == 2
    assert [it.sample.id for it in tr.claim_work("llama", "w0", count=10, block_ms=50)] == ["s0", "s1"]


def test_dead_letter_frees_the_sample_and_drops_other_answers(make_transport, make_dist):
    tr = make_transport()
    tr.submit(samples(3))
    answer_all(tr, "llama", make_dist, error_for={"s1"})
    (dead,) = tr.dead_letters()
    assert dead["sample_id"] == "s1" and dead["teacher"] == "llama"
    assert dead["reason"] == "llama cannot score s1" and dead["text"].startswith("text number 1")
    # gemma never receives the dead sample; its answers for the others make them ready.
    sent = answer_all(tr, "gemma", make_dist)
    assert sorted(sent) == ["s0", "s2"]
    ready = tr.next_ready("rank0", count=10, block_ms=200)
    assert sorted(r.sample.id for r in ready) == ["s0", "s2"]
    st = tr.stats()
    assert st["dead_letters"] == 1 and st["done"] == 1 and st["in_flight"] == 2


def test_corpus_documents_dead_lettered_before_dispatch_count_in_the_run(make_transport, make_dist):
    """Issue 15: a document the dispatcher cannot send (not UTF-8, a lone surrogate) is a dead letter of the run,
    counted like a teacher's, so train.max_dead_letter_fraction sees it; a resumed run reports it once."""
    tr = make_transport()
    tr.submit(samples(2))
    bad = [("7:0", "c.jsonl:8: not UTF-8 (invalid start byte at byte 3 of the line)", '{"text": "\\xff"}'),
           ("9:0", "c.jsonl:10: field 'text' holds a lone surrogate U+D800 at character 0", "\\ud800")]
    assert tr.dead_letter_inputs(bad) == 2
    assert tr.dead_letter_inputs(bad[:1]) == 0  # again on resume: once per sample id
    dead = tr.dead_letters()
    assert [(d["sample_id"], d["teacher"], d["reason"], d["text"]) for d in dead] == [(i, "corpus", r, t) for i, r, t in bad]
    st = tr.stats()
    assert (st["submitted"], st["done"], st["dead_letters"], st["in_flight"]) == (4, 2, 2, 2)
    for teacher in TEACHERS:
        answer_all(tr, teacher, make_dist)
    tr.finish_submissions()
    ready = tr.next_ready("rank0", count=10, block_ms=200)
    assert sorted(r.sample.id for r in ready) == ["s0", "s1"]  # the sent samples are untouched
    tr.ack_ready(ready)
    assert tr.is_finished()


def test_answer_after_dead_letter_is_ignored(make_transport, make_dist):
    tr = make_transport()
    tr.submit(samples(1))
    (g,) = tr.claim_work("gemma", "g0", count=1, block_ms=50)  # gemma holds it already
    (w,) = tr.claim_work("llama", "w0", count=1, block_ms=50)
    tr.complete_work("llama", w, error="too long")
    tr.complete_work("gemma", g, dist=make_dist(7, 3, seed=0))
    assert tr.next_ready("rank0", count=5, block_ms=30) == []
    st = tr.stats()
    assert st["in_flight"] == 0 and st["teachers"]["gemma"]["pending"] == 0
    tr.finish_submissions()
    assert tr.is_finished()


def test_window_blocks_submit_until_the_trainer_acks(make_transport, make_dist):
    tr = make_transport(window=2)
    tr.submit(samples(2))
    with pytest.raises(TimeoutError, match="window of 2"):
        tr.submit(samples(1, prefix="late"), timeout_s=0.2)
    assert tr.stats()["in_flight"] == 2

    done = threading.Event()

    def dispatcher():
        tr.submit(samples(3, prefix="more"), timeout_s=20)
        done.set()

    thread = threading.Thread(target=dispatcher, daemon=True)
    thread.start()
    time.sleep(0.1)
    assert not done.is_set() and tr.stats()["submitted"] == 2
    trained = 0
    deadline = time.monotonic() + 20
    while trained < 5 and time.monotonic() < deadline:
        for t in TEACHERS:
            answer_all(tr, t, make_dist)
        ready = tr.next_ready("rank0", count=10, block_ms=20)
        assert tr.stats()["in_flight"] <= 2
        tr.ack_ready(ready)
        trained += len(ready)
    thread.join(20)
    assert done.is_set() and trained == 5
    assert tr.stats()["submitted"] == 5 and tr.stats()["in_flight"] == 0


def test_reclaim_pending_work_of_a_dead_consumer(make_transport, make_dist):
    tr = make_transport(teachers=["llama"])
    tr.submit(samples(3))
    claimed = tr.claim_work("llama", "replica-dead", count=3, block_ms=50)
    assert len(claimed) == 3
    assert tr.claim_work("llama", "replica-2", count=3, block_ms=20) == []  # delivered once per group
    assert tr.reclaim_stale("llama", "replica-2", min_idle_ms=60_000, count=10) == []  # not idle long enough
    time.sleep(0.08)
    taken = tr.reclaim_stale("llama", "replica-2", min_idle_ms=50, count=2)
    assert [it.sample.id for it in taken] == ["s0", "s1"]
    assert [it.entry_id for it in taken] == [it.entry_id for it in claimed[:2]]
    for it in taken:
        tr.complete_work("llama", it, dist=make_dist(4, 2, seed=3))
    tr.complete_work("llama", claimed[0], dist=make_dist(4, 2, seed=4))  # the "dead" one wakes up: ignored
    ready = tr.next_ready("rank0", count=10, block_ms=200)
    assert sorted(r.sample.id for r in ready) == ["s0", "s1"]
    assert_same_dist(ready[0].dists["llama"], make_dist(4, 2, seed=3))
    assert tr.stats()["teachers"]["llama"]["pending"] == 1  # s2 still with the dead replica


def test_reclaim_ready_samples_of_a_dead_trainer_rank(make_transport, make_dist):
    tr = make_transport(teachers=["llama"])
    tr.submit(samples(2))
    answer_all(tr, "llama", make_dist)
    first = tr.next_ready("rank1", count=10, block_ms=200)
    assert len(first) == 2
    assert tr.next_ready("rank0", count=10, block_ms=20) == []
    time.sleep(0.08)
    taken = tr.reclaim_ready("rank0", min_idle_ms=50, count=10)
    assert sorted(r.sample.id for r in taken) == ["s0", "s1"]
    tr.ack_ready(taken)
    tr.ack_ready(first)  # the dead rank's late ack changes nothing
    st = tr.stats()
    assert st["done"] == 2 and st["in_flight"] == 0 and st["trainer"]["pending"] == 0


def test_ack_frees_the_sample_and_is_idempotent(make_transport, make_dist):
    tr = make_transport()
    tr.submit(samples(4))
    for t in TEACHERS:
        answer_all(tr, t, make_dist)
    ready = tr.next_ready("rank0", count=10, block_ms=200)
    assert len(ready) == 4
    tr.ack_ready(ready[:3])
    tr.ack_ready(ready[:3])
    st = tr.stats()
    assert st["done"] == 3 and st["work"] == 1 and st["ready"] == 1
    tr.ack_ready(ready)
    st = tr.stats()
    assert (st["done"], st["in_flight"], st["work"], st["ready"]) == (4, 0, 0, 0)
    assert not tr.is_finished()  # submissions not finished yet
    tr.finish_submissions()
    assert tr.is_finished()
    tr.submit(samples(1, prefix="next-epoch"))
    assert not tr.is_finished()
    # a sample id that was trained may be submitted again (a new epoch); only in-flight ids are deduplicated
    tr.submit(samples(1))
    assert tr.stats()["in_flight"] == 2


def test_loss_spans_travel_with_the_sample(make_transport, make_dist):
    tr = make_transport(teachers=["llama"])
    chat = Sample("chat-1", "user: hi\nassistant: hello", loss_spans=((19, 24), (25, 26)))
    tr.submit([chat])
    (item,) = tr.claim_work("llama", "w0", count=1, block_ms=50)
    assert item.sample == chat
    tr.complete_work("llama", item, dist=make_dist(3, 2, seed=0))
    (ready,) = tr.next_ready("rank0", count=1, block_ms=200)
    assert ready.sample == chat


def test_argument_errors_name_what_to_change(make_transport, make_dist):
    tr = make_transport()
    tr.submit(samples(1))
    (item,) = tr.claim_work("llama", "w0", count=1, block_ms=50)
    with pytest.raises(ValueError, match="exactly one of dist and error"):
        tr.complete_work("llama", item)
    with pytest.raises(ValueError, match="exactly one of dist and error"):
        tr.complete_work("llama", item, dist=make_dist(2, 2, seed=0), error="x")
    with pytest.raises(ValueError, match="'qwen' is not one of this run's teachers"):
        tr.claim_work("qwen", "w0", count=1, block_ms=0)
    with pytest.raises(ValueError, match="window"):
        make_transport(window=0)
    with pytest.raises(ValueError, match="unique"):
        make_transport(teachers=["a", "a"])


@pytest.mark.parametrize("replicas", [2])
def test_concurrent_run_trains_every_sample_exactly_once(make_transport, make_dist, replicas):
    """Dispatcher, two teachers with two replicas each, two trainer ranks, as threads."""
    n = 60
    tr = make_transport(window=8)
    stop = threading.Event()
    errors: list[BaseException] = []
    trained: list[str] = []
    lock = threading.Lock()

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - surfaced by the assertion below
                errors.append(e)
                stop.set()

        return run

    def dispatcher():
        for i in range(0, n, 7):
            tr.submit(samples(n)[i : i + 7], timeout_s=30)
        tr.finish_submissions()

    def worker(teacher, name):
        def run():
            while not stop.is_set():
                for it in tr.claim_work(teacher, name, count=3, block_ms=20):
                    if it.sample.id == "s13":
                        tr.complete_work(teacher, it, error="poison")
                    else:
                        tr.complete_work(teacher, it, dist=make_dist(6, 2, seed=int(it.sample.id[1:])))

        return run

    def trainer(rank):
        def run():
            while not stop.is_set():
                ready = tr.next_ready(rank, count=4, block_ms=20)
                for r in ready:
                    assert sorted(r.dists) == sorted(TEACHERS)
                    assert_same_dist(r.dists["gemma"], make_dist(6, 2, seed=int(r.sample.id[1:])))
                with lock:
                    trained.extend(r.sample.id for r in ready)
                tr.ack_ready(ready)
                if tr.is_finished():
                    stop.set()

        return run

    threads = [threading.Thread(target=guard(dispatcher))]
    threads += [threading.Thread(target=guard(worker(t, f"{t}-{i}"))) for t in TEACHERS for i in range(replicas)]
    threads += [threading.Thread(target=guard(trainer(f"rank{i}"))) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    stop.set()
    assert not errors, errors
    assert sorted(trained) == sorted(f"s{i}" for i in range(n) if i != 13)
    st = tr.stats()
    assert st["dead_letters"] == 1 and st["done"] == n and st["in_flight"] == 0 and tr.is_finished()
