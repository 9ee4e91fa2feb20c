"""Faults of the online path, on real processes and a real Redis server (append-only file on):

- a teacher replica is killed with SIGKILL while it holds work → another replica finishes that work;
- the trainer is killed with SIGKILL mid-run → a resumed trainer finishes the epoch, every sample once;
- the Redis server restarts mid-run → the run continues and completes;
- malformed samples (longer than a teacher's max_length; an empty text) are dead-lettered with their reason
  and the run goes on (checked along the way).
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from online_helpers import (
    SlowAligner,
    WorkerThreads,
    build_aligners,
    kill_group,
    line_count,
    start_trainer,
    start_worker_process,
    trained_ids,
    wait_exit,
    wait_for,
    write_run_config,
)

from fuseflow.config import FuseConfig, load_config
from fuseflow.sparse import Sample

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def setup(tmp_path, tiny_llama, tiny_gemma, tiny_qwen):
    from fuseflow.models import load_tokenizer
    from fuseflow.trainer.data import prepare_corpus

    config = write_run_config(tmp_path, tiny_llama, tiny_gemma, tiny_qwen, gemma_max_length=40)
    cfg = load_config(FuseConfig, config)
    corpus = prepare_corpus(cfg, load_tokenizer(cfg.target.model))
    return config, cfg, corpus


def _pending_of(tr, teacher: str, consumer: str) -> int:
    return len(tr.r.xpending_range(tr.k_work, teacher, "-", "+", 1000, consumername=consumer))


def test_killed_teacher_replica_work_is_finished_by_another(setup, tmp_path, redis_server):
    """Two replicas of teacher gemma in their own processes; one is frozen while it holds claimed work, then
    killed with SIGKILL. The other takes that work over (after ``reclaim_idle_ms``); every sample becomes ready
    or dead-lettered, none twice. The test plays dispatcher and trainer."""
    from fuseflow.wire.redis_streams import RedisTransport

    config, cfg, corpus = setup
    teachers = [s.key for s in cfg.sources]
    run = "kill-teacher"
    samples = [*corpus.train, Sample("empty", "   ")]
    tr = RedisTransport(redis_server.url, run, teachers, window=256)
    tr.reset()
    logs = {c: tmp_path / f"{c}.log" for c in ("victim", "survivor")}
    procs = {c: start_worker_process(config, "gemma", redis_server.url, run, c, logs[c], reclaim_idle_ms=1000,
                                     batch_size=8)
             for c in logs}
    qwen = WorkerThreads(build_aligners(cfg, ["qwen"]), lambda: RedisTransport(redis_server.url, run, teachers))
    try:
        watched = [(procs[c], logs[c]) for c in logs]
        wait_for(lambda: all("worker ready" in logs[c].read_text() for c in logs), 120, "worker processes", watched)
        tr.submit(samples)
        tr.finish_submissions()
        victim = procs["victim"]
        # Freeze the victim at a moment it holds claimed work, then kill it: its deliveries stay pending.
        while True:
            os.killpg(victim.pid, signal.SIGSTOP)
            if _pending_of(tr, "gemma", "victim") > 0:
                break
            os.killpg(victim.pid, signal.SIGCONT)
            assert tr.stats()["teachers"]["gemma"]["lag"] > 0, "the victim never held work"
            time.sleep(0.02)
        held = _pending_of(tr, "gemma", "victim")
        kill_group(victim)
        ready = {}

        def all_answered():
            for r in tr.next_ready("trainer", 32, 100):
                assert r.sample.id not in ready, f"sample {r.sample.id} ready twice"
                ready[r.sample.id] = r
                tr.ack_ready([r])
            return tr.is_finished()

        wait_for(all_answered, 60, "every sample answered", [(procs["survivor"], logs["survivor"])])
    finally:
        qwen.stop()
        for p in procs.values():
            kill_group(p)
    dead = {d["sample_id"]: d for d in tr.dead_letters()}
    assert held > 0 and _pending_of(tr, "gemma", "victim") == 0
    assert sorted([*ready, *dead]) == sorted(s.id for s in samples)
    assert "took over" in logs["survivor"].read_text()
    assert dead["empty"]["reason"] == "empty text"
    assert any("max_length 40" in d["reason"] for d in dead.values())
    tr.close()


def _run_trainer_with_fault(setup, tmp_path, redis_server, run, fault):
    """Trainer process + teacher threads slowed to ~0.3 s per batch; ``fault(trainer, log)`` runs once
    the trained-ids log has 6 lines (past the checkpoint at step 2) and may return a new trainer process."""
    from fuseflow.wire.redis_streams import RedisTransport

    config, cfg, corpus = setup
    teachers = [s.key for s in cfg.sources]
    out = tmp_path / "run" / "fused"
    log = tmp_path / "trainer.log"
    slow = [SlowAligner(a, 0.3) for a in build_aligners(cfg)]
    trainer = start_trainer(config, redis_server.url, run, log)
    with WorkerThreads(slow, lambda: RedisTransport(redis_server.url, run, teachers), batch_size=2):
        wait_for(lambda: line_count(out / "trained_samples.log") >= 6, 180, "training past the first checkpoint",
                 [(trainer, log)])
        trainer = fault(trainer, log) or trainer
        assert wait_exit(trainer, log, 180) == 0, log.read_text()[-4000:]
    dead = {json.loads(line)["sample"] for line in (out / "dead_letter.jsonl").read_text().splitlines()}
    ids = trained_ids(out)
    assert dead, "a sample too long for gemma is dead-lettered and the run goes on"
    assert len(ids) == len(set(ids)), f"trained twice: {sorted({i for i in ids if ids.count(i) > 1})}"
    assert sorted(ids) == sorted(s.id for s in corpus.train if s.id not in dead)
    assert (out / "model" / "model.safetensors").exists()
    with RedisTransport(redis_server.url, run, teachers) as tr:
        assert tr.is_finished()
    return log.read_text()


def test_killed_trainer_resumes_and_trains_every_sample_exactly_once(setup, tmp_path, redis_server):
    from fuseflow.wire.redis_streams import RedisTransport

    config, cfg, _ = setup
    out = tmp_path / "run" / "fused"
    seen = {}

    def kill_and_resume(trainer, log):
        kill_group(trainer)  # SIGKILL: no cleanup, samples trained after the checkpoint are not durable
        seen["lines_at_kill"] = line_count(out / "trained_samples.log")
        with RedisTransport(redis_server.url, "kill-trainer", [s.key for s in cfg.sources]) as tr:
            seen["pending_at_kill"] = tr.stats()["trainer"]["pending"]
        return start_trainer(config, redis_server.url, "kill-trainer", log)

    text = _run_trainer_with_fault(setup, tmp_path, redis_server, "kill-trainer", kill_and_resume)
    assert "resumed from" in text
    assert seen["pending_at_kill"] > 0  # the killed trainer held unacked samples: they came back


def test_forged_ready_entries_held_by_a_killed_trainer_do_not_stop_its_restart(setup, tmp_path, redis_server):
    """Issue 26: after a checkpoint, a client with Redis access writes a ready entry without an ``id``
    (``XADD ready:{run} * foo bar``; it raised KeyError: b'id') and a sample hash whose ``_spans`` is not JSON
    (JSONDecodeError), and the trainer is killed with both in its pending list, as if it had read them. Every
    restart read them first and died the same way; now the restarted trainer drops them and finishes the epoch,
    every sample once."""
    config, cfg, _ = setup
    run = "forged-entry"
    ready = f"ready:{{{run}}}"

    def forge_and_restart(trainer, log):
        kill_group(trainer)
        r = redis_server.client()
        r.xadd(ready, {"foo": "bar"})
        entry = r.xadd(ready, {"id": "forged-1"})
        r.hset(f"dist:{{{run}}}:forged-1", mapping={"_id": "forged-1", "_text": "forged", "_spans": "{not json",
                                                    "_work": "1-0", "_n": 2, "_ready": entry})
        r.xreadgroup("trainer", "rank0", {ready: ">"})  # in rank0's pending list: its restart reads them first
        return start_trainer(config, redis_server.url, run, log)

    text = _run_trainer_with_fault(setup, tmp_path, redis_server, run, forge_and_restart)
    assert "resumed from" in text
    assert "is not one fuseflow writes (fields foo): dropped" in text
    assert "sample forged-1" in text and "rejected (dropped)" in text
    dead = [json.loads(line) for line in (tmp_path / "run" / "fused" / "dead_letter.jsonl").read_text().splitlines()]
    assert any(d["sample"] == "forged-1" and "not a sample this run's dispatcher sent" in d["reason"] for d in dead)


def test_run_survives_a_redis_restart(setup, tmp_path, restartable_redis_server):
    def restart(trainer, log):
        restartable_redis_server.stop()  # graceful: the append-only file is flushed
        time.sleep(2.0)  # long enough for every client's own retries to give up
        restartable_redis_server.start()

    text = _run_trainer_with_fault(setup, tmp_path, restartable_redis_server, "redis-restart", restart)
    assert "transport unavailable (Redis at" in text  # the trainer did see the outage, and rode it out
