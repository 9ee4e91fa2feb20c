"""The teacher worker's reclaim time (issue 15): at least ``online.reclaim_idle_s``, raised to several times
the slowest batch the replica has scored, so an idle replica does not take over a slow batch that another
replica is still scoring (it did with a fixed 30 s on CPU, and after max_deliveries takeovers a healthy
sample was dead-lettered as poison)."""

from __future__ import annotations

import pytest

from test_worker import FakeAligner, Workers, drain, texts

from fuseflow.config import OnlineConfig
from fuseflow.teacher import worker as worker_module
from fuseflow.teacher.worker import RECLAIM_BATCHES, ReclaimTime
from fuseflow.wire.inprocess import InProcessTransport


def test_reclaim_time_is_the_floor_until_batches_are_slower():
    r = ReclaimTime(30_000)
    assert r.ms == 30_000  # nothing scored yet: the configured floor
    r.observe(2.0)
    assert r.ms == 30_000  # 4 x 2 s is under the floor
    r.observe(12.5)
    assert r.ms == RECLAIM_BATCHES * 12_500  # a slow CPU batch raises it
    for _ in range(worker_module.RECENT_BATCHES):
        r.observe(1.0)
    assert r.ms == 30_000  # the slow batch has left the window
    with pytest.raises(ValueError, match="reclaim_idle_ms"):
        ReclaimTime(0)


def test_reclaim_idle_s_is_a_validated_config_field():
    assert OnlineConfig().reclaim_idle_s == 30.0
    assert OnlineConfig(reclaim_idle_s=600).reclaim_idle_s == 600.0
    with pytest.raises(ValueError, match="reclaim_idle_s"):
        OnlineConfig(reclaim_idle_s=0.5)  # under the worker's 1 s poll: replicas would take each other's work


def _two_replicas_one_slow_batch(delay_s: float, floor_ms: int):
    """Replica a0 and a1 score 6 samples in batches of 2, each batch taking ``delay_s``; the last batch is
    scored by one replica while the other, with nothing left to claim, looks for stale deliveries every
    ``floor_ms / 2``. Returns the workers' stats and how often each sample was scored."""
    tr = InProcessTransport("reclaim", ["alpha"])
    samples = texts(6)
    tr.submit(samples)
    tr.finish_submissions()
    aligners = {c: FakeAligner("alpha", delay_s=delay_s) for c in ("a0", "a1")}
    w = Workers()
    for consumer, aligner in aligners.items():
        w.start(aligner, tr, consumer, batch_size=2, block_ms=20, reclaim_idle_ms=floor_ms)
    got = drain(tr, len(samples), timeout_s=60)
    stats = w.stop()
    assert not w.errors and sorted(got) == sorted(s.id for s in samples) and tr.is_finished()
    scored: dict[str, int] = {}
    for aligner in aligners.values():
        for call in aligner.calls:
            for sample_id in call:
                scored[sample_id] = scored.get(sample_id, 0) + 1
    return stats, scored


def test_an_idle_replica_leaves_a_slow_batch_to_the_replica_scoring_it(monkeypatch):
    # Batches of 0.6 s against a 0.2 s floor: with the floor alone the idle replica takes over the other's
    # batch in progress and scores it again (the control, so the scenario is known to bite) ...
    monkeypatch.setattr(worker_module, "RECLAIM_BATCHES", 0)
    stats, scored = _two_replicas_one_slow_batch(delay_s=0.6, floor_ms=200)
    assert sum(s.reclaimed for s in stats.values()) > 0
    assert max(scored.values()) > 1
    # ... derived from the batch time, it waits for the batch, and each sample is scored once.
    monkeypatch.setattr(worker_module, "RECLAIM_BATCHES", RECLAIM_BATCHES)
    stats, scored = _two_replicas_one_slow_batch(delay_s=0.6, floor_ms=200)
    assert sum(s.reclaimed for s in stats.values()) == 0
    assert set(scored.values()) == {1}
    assert all(s.reclaim_idle_ms >= RECLAIM_BATCHES * 600 for s in stats.values() if s.batches)
