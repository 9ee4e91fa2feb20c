"""The trainer's side of the trust boundary (issue 15): a rogue teacher's entry — NaN logprobs, a +inf gold
logprob, ids outside the target vocabulary, the wrong number of positions, undecodable bytes — never reaches
the loss and never crash-loops the trainer: the ready feed rejects it (back to its teacher once, or dead-letter
with the teacher and the reason), and every sample is accounted for. On both transports."""

from __future__ import annotations

import numpy as np
import pytest

from fuseflow.sparse import AlignedDist, Sample
from fuseflow.trainer.ready import ReadyFeed
from fuseflow.trainer.report import check_dead_letters
from fuseflow.wire.transport import REDISPATCH_LIMIT, check_ready

TEACHERS = ["alpha", "beta"]
T, K, VOCAB = 5, 3, 100


def good(seed: int) -> AlignedDist:
    rng = np.random.default_rng(seed)
    lp = -np.sort(rng.exponential(2.0, size=(T, K)), axis=1).astype(np.float16).astype(np.float32)  # [T, K]
    return AlignedDist(ids=rng.integers(0, VOCAB, size=(T, K)).astype(np.int32), logprobs=lp,
                       gold_logprobs=-rng.exponential(1.0, size=T).astype(np.float32), aligned=np.ones(T, bool))


def rogue(kind: str) -> AlignedDist:
    d = good(99)
    if kind == "nan":
        d.logprobs[1, 0] = np.nan
    elif kind == "inf_gold":
        d.gold_logprobs[0] = np.inf
    elif kind == "oov":
        d.ids[2, 1] = VOCAB + 7
    elif kind == "positions":  # a teacher aligned to another target tokenizer
        d = AlignedDist(ids=np.zeros((T + 2, K), np.int32), logprobs=np.zeros((T + 2, K), np.float32),
                        gold_logprobs=np.zeros(T + 2, np.float32), aligned=np.ones(T + 2, bool))
    return d


ROGUE = {"s1": "nan", "s2": "inf_gold", "s3": "oov", "s4": "positions"}


def answer(tr, monkeypatch, sample_ids, dists):
    """Both teachers answer; alpha with ``dists[id]`` where given — written as a rogue process would, past
    the checks an honest fuseflow teacher applies before it writes (``AlignedDist.validate``)."""
    with monkeypatch.context() as m:
        m.setattr(AlignedDist, "validate", lambda self, *a, **k: None)
        for teacher in TEACHERS:
            items = tr.claim_work(teacher, f"{teacher}-0", count=len(sample_ids), block_ms=100)
            assert sorted(it.sample.id for it in items) == sorted(sample_ids)
            for it in items:
                d = dists.get(it.sample.id) if teacher == "alpha" else None
                tr.complete_work(teacher, it, dist=d if d is not None else good(int(it.sample.id[1:])))


def feed_for(tr, tmp_path, redispatch):
    check = lambda r: check_ready(r, TEACHERS, VOCAB, T)  # noqa: E731 - every sample has T target positions
    feed = ReadyFeed(tr, "rank0", micro_batch=8, grad_accum=1, trained_log=tmp_path / "trained.log", poll_ms=20,
                     check=check, redispatch=redispatch)
    feed._skip = set()  # what iterating the feed reads from the (absent) trained-samples log first
    return feed


def corrupt_redis_entry(tr, sample_id: str) -> None:
    """Overwrite alpha's stored ids with bytes no decoder accepts (a writer on another wire version)."""
    tr.r.hset(tr.dist_key(sample_id), "alpha/ids", b"\x01\x02\x03")


