"""The teacher's Redis worker (DESIGN.md, "Data flow"): take samples from the run's work stream, score and
align them with this teacher, hand the aligned distributions back — until told to stop.

``fuseflow teacher serve --redis URL`` runs :func:`run_worker` in a thread next to its gRPC server, with an
aligner whose engine goes through the server's request batcher; tests run it in-process on any ``Transport``.

At-least-once, never lost: a delivery is acked only by ``complete_work`` (result or dead letter). Work a dead
replica had claimed is taken over once idle for the reclaim time by whichever replica reclaims first; a result
computed while Redis is unreachable is kept and handed back once it answers (the transport deduplicates per
sample and teacher, so a retried or redelivered answer is harmless).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from fuseflow.sparse import AlignedDist
from fuseflow.wire.transport import Backoff, Transport, TransportUnavailable, WorkItem

log = logging.getLogger(__name__)


# An exception outside ``ValueError`` (a bad input) is taken for a passing fault of the engine and retried;
# a sample that keeps raising it is dead-lettered after this many attempts so one poison text cannot stall a run.
MAX_ATTEMPTS = 3

# The reclaim time is at least this many times the slowest of the last RECENT_BATCHES batches this replica
# scored (issue 15): replicas of one teacher run the same model on the same hardware, so a delivery idle for
# several of their batch times is a dead replica's, not a slow batch (a CPU batch can take minutes: with a
# fixed 30 s an idle replica took it over, and after max_deliveries takeovers a healthy sample was
# dead-lettered as poison).
RECLAIM_BATCHES = 4
RECENT_BATCHES = 32


class ReclaimTime:
    """How long a delivery must be idle before this replica takes it over: ``floor_ms`` (``online.
    reclaim_idle_s``), raised to ``RECLAIM_BATCHES`` times the slowest recent batch it has timed. A replica
    that has scored nothing yet (just started, or idle since) has only the floor: set it above the slowest
    batch the hardware can take."""

    def __init__(self, floor_ms: int):
        if floor_ms <= 0:
            raise ValueError(f"reclaim_idle_ms must be > 0, got {floor_ms}")
        self.floor_ms = floor_ms
        self._recent: deque[float] = deque(maxlen=RECENT_BATCHES)  # seconds per batch

    def observe(self, batch_s: float) -> None:
        self._recent.append(batch_s)

    @property
    def ms(self) -> int:
        slowest = max(self._recent, default=0.0)
        return max(self.floor_ms, int(RECLAIM_BATCHES * slowest * 1000))


@dataclass
class WorkerStats:
    """What one :func:`run_worker` call did, returned when it stops."""

    ok: int = 0
    failed: int = 0  # dead-lettered
    batches: int = 0
    reclaimed: int = 0  # deliveries taken over from a replica that stopped answering
    reclaim_idle_ms: int = 0  # the reclaim time in force when the worker stopped (see ReclaimTime)
    source_tokens: int = 0
    retries: int = 0  # Redis calls retried after a connection error


def run_worker(
    aligner,
    transport: Transport,
    consumer: str,
    stop_event: threading.Event,
    metrics=None,
    batch_size: int = 8,
    block_ms: int = 1000,
    reclaim_idle_ms: int = 30_000,
) -> WorkerStats:
    """Serve ``aligner`` (a :class:`fuseflow.score.aligner.TeacherAligner`; its ``name`` is the teacher's name
    in the run) on ``transport`` as replica ``consumer`` until ``stop_event`` is set; returns what it did.

    Each round: take back deliveries idle for the reclaim time (a replica that died; checked every half of
    it): ``reclaim_idle_ms`` or ``RECLAIM_BATCHES`` times the slowest recent batch, whichever is longer
    (:class:`ReclaimTime`); else claim up to ``batch_size`` new samples (waiting up to ``block_ms``) → align
    → complete them in one round trip; a sample that fails is dead-lettered with its reason and the run goes
    on. ``metrics`` (a :class:`fuseflow.teacher.metrics.TeacherMetrics` or None) gets the outcomes and the
    teacher's queue lag. Stops within about ``block_ms`` of ``stop_event``; work claimed but not finished
    then stays pending for another replica.
    """
    teacher = aligner.name
    if teacher not in transport.teachers:
        raise ValueError(
            f"teacher {teacher!r} is not one of run {transport.run!r}'s teachers {transport.teachers}: "
            "the worker's --source must name one of the config's sources"
        )
    if batch_size < 1:
        raise ValueError(f"worker batch_size must be >= 1, got {batch_size}")
    reclaim = ReclaimTime(reclaim_idle_ms)
    stats = WorkerStats()
    backoff = Backoff(stop_event)
    attempts: dict[str, int] = {}  # sample id -> engine faults so far (not bad inputs)
    held: list[WorkItem] = []  # claimed, not yet completed: survives a failed complete
    results: list[tuple[WorkItem, AlignedDist | None, str | None]] | None = None
    next_reclaim = 0.0  # reclaim first: a restarted replica takes back what its predecessor left
    next_stats = 0.0
    fields = {"teacher": teacher, "consumer": consumer}
    log.info("worker %s/%s started", teacher, consumer, extra={"fields": fields})
    while not stop_event.is_set():
        try:
            now = time.monotonic()
            if metrics is not None and now >= next_stats:
                next_stats = now + 5.0
                q = transport.stats()["teachers"][teacher]
                metrics.set_worker_lag(q["lag"], q["pending"])
            if not held:
                if now >= next_reclaim:
                    next_reclaim = now + reclaim.ms / 2000
                    held = transport.reclaim_stale(teacher, consumer, reclaim.ms, batch_size)
                    if held:
                        stats.reclaimed += len(held)
                        log.warning("worker %s/%s took over %d stale deliveries", teacher, consumer, len(held),
                                    extra={"fields": {**fields, "reclaimed": len(held)}})
                if not held:
                    held = transport.claim_work(teacher, consumer, batch_size, block_ms)
                if not held:
                    backoff.reset()
                    continue
            if results is None:
                t0, before_ms = time.monotonic(), reclaim.ms
                results = _align(aligner, held, attempts)
                if results is None:  # an engine fault: leave the batch pending, retry it after a pause
                    stats.retries += 1
                    backoff.wait()
                    continue
                reclaim.observe(time.monotonic() - t0)
                if reclaim.ms > before_ms and reclaim.ms > reclaim.floor_ms:
                    log.info("worker %s/%s: reclaim time %.1f s (%d x its slowest batch, over online.reclaim_idle_s)",
                             teacher, consumer, reclaim.ms / 1000, RECLAIM_BATCHES,
                             extra={"fields": {**fields, "reclaim_idle_ms": reclaim.ms}})
            transport.complete_many(teacher, results)
        except TransportUnavailable as e:  # an outage, a restart, a fresh run: goes away by itself
            stats.retries += 1
            log.warning("worker %s/%s: transport unavailable (%s); retrying", teacher, consumer, e,
                        extra={"fields": {**fields, "error": str(e)}})
            backoff.wait()
            continue
        ok = [(it, d) for it, d, err in results if err is None]
        failed = [(it, err) for it, _, err in results if err is not None]
        tokens = sum(int(d.meta.get("source_tokens", 0)) for _, d in ok)
        stats.ok, stats.failed, stats.batches = stats.ok + len(ok), stats.failed + len(failed), stats.batches + 1
        stats.source_tokens += tokens
        for it, err in failed:
            log.warning("sample %s dead-lettered by %s: %s", it.sample.id, teacher, err,
                        extra={"fields": {**fields, "sample_id": it.sample.id, "reason": err}})
        for it, _, _ in results:
            attempts.pop(it.sample.id, None)
        if metrics is not None:
            metrics.worker_processed(ok=len(ok), failed=len(failed), tokens=tokens)
        log.debug("worker %s/%s completed %d samples", teacher, consumer, len(results),
                  extra={"fields": {**fields, "ok": len(ok), "failed": len(failed), "source_tokens": tokens}})
        held, results = [], None
        backoff.reset()
    stats.reclaim_idle_ms = reclaim.ms
    log.info("worker %s/%s stopped: %d ok, %d dead-lettered, %d reclaimed", teacher, consumer, stats.ok,
             stats.failed, stats.reclaimed, extra={"fields": {**fields, "ok": stats.ok, "failed": stats.failed}})
    return stats


class EngineFailure(RuntimeError):
    """The teacher's engine fails on every sample: the worker stops (its pending work goes to another replica)."""


