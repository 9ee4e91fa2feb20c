"""The trainer's checked reader of the Redis transport (issue 26): every field a teacher's Redis login can write —
the ready stream's entries and the ``dist:{run}:…`` hashes — is parsed, and whatever is malformed is dropped or
dead-lettered with its reason, never raised into the trainer. Samples are signed by the dispatcher under a key
the teachers never see, so a forged sample, or a sample whose text was changed, is never trained.

The forging client here logs in as the teachers' ACL user of the run (``run_acl_rules``), as a rogue teacher
would; the property-based test at the end writes random field sets and values."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid

import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuseflow.sparse import AlignedDist, Sample
from fuseflow.wire.codec import encode_aligned
from fuseflow.wire.redis_server import RedisServer
from fuseflow.wire.redis_streams import UNKNOWN_WRITER, RedisTransport, run_acl_rules
from fuseflow.wire.transport import check_ready

pytestmark = pytest.mark.integration
TEACHERS = ["alpha", "beta"]
T, K, VOCAB = 4, 3, 100
KEY = b"k" * 32


def good(seed: int) -> AlignedDist:
    rng = np.random.default_rng(seed)
    lp = -np.sort(rng.exponential(2.0, size=(T, K)), axis=1).astype(np.float16).astype(np.float32)  # [T, K]
    return AlignedDist(ids=rng.integers(0, VOCAB, size=(T, K)).astype(np.int32), logprobs=lp,
                       gold_logprobs=-rng.exponential(1.0, size=T).astype(np.float32), aligned=np.ones(T, bool))


@pytest.fixture(scope="module")
def acl_server():
    """A server whose role users are confined to the runs ``r-0`` … by prefix-free names: each test takes a
    run of its own (the rules name exact keys, so every run needs its users: made per run below)."""
    with RedisServer(password="admin", appendonly=False) as server:
        yield server


@contextlib.contextmanager
def acl_run(acl_server, prefix: str):
    """A fresh run with its own ACL users: ``(name, trainer transport (signing with KEY), teacher transport, the
    teacher's raw client)``; its keys and users are removed after."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    admin = acl_server.client()
    for role in ("teacher", "trainer"):
        admin.execute_command("ACL", "SETUSER", f"{role}-{name}", "on", f">pw-{role}", *run_acl_rules(name, role).split())
    url = f"redis://{{user}}:{{pw}}@127.0.0.1:{acl_server.port}/0"
    trainer = RedisTransport(url.format(user=f"trainer-{name}", pw="pw-trainer"), name, TEACHERS, window=64,
                             poll_s=0.01)
    teacher = RedisTransport(url.format(user=f"teacher-{name}", pw="pw-teacher"), name, TEACHERS)
    forger = redis.Redis.from_url(url.format(user=f"teacher-{name}", pw="pw-teacher"))
    try:
        trainer.authenticate(KEY)
        yield name, trainer, teacher, forger
    finally:
        trainer.reset()
        for c in (trainer, teacher, forger):
            c.close()
        for role in ("teacher", "trainer"):
            admin.execute_command("ACL", "DELUSER", f"{role}-{name}")


@pytest.fixture
def run(acl_server):
    """A fresh run with its own ACL users: ``(trainer transport, teacher transport, teacher's raw client)``."""
    with acl_run(acl_server, "r") as (_, trainer, teacher, forger):
        yield trainer, teacher, forger


def answer_all(teacher: RedisTransport, n: int) -> None:
    for t in TEACHERS:
        for it in teacher.claim_work(t, f"{t}-0", count=n, block_ms=100):
            teacher.complete_work(t, it, dist=good(int(it.sample.id.split("-")[-1])))


def read_all(trainer: RedisTransport, rounds: int = 3) -> list:
    got = []
    for _ in range(rounds):
        got += trainer.next_ready("rank0", 50, 20)
    return got


def forge_ready(forger, trainer, entry_id: str | None = None, **fields) -> str:
    return forger.xadd(trainer.k_ready, fields or {"foo": "bar"}, id=entry_id or "*").decode()


def test_a_ready_entry_without_an_id_no_longer_crashes_the_reader(run):
    """``XADD ready:{run} * foo bar`` raised KeyError: b'id' in the trainer, on every restart (issue 26)."""
    trainer, teacher, forger = run
    trainer.submit([Sample("s-0", "zero"), Sample("s-1", "one")])
    answer_all(teacher, 2)
    junk = [forge_ready(forger, trainer, foo="bar"), forge_ready(forger, trainer, id=b"\xff\xfe"),
            forge_ready(forger, trainer, id="s-0", extra="field"), forge_ready(forger, trainer, id="")]
    ready = read_all(trainer)
    assert sorted(r.sample.id for r in ready) == ["s-0", "s-1"] and not any(r.problems for r in ready)
    left = {e[0].decode() for e in trainer.r.xrange(trainer.k_ready)}
    assert not left & set(junk), "junk entries are acked and deleted, so no restart reads them again"
    trainer.ack_ready(ready)
    assert trainer.is_finished() is False and trainer.stats()["done"] == 2 == trainer.stats()["submitted"]


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("_spans", b"not json", "field _spans is not JSON"),
    ("_spans", b"[[3, 1]]", "field _spans[0] must be [start, end] with 0 <= start <= end"),
    ("_spans", b'{"a": 1}', "field _spans must be a JSON list of [start, end] pairs, got dict"),
    ("_text", b"caf\xe9 x", "field _text is not UTF-8 (invalid continuation byte at byte 3)"),
    ("_work", b"not-an-id", "field _work must be a stream entry id"),
    ("_n", b"two", "field _n must be an integer"),
    ("_redispatched", b"x", "field _redispatched must be an integer"),
    ("_id", b"s-9", "field _id 's-9' is not the sample id 's-1'"),
    ("mallory/ids", b"\x00", "unexpected field 'mallory/ids'"),
    ("zzz", b"1", "unexpected field 'zzz'"),
])
def test_a_signed_sample_with_a_broken_field_is_dead_lettered_with_the_reason(run, field, value, reason):
    trainer, teacher, forger = run
    trainer.submit([Sample("s-0", "zero"), Sample("s-1", "one", loss_spans=((0, 2),))])
    answer_all(teacher, 2)
    forger.hset(trainer.dist_key("s-1"), field, value)
    ready = read_all(trainer)  # no exception
    assert [r.sample.id for r in ready] == ["s-0"]
    (dead,) = trainer.dead_letters()
    assert dead["sample_id"] == "s-1" and dead["teacher"] == UNKNOWN_WRITER and reason in dead["reason"]
    trainer.ack_ready(ready)
    stats = trainer.stats()
    assert stats["done"] == stats["submitted"] == 2 and stats["dead_letters"] == 1  # accounted for
    assert not trainer.r.exists(trainer.dist_key("s-1"))


