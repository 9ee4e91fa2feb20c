"""What only the Redis transport has: state that outlives the process, keys, and the server restarting."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from fuseflow.sparse import Sample
from fuseflow.wire.redis_server import RedisServer
from fuseflow.wire.redis_streams import RedisTransport
from fuseflow.wire.transport import Backoff, TransportRefused, TransportUnavailable, retrying

pytestmark = pytest.mark.integration
TEACHERS = ["llama", "gemma"]


def samples(n: int) -> list[Sample]:
    return [Sample(f"s{i}", f"text {i}") for i in range(n)]


@pytest.fixture
def run_name():
    return f"r-{uuid.uuid4().hex[:8]}"


def test_trainer_restart_rereads_its_unacked_samples_first(redis_server, run_name, make_dist):
    tr = RedisTransport(redis_server.url, run_name, ["llama"])
    tr.submit(samples(5))
    for it in tr.claim_work("llama", "w0", count=5, block_ms=50):
        tr.complete_work("llama", it, dist=make_dist(3, 2, seed=0))
    before = tr.next_ready("rank0", count=3, block_ms=100)
    tr.ack_ready(before[:1])
    tr.close()  # rank0 dies with two samples read but not acked

    restarted = RedisTransport(redis_server.url, run_name, ["llama"])
    again = restarted.next_ready("rank0", count=1, block_ms=100)  # history is paged as well
    again += restarted.next_ready("rank0", count=1, block_ms=100)
    assert [r.entry_id for r in again] == [r.entry_id for r in before[1:]]
    rest = restarted.next_ready("rank0", count=10, block_ms=100)
    assert sorted(r.sample.id for r in rest) == ["s3", "s4"]
    restarted.ack_ready(again + rest)
    assert restarted.stats()["in_flight"] == 0
    restarted.reset()
    restarted.close()


def test_keys_share_the_run_hash_tag_and_acks_return_memory(redis_server, run_name, make_dist):
    r = redis_server.client()
    tr = RedisTransport(redis_server.url, run_name, TEACHERS, window=4)
    tr.submit(samples(4))
    for t in TEACHERS:
        for it in tr.claim_work(t, "w0", count=4, block_ms=50):
            tr.complete_work(t, it, dist=make_dist(512, 10, seed=1))
    keys = sorted(k.decode() for k in r.scan_iter(match=f"*{{{run_name}}}*"))
    assert keys == sorted(
        [f"dist:{{{run_name}}}:s{i}" for i in range(4)] + [f"{p}:{{{run_name}}}" for p in ("work", "ready", "state")]
    )
    held = sum(r.memory_usage(k, samples=0) for k in keys)
    assert held > 4 * 2 * 512 * 64  # four samples' distributions of two teachers
    tr.ack_ready(tr.next_ready("rank0", count=10, block_ms=100))
    left = sorted(k.decode() for k in r.scan_iter(match=f"*{{{run_name}}}*"))
    assert left == [f"{p}:{{{run_name}}}" for p in ("ready", "state", "work")]
    assert r.xlen(tr.k_work) == 0 and r.xlen(tr.k_ready) == 0
    assert sum(r.memory_usage(k, samples=0) for k in left) < 8192
    assert tr.reset() == 3 and not list(r.scan_iter(match=f"*{{{run_name}}}*dist*"))
    tr.close()


@pytest.mark.parametrize("how,fsync", [("kill", "always"), ("stop", "everysec")])
def test_streams_survive_a_server_restart_with_aof(tmp_path, run_name, make_dist, how, fsync):
    """SIGKILL (a crash) with appendfsync always, and a graceful stop with everysec, then restart on the
    same port and data dir: work, pending deliveries, partial answers and counters are all still there."""
    with RedisServer(data_dir=tmp_path / "data", appendonly=True, appendfsync=fsync, password="s3cret") as server:
        tr = RedisTransport(server.url, run_name, TEACHERS, window=8)
        tr.submit(samples(3))
        sent = {}
        for it in tr.claim_work("llama", "llama-0", count=3, block_ms=50):
            sent[it.sample.id] = make_dist(9, 4, seed=int(it.sample.id[1:]))
            tr.complete_work("llama", it, dist=sent[it.sample.id])
        held = tr.claim_work("gemma", "gemma-0", count=1, block_ms=50)  # pending when the server goes down
        port = server.port
        getattr(server, how)()
        assert not server.running
        server.restart()
        assert server.port == port

        tr2 = RedisTransport(server.url, run_name, TEACHERS, window=8)
        st = tr2.stats()
        assert (st["submitted"], st["work"], st["teachers"]["gemma"]["pending"]) == (3, 3, 1)
        [stale] = tr2.reclaim_stale("gemma", "gemma-1", min_idle_ms=0, count=10)
        assert stale.entry_id == held[0].entry_id
        items = [stale, *tr2.claim_work("gemma", "gemma-1", count=10, block_ms=50)]
        for it in items:
            tr2.complete_work("gemma", it, dist=make_dist(9, 4, seed=99))
        ready = tr2.next_ready("rank0", count=10, block_ms=200)
        assert sorted(r.sample.id for r in ready) == ["s0", "s1", "s2"]
        for r in ready:
            np.testing.assert_array_equal(r.dists["llama"].ids, sent[r.sample.id].ids)
        tr2.ack_ready(ready)
        tr2.finish_submissions()
        assert tr2.is_finished()
        tr.close()
        tr2.close()


def test_unreachable_redis_names_the_url_without_its_password():
    with pytest.raises(TransportUnavailable, match=r"Redis at redis://127\.0\.0\.1:1/0") as e:
        RedisTransport("redis://:s3cret@127.0.0.1:1/0", "x", ["a"])
    assert "s3cret" not in str(e.value)


def test_redis_errors_leave_the_transport_as_its_own():
    """What goes away by itself (an outage, a restart replaying the AOF, a fresh run's groups not there yet) is
    TransportUnavailable, retried by everyone; a refused password is TransportRefused; anything else is a bug."""
    import redis

    from fuseflow.wire.redis_streams import _transport_error

    for e in (redis.ConnectionError("Connection refused"), redis.TimeoutError("t"), redis.BusyLoadingError("LOADING"),
              redis.ResponseError("NOGROUP No such key 'work:{r}' or consumer group 'alpha'"),
              redis.ResponseError("UNBLOCKED the stream key no longer exists")):
        assert isinstance(_transport_error(e, "h"), TransportUnavailable), e
    assert isinstance(_transport_error(redis.AuthenticationError("invalid password"), "h"), TransportRefused)
    assert _transport_error(redis.ResponseError("WRONGTYPE Operation against a key"), "h") is None


def test_a_wrong_password_is_refused_not_retried():
    with RedisServer(password="right", appendonly=False) as server:
        with pytest.raises(TransportRefused, match="check the password") as e:
            RedisTransport(f"redis://:wrong@{server.host}:{server.port}/0", "x", ["a"])
        assert "wrong" not in str(e.value).split("refused")[0]  # the URL in the message has no password


def test_retrying_retries_only_unavailability_and_gives_up_at_the_deadline():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise TransportUnavailable("down")
        return "ok"

    assert retrying(flaky, "test", backoff=Backoff(first_s=0.001)) == "ok" and len(calls) == 3
    with pytest.raises(TransportUnavailable):
        retrying(lambda: (_ for _ in ()).throw(TransportUnavailable("down")), "test", timeout_s=0.01,
                 backoff=Backoff(first_s=0.005))
    with pytest.raises(ValueError):
        retrying(lambda: (_ for _ in ()).throw(ValueError("bad")), "test")


def test_a_sample_every_replica_dies_on_is_dead_lettered(redis_server, run_name, make_dist):
    """A poison sample kills each replica that takes it (no answer, no error): after ``max_deliveries``
    deliveries the next takeover dead-letters it instead of handing it on, and the run goes on."""
    tr = RedisTransport(redis_server.url, run_name, ["llama"], max_deliveries=3)
    tr.submit(samples(2))
    first = tr.claim_work("llama", "replica-0", count=1, block_ms=50)  # replica-0 dies holding s0
    assert [it.sample.id for it in first] == ["s0"]
    for n in (1, 2):  # replicas 1 and 2 take it over and die too: deliveries 2 and 3
        [again] = tr.reclaim_stale("llama", f"replica-{n}", min_idle_ms=0, count=10)
        assert again.sample.id == "s0"
    assert tr.reclaim_stale("llama", "replica-3", min_idle_ms=0, count=10) == []  # delivery 4 > 3
    [dead] = tr.dead_letters()
    assert dead["sample_id"] == "s0" and "delivered 4 times" in dead["reason"] and "max_deliveries=3" in dead["reason"]
    assert tr.stats()["dead_letters"] == 1
    # the healthy sample still flows to the trainer
    [ok] = tr.claim_work("llama", "replica-3", count=10, block_ms=50)
    tr.complete_work("llama", ok, dist=make_dist(3, 2, seed=0))
    assert [r.sample.id for r in tr.next_ready("rank0", count=10, block_ms=100)] == ["s1"]
    with pytest.raises(ValueError, match="max_deliveries must be >= 1"):
        RedisTransport(redis_server.url, run_name, ["llama"], max_deliveries=0)


# Commands no role sends (issue 26): keyspace-wide reads that list other runs' keys, server state, scripts and
# functions kept server-wide, pub/sub, persistence, connections of other clients, and data commands outside the
# role's allow-list. Each must be refused to both roles.
REFUSED = [
    ("RANDOMKEY",), ("DBSIZE",), ("SCAN", "0"), ("KEYS", "*"), ("SCRIPT", "FLUSH"), ("SCRIPT", "LOAD", "return 1"),
    ("SCRIPT", "EXISTS", "0" * 40), ("SCRIPT", "KILL"), ("FUNCTION", "FLUSH"), ("FUNCTION", "LIST"),
    ("FUNCTION", "DELETE", "lib"), ("FCALL", "f", "0"), ("CLIENT", "LIST"), ("CLIENT", "KILL", "ID", "1"),
    ("CLIENT", "SETNAME", "x"), ("CONFIG", "GET", "requirepass"), ("CONFIG", "SET", "maxmemory", "1"),
    ("CONFIG", "RESETSTAT"), ("DEBUG", "SLEEP", "0"), ("MODULE", "LIST"), ("FLUSHALL",), ("FLUSHDB",), ("INFO",),
    ("ACL", "LIST"), ("ACL", "WHOAMI"), ("SAVE",), ("BGSAVE",), ("BGREWRITEAOF",), ("LASTSAVE",), ("SLOWLOG", "GET"),
    ("LATENCY", "LATEST"), ("MEMORY", "STATS"), ("COMMAND", "COUNT"), ("SELECT", "1"), ("SWAPDB", "0", "1"),
    ("PUBLISH", "ch", "m"), ("PUBSUB", "CHANNELS"), ("WAIT", "0", "0"), ("FAILOVER", "ABORT"),
    ("REPLICAOF", "NO", "ONE"), ("SHUTDOWN", "NOSAVE"),
]


def test_role_users_are_allowed_their_commands_on_their_run_and_nothing_else(make_dist):
    """The stack's ACL users (issues 15, 26) run a whole run through the transport — reset, dispatch, claim,
    answer, reclaim, read, reject, ack, stats, dead letters — and are refused every other command, another run's
    keys, and a forbidden command even from inside a script."""
    import redis

    from fuseflow.wire.redis_streams import run_acl_rules

    users = {role: (f"pw-{role}", run_acl_rules("r1", role)) for role in ("teacher", "trainer")}
    with RedisServer(password="admin", appendonly=False, users=users) as server:
        trainer = RedisTransport(server.url_for("trainer"), "r1", ["llama"])
        trainer.authenticate(b"k" * 32)
        trainer.reset()
        trainer.submit(samples(3))
        trainer.dead_letter_inputs([("bad-doc", "not JSON", "{oops")])
        teacher = RedisTransport(server.url_for("teacher"), "r1", ["llama"])
        assert teacher.stats()["teachers"]["llama"]["lag"] == 3
        items = teacher.claim_work("llama", "w0", count=3, block_ms=50)
        assert teacher.reclaim_stale("llama", "w1", min_idle_ms=0, count=1)  # XAUTOCLAIM + XPENDING
        for it in items:
            teacher.complete_work("llama", it, dist=make_dist(3, 2, seed=0))
        ready = trainer.next_ready("rank0", 3, 50)
        assert [r.sample.id for r in ready] == ["s0", "s1", "s2"]
        assert trainer.reclaim_ready("rank1", min_idle_ms=0, count=1)
        assert trainer.reject_ready(ready[0], "llama", "a test rejection", redispatch=True) == "redispatched"
        (again,) = teacher.claim_work("llama", "w0", count=3, block_ms=50)
        teacher.complete_many("llama", [(again, None, "a teacher's error")])
        trainer.ack_ready(ready[1:])
        trainer.finish_submissions()
        assert trainer.is_finished() and trainer.dispatch_position() == 0
        assert {d["sample_id"] for d in trainer.dead_letters()} == {"s0", "bad-doc"}
        server.client().script_flush()  # as a restarted server: no scripts cached, the roles' EVAL sends them
        with pytest.raises(TransportRefused):
            RedisTransport(server.url_for("teacher"), "r2", ["llama"])  # another run's keys
        with pytest.raises(TransportRefused):
            teacher.reset()  # a teacher may not list the run's samples (XRANGE) nor reset it
        assert trainer.reset() >= 3
        admin = server.client()
        for role in ("teacher", "trainer"):
            r = redis.Redis.from_url(server.url_for(role))
            for command in REFUSED:
                # ACL DRYRUN asks the ACL alone (DEBUG, say, is also off in the server's config)
                verdict = admin.execute_command("ACL", "DRYRUN", role, *command).decode()
                assert verdict != "OK" and "no permissions" in verdict, (role, command, verdict)
                with pytest.raises(redis.exceptions.ResponseError):
                    r.execute_command(*command)
            for command in (("XADD", "work:{r2}", "*", "a", "b"), ("HSET", "dist:{r2}:s0", "a", "b"),
                            ("SET", "work:{r1}", "x"), ("GET", "work:{r1}"), ("HGETALL", "other"),
                            ("EVAL", "return redis.call('XLEN', KEYS[1])", "1", "work:{r2}"),
                            ("EVAL", "return redis.call('KEYS', '*')", "0"),  # a script runs as its caller
                            ("EVAL", "return redis.call('XLEN', 'work:{r2}')", "0")):
                with pytest.raises(redis.exceptions.ResponseError, match="(?i)perm"):
                    r.execute_command(*command)
            assert r.ping()
        teacher_r = redis.Redis.from_url(server.url_for("teacher"))
        for command in (("HGETALL", "dist:{r1}:s0"), ("XRANGE", "work:{r1}", "-", "+"), ("SADD", "inputs:{r1}", "x"),
                        ("HDEL", "dist:{r1}:s0", "x"), ("XADD", "inputs:{r1}", "*", "a", "b")):
            with pytest.raises(redis.exceptions.NoPermissionError):  # the trainer's, not the teacher's
                teacher_r.execute_command(*command)
        assert server.client().ping()  # SHUTDOWN was refused: the server is up
        teacher.close()
        trainer.close()


def test_the_readmes_acl_example_is_the_teachers_rules():
    """README, "Trust boundary", shows the teacher's ACL line: it must be what run_acl_rules gives (issue 26)."""
    import re
    from pathlib import Path

    from fuseflow.wire.redis_streams import run_acl_rules

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### Trust boundary"):]
    block = re.search(r"```\n(user teacher on .*?)```", section, re.S).group(1)
    assert " ".join(block.split()) == "user teacher on >PASSWORD " + run_acl_rules("RUN", "teacher")