def _align(aligner, items: Sequence[WorkItem], attempts: dict[str, int]):
    """``[(item, dist, error)]`` for ``items``, or ``None`` for "engine fault, try this batch again later".

    ``TeacherAligner.run`` reports a bad sample in its result and raises ``ValueError`` only for a batch of
    one bad sample: that is a bad input, dead-lettered. Any other exception is a fault of the engine (out of
    memory, a stopping batcher): the batch is retried; after ``MAX_ATTEMPTS`` it is split to find the samples
    at fault, which are dead-lettered, unless every one fails, which means the engine itself is broken.
    """
    try:
        return _checked([(it, r.dist, r.error) for it, r in zip(items, aligner.run([it.sample for it in items]), strict=True)])
    except ValueError as e:
        if len(items) == 1:
            return [(items[0], None, str(e) or repr(e))]
        return _one_by_one(aligner, items)
    except Exception as e:  # noqa: BLE001 - an engine fault: retried below
        n = 0
        for it in items:
            attempts[it.sample.id] = n = max(n, attempts.get(it.sample.id, 0) + 1)
        log.warning("teacher %s failed on %d samples (attempt %d of %d): %r", aligner.name, len(items), n,
                    MAX_ATTEMPTS, e, extra={"fields": {"teacher": aligner.name, "error": repr(e)}})
        return None if n < MAX_ATTEMPTS else _one_by_one(aligner, items)