def test_changed_text_or_spans_fail_the_dispatchers_signature(run):
    trainer, teacher, forger = run
    trainer.submit([Sample("s-0", "zero"), Sample("s-1", "one")])
    answer_all(teacher, 2)
    forger.hset(trainer.dist_key("s-0"), "_text", "poisoned text")
    forger.hset(trainer.dist_key("s-1"), "_spans", "[[0, 1]]")
    assert read_all(trainer) == []
    dead = {d["sample_id"]: d["reason"] for d in trainer.dead_letters()}
    assert set(dead) == {"s-0", "s-1"} and all("changed after dispatch" in r for r in dead.values())


def valid_forgery(forger, trainer, sample_id: str, text: str = "forged text") -> str:
    """A well-formed sample with well-formed answers of every teacher, as a rogue teacher can write it, and a
    ready entry naming it: everything but the dispatcher's signature."""
    entry = forge_ready(forger, trainer, id=sample_id)
    fields = {"_id": sample_id, "_text": text, "_spans": "", "_work": "1-0", "_n": len(TEACHERS), "_ready": entry}
    for t in TEACHERS:
        fields["@" + t] = 1
        fields.update({f"{t}/{k.decode()}": v for k, v in encode_aligned(good(7)).items()})
    forger.hset(trainer.dist_key(sample_id), mapping=fields)
    return entry