@pytest.mark.parametrize("redispatch", [False, True])
def test_rogue_entries_are_rejected_and_every_sample_accounted_for(make_transport, tmp_path, monkeypatch, redispatch):
    tr = make_transport()
    samples = [Sample(f"s{i}", f"text {i}") for i in range(7)]
    tr.submit(samples)
    tr.finish_submissions()
    answer(tr, monkeypatch, [s.id for s in samples], {i: rogue(k) for i, k in ROGUE.items()})
    rogue_ids = set(ROGUE)
    if hasattr(tr, "r"):  # Redis: also an undecodable entry
        corrupt_redis_entry(tr, "s5")
        rogue_ids.add("s5")
    feed = feed_for(tr, tmp_path, redispatch)
    # A micro-batch of what can be ready now: with redispatch, rejected samples wait for alpha again.
    feed.micro_batch = len(samples) - len(rogue_ids) if redispatch else len(samples)
    batch = feed._fill()
    assert sorted(r.sample.id for r in batch) == sorted({s.id for s in samples} - rogue_ids)
    assert feed.rejected == len(rogue_ids)
    tr.ack_ready(batch)
    if redispatch:  # back to alpha, which now answers well: trained after all, nothing lost
        assert REDISPATCH_LIMIT >= 1
        items = tr.claim_work("alpha", "alpha-1", count=10, block_ms=200)
        assert sorted(it.sample.id for it in items) == sorted(rogue_ids)
        assert not tr.claim_work("beta", "beta-1", count=10, block_ms=50) or hasattr(tr, "r")  # Redis: beta ignores
        for it in items:
            tr.complete_work("alpha", it, dist=good(int(it.sample.id[1:])))
        feed.micro_batch = len(rogue_ids)
        again = feed._fill()
        assert sorted(r.sample.id for r in again) == sorted(rogue_ids)
        tr.ack_ready(again)
        assert tr.dead_letters() == []
    else:
        dead = {d["sample_id"]: d for d in tr.dead_letters()}
        assert set(dead) == rogue_ids and {d["teacher"] for d in dead.values()} == {"alpha"}
        assert "not NaN" in dead["s1"]["reason"] and "gold logprobs must be finite" in dead["s2"]["reason"]
        assert "outside the target vocabulary" in dead["s3"]["reason"]
        assert "7 positions for a sample of 5" in dead["s4"]["reason"]
        if "s5" in dead:
            assert "undecodable" in dead["s5"]["reason"]
    stats = tr.stats()
    assert stats["done"] == stats["submitted"] == len(samples) and tr.is_finished()


def test_a_teacher_that_stays_rogue_is_dead_lettered_after_the_redispatch_limit(make_transport, tmp_path, monkeypatch):
    tr = make_transport()
    tr.submit([Sample("s1", "text 1")])
    tr.finish_submissions()
    feed = feed_for(tr, tmp_path, redispatch=True)
    outcomes = []
    for attempt in range(REDISPATCH_LIMIT + 1):
        if attempt == 0:
            answer(tr, monkeypatch, ["s1"], {"s1": rogue("nan")})
        else:
            (it,) = tr.claim_work("alpha", "alpha-x", count=1, block_ms=200)
            with monkeypatch.context() as m:
                m.setattr(AlignedDist, "validate", lambda self, *a, **k: None)
                tr.complete_work("alpha", it, dist=rogue("nan"))
        (r,) = tr.next_ready("rank0", 1, 200)
        outcomes.append(tr.reject_ready(r, "alpha", feed.check(r)["alpha"], redispatch=True))
    assert outcomes == ["redispatched"] * REDISPATCH_LIMIT + ["dead"]
    assert feed._fill() == []  # nothing left in flight: the feed ends instead of waiting
    (dead,) = tr.dead_letters()
    assert dead["sample_id"] == "s1" and dead["teacher"] == "alpha" and tr.is_finished()


def test_a_run_that_dead_letters_too_much_fails(tmp_path):
    from fuseflow.config import RunFailed

    check_dead_letters({"submitted": 100, "dead_letters": 10}, 0.1, tmp_path)  # at the limit: fine
    with pytest.raises(RunFailed, match=r"79 of 100 samples \(79%\) were dead-lettered.*max_dead_letter_fraction"):
        check_dead_letters({"submitted": 100, "dead_letters": 79}, 0.1, tmp_path)


def test_the_sample_key_is_the_runs_own_across_restarts(tmp_path):
    """The key the dispatcher signs samples with (issue 26): new for a fresh run, readable by its user only, the
    same on a resume (samples in flight stay valid), a new one when a resume finds none (they get re-signed)."""
    import stat

    from fuseflow.trainer.dispatcher import SAMPLE_KEY_FILE, sample_key

    key, new = sample_key(tmp_path, fresh=True)
    assert new and len(key) == 32
    assert stat.S_IMODE((tmp_path / SAMPLE_KEY_FILE).stat().st_mode) == 0o600
    assert sample_key(tmp_path, fresh=False) == (key, False)
    again, new = sample_key(tmp_path, fresh=True)  # a fresh run under the same directory: a fresh key
    assert new and again != key
    (tmp_path / SAMPLE_KEY_FILE).unlink()
    lost, new = sample_key(tmp_path, fresh=False)
    assert new and lost not in (key, again) and (tmp_path / SAMPLE_KEY_FILE).exists()