def _one_by_one(aligner, items: Sequence[WorkItem]) -> list[tuple[WorkItem, AlignedDist | None, str | None]]:
    rows: list[tuple[WorkItem, AlignedDist | None, str | None]] = []
    faults = []
    for it in items:
        try:
            r = aligner.run([it.sample])[0]
            rows.append((it, r.dist, r.error))
        except ValueError as e:
            rows.append((it, None, str(e) or repr(e)))
        except Exception as e:  # noqa: BLE001 - decided below: this sample, or the engine
            faults.append(e)
            rows.append((it, None, f"teacher {aligner.name} raised {e!r} on this sample alone"))
    if faults and len(faults) == len(items):
        raise EngineFailure(f"teacher {aligner.name} fails on every sample: {faults[0]!r}") from faults[0]
    return _checked(rows)


def _checked(rows: list[tuple[WorkItem, AlignedDist | None, str | None]]):
    """Each result held to :meth:`AlignedDist.validate`'s rules before it leaves the teacher: a NaN from a
    broken model or an out-of-range id dead-letters its sample with the reason (issue 15), where the
    transport's own check would otherwise stop the worker."""
    out = []
    for it, dist, error in rows:
        if dist is not None:
            try:
                dist.validate()
            except ValueError as e:
                dist, error = None, f"teacher produced invalid distributions: {e}"
        out.append((it, dist, error))
    return out


class WorkerThreads:
    """One :func:`run_worker` thread per aligner, in this process: ``fuseflow fuse``'s teachers on the
    in-process transport (issue 13), and the tests' teachers on any transport. ``transport_factory()`` gives each
    thread its transport (one Redis connection each; the in-process transport is shared). :meth:`stop` ends
    them and re-raises the first error a worker died of; :meth:`check` raises it while they run."""

    def __init__(self, aligners, transport_factory, *, batch_size: int = 8, block_ms: int = 100,
                 reclaim_idle_ms: int = 30_000):
        self.stop_event = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = []
        for aligner in aligners:
            def work(aligner=aligner):
                transport = transport_factory()
                try:
                    run_worker(aligner, transport, f"{aligner.name}-thread", self.stop_event, batch_size=batch_size,
                               block_ms=block_ms, reclaim_idle_ms=reclaim_idle_ms)
                except BaseException as e:  # noqa: BLE001 - re-raised by stop()
                    log.error("teacher %s: worker thread failed: %r", aligner.name, e)
                    self.errors.append(e)
                finally:
                    transport.close()

            thread = threading.Thread(target=work, daemon=True, name=f"teacher-{aligner.name}")
            thread.start()
            self.threads.append(thread)

    def check(self) -> None:
        """Raise the first error a worker thread died of: the run cannot get that teacher's answers any more, so
        the trainer calls this while it waits for them (``fuseflow.trainer.recipe.run(check_teachers=…)``) and ends at once."""
        if self.errors:
            raise self.errors[0]

    def stop(self, timeout_s: float = 15.0) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout_s)
        if self.errors:
            raise self.errors[0]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            self.stop()
        except BaseException:
            if exc_type is None:  # else the error already propagating is the one to see
                raise