def test_a_forged_sample_is_dropped_and_never_counted(run):
    trainer, teacher, forger = run
    trainer.submit([Sample("s-0", "zero")])
    answer_all(teacher, 1)
    valid_forgery(forger, trainer, "forged-1")
    ready = read_all(trainer)
    assert [r.sample.id for r in ready] == ["s-0"]
    (dead,) = trainer.dead_letters()
    assert dead["sample_id"] == "forged-1" and "not a sample this run's dispatcher sent" in dead["reason"]
    trainer.ack_ready(ready)
    trainer.finish_submissions()
    stats = trainer.stats()
    assert (stats["submitted"], stats["done"], stats["dead_letters"]) == (1, 1, 0) and trainer.is_finished()
    assert not trainer.r.exists(trainer.dist_key("forged-1"))


def test_without_a_key_the_reader_still_checks_every_field(run):
    """Unsigned (a transport nobody called ``authenticate`` on): no provenance, but the same parsing."""
    trainer, teacher, forger = run
    trainer._sample_key = None
    trainer.submit([Sample("s-0", "zero")])
    answer_all(teacher, 1)
    forger.hset(trainer.dist_key("s-0"), "_spans", "[1")
    assert read_all(trainer) == [] and "field _spans is not JSON" in trainer.dead_letters()[0]["reason"]


def test_an_undecodable_answer_is_the_teachers_problem_for_the_feed(run):
    trainer, teacher, forger = run
    trainer.submit([Sample("s-0", "zero")])
    answer_all(teacher, 1)
    forger.hset(trainer.dist_key("s-0"), "alpha/meta", b"\xff\xfe{}")
    forger.hset(trainer.dist_key("s-0"), "beta/extra", b"1")
    (r,) = read_all(trainer)
    assert r.problems == {"alpha": "undecodable entry: meta is not UTF-8 (invalid start byte at byte 0)",
                          "beta": "unexpected field 'beta/extra' in its answer"}
    assert check_ready(r, TEACHERS, VOCAB, T) == r.problems
    assert trainer.reject_ready(r, "alpha", r.problems["alpha"], redispatch=True) == "redispatched"
    (again,) = teacher.claim_work("alpha", "alpha-1", count=5, block_ms=100)
    assert again.sample == Sample("s-0", "zero")  # the text the dispatcher signed, not re-read from the hash


def test_reset_needs_no_scan_and_keeps_a_blocked_teacher_undisturbed(run):
    """The trainer resets a run without SCAN (refused to both roles now) in one atomic script: a teacher blocked
    on its queue meanwhile neither sees NOGROUP nor logs a warning (issue 26)."""
    trainer, teacher, forger = run
    trainer.submit([Sample("s-0", "zero"), Sample("s-1", "one")])
    errors = []

    def claim():
        try:
            teacher.claim_work("beta", "beta-0", count=1, block_ms=1500)
        except Exception as e:  # noqa: BLE001 - what the test looks for
            errors.append(e)

    answer_all(teacher, 2)
    thread = threading.Thread(target=claim)
    thread.start()
    time.sleep(0.3)
    assert trainer.reset() >= 4  # streams, state and both dist hashes
    thread.join()
    assert errors == []
    assert not trainer.r.exists(trainer.dist_key("s-0")) and trainer.stats()["in_flight"] == 0
    with pytest.raises(redis.exceptions.NoPermissionError):
        forger.scan()


def test_junk_work_entries_are_skipped_not_raised_into_a_teacher(run):
    """Another client with the teachers' login may add work entries: one that is not {id, text, spans} is acked
    and skipped by every teacher's worker, which goes on with the dispatcher's samples."""
    trainer, teacher, forger = run
    forger.xadd(trainer.k_work, {"foo": "bar"})
    forger.xadd(trainer.k_work, {"id": b"\xff", "text": "t", "spans": ""})
    forger.xadd(trainer.k_work, {"id": "x", "text": "t", "spans": "[[1"})
    trainer.submit([Sample("s-0", "zero")])
    assert [it.sample.id for it in teacher.claim_work("alpha", "alpha-0", count=10, block_ms=50)] == ["s-0"]
    assert teacher.stats()["teachers"]["alpha"]["pending"] == 1  # the junk is acked, the sample held


def test_resuming_without_the_key_signs_the_samples_in_flight(run):
    trainer, teacher, forger = run
    trainer.submit([Sample("s-0", "zero")])
    answer_all(teacher, 1)
    trainer.authenticate(b"another key, 32 bytes long......")
    assert trainer.sign_in_flight() == 1
    assert [r.sample.id for r in read_all(trainer)] == ["s-0"]


# ----------------------------------------------------------------------------------------------------------
# Property: whatever a teacher's login writes into the ready stream and into hashes of its own making, the
# trainer's feed finishes with every honest sample exactly once and nothing else.
# ----------------------------------------------------------------------------------------------------------

HONEST = [Sample(f"h-{i}", f"honest text {i}") for i in range(4)]
_names = st.sampled_from([b"id", b"_id", b"_text", b"_spans", b"_work", b"_n", b"_ready", b"_sig", b"_sig_id",
                          b"_redispatched", b"@alpha", b"alpha/ids", b"alpha/meta", b"beta/gold", b"mallory/ids",
                          b"foo", b"\xff"])
_values = st.one_of(
    st.binary(max_size=24),
    st.sampled_from([b"", b"0", b"1", b"-1", b"1-0", b"[]", b"[[0, 1]]", b"[[0", b"{}", b"null", b"\xff\xfe",
                     b"h-0", b"h-1", b"f-0", b'{"v": 1, "T": 4, "k": 3}'] + list(encode_aligned(good(1)).values())),
)
_forged_id = st.sampled_from(["f-0", "f-1", "f-2"])  # never an honest sample's id: its hash is not the forger's
_op = st.one_of(
    st.tuples(st.just("ready"), st.dictionaries(_names, st.one_of(_values, _forged_id.map(str.encode),
                                                                  st.sampled_from([s.id.encode() for s in HONEST])),
                                                min_size=1, max_size=3)),
    st.tuples(st.just("hash"), _forged_id, st.dictionaries(_names, _values, min_size=1, max_size=6)),
    st.tuples(st.just("linked"), _forged_id, st.dictionaries(_names, _values, max_size=4)),  # hash + its ready entry
    st.tuples(st.just("valid"), _forged_id),  # well-formed in every field but the signature
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, max_size=8), split=st.integers(0, len(HONEST)))
def test_forged_fields_never_stop_the_feed_nor_reach_training(acl_server, tmp_path, ops, split):
    from fuseflow.trainer.ready import ReadyFeed

    with acl_run(acl_server, "p") as (name, trainer, teacher, forger):
        trainer.submit(HONEST)
        trainer.finish_submissions()

        def forge(op):
            kind = op[0]
            if kind == "ready":
                forger.xadd(trainer.k_ready, op[1])
            elif kind == "hash":
                forger.hset(trainer.dist_key(op[1]), mapping=op[2])
            elif kind == "linked":
                entry = forger.xadd(trainer.k_ready, {"id": op[1]})
                forger.hset(trainer.dist_key(op[1]), mapping={**op[2], b"_ready": entry})
            else:
                valid_forgery(forger, trainer, op[1])

        for op in ops[: len(ops) // 2]:
            forge(op)
        for t in TEACHERS:  # honest teachers answer some samples, the forger writes, they answer the rest
            for it in teacher.claim_work(t, f"{t}-0", count=split, block_ms=50) if split else []:
                teacher.complete_work(t, it, dist=good(int(it.sample.id[2:])))
        for op in ops[len(ops) // 2:]:
            forge(op)
        answer_all(teacher, len(HONEST))

        feed = ReadyFeed(trainer, "rank0", micro_batch=3, grad_accum=1, trained_log=tmp_path / f"{name}.log",
                         poll_ms=20, check=lambda r: check_ready(r, TEACHERS, VOCAB, T), stall_timeout_s=10)
        trained = []
        for batch in feed:  # ends when the epoch is over: no exception, no stall
            trained += [s.id for s, _ in batch]
            feed.ack_durable([s.id for s, _ in batch])
        assert sorted(trained) == sorted(s.id for s in HONEST)  # each honest sample once, nothing forged
        stats = trainer.stats()
        assert stats["submitted"] == stats["done"] == len(HONEST) and stats["dead_letters"] == 0
        assert trainer.is_finished()
