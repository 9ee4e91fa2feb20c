"""The ``Transport`` interface between dispatcher, teacher workers and trainer ranks.

Two implementations satisfy it with the same semantics: ``RedisTransport`` (Redis streams, several
processes and hosts) and ``InProcessTransport`` (one process, thread-safe queues). The dispatcher, teacher
worker and trainer code take a ``Transport`` and never know which one they have.

Semantics both keep (``tests/wire/test_transport.py`` checks them on both):
- A sample is *in flight* from ``submit`` until the trainer acks it or it is dead-lettered. ``submit`` blocks
  while ``window`` samples are in flight (backpressure: memory bounded whatever the corpus size).
- Submitting a sample id that is already in flight is a no-op (deduplicated by sample id).
- Every teacher gets every sample (one consumer group per teacher); within a teacher, replicas share the
  work (each entry goes to one consumer of the group).
- A teacher's first answer for a sample wins; later answers for the same (sample, teacher) — a redelivery
  after a reclaim — are acked and ignored. An error dead-letters the whole sample with the reason (the
  trainer can never get every teacher's answer for it); answers that arrive afterwards are ignored.
- A sample becomes *ready* exactly once, when every teacher has answered. The trainer acks it once the step
  that used it is durable; acking frees everything the sample held.
- At-least-once everywhere: work claimed by a consumer that died stays pending until ``reclaim_stale``
  hands it to another; ready samples read by a trainer rank that died are returned again to the same
  consumer name on its first ``next_ready`` after a restart, or to any rank by ``reclaim_ready``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from fuseflow.sparse import AlignedDist, Sample

log = logging.getLogger(__name__)
T = TypeVar("T")


class TransportUnavailable(ConnectionError):
    """The transport's backend cannot serve now — unreachable, restarting, or recreating a run's streams — and
    the same call may succeed later. Every ``Transport`` raises this in place of its backend's own errors, so
    the dispatcher, workers and trainer retry one exception type and never import the backend (issue 13)."""


class TransportRefused(PermissionError):
    """The backend refuses this client (wrong password, an ACL that forbids the command): retrying cannot
    help; the message names what to fix."""


class Backoff:
    """Exponential backoff between retries: ``first_s`` doubling to ``max_s``, reset after a success. With a
    ``stop_event`` a wait ends as soon as it is set."""

    def __init__(self, stop_event: threading.Event | None = None, first_s: float = 0.1, max_s: float = 2.0) -> None:
        self.stop_event, self.first_s, self.max_s = stop_event, first_s, max_s
        self.delay = first_s

    def wait(self) -> None:
        if self.stop_event is not None:
            self.stop_event.wait(self.delay)
        else:
            time.sleep(self.delay)
        self.delay = min(self.delay * 2, self.max_s)

    def reset(self) -> None:
        self.delay = self.first_s


def retrying(fn: Callable[[], T], what: str, timeout_s: float = 600.0, backoff: Backoff | None = None) -> T:
    """``fn()``, retried with backoff while it raises :class:`TransportUnavailable`, for up to ``timeout_s``;
    then the last error is raised. The one retry rule of the dispatcher, the workers and the trainer."""
    backoff = backoff or Backoff()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except TransportUnavailable as e:
            if time.monotonic() > deadline or (backoff.stop_event is not None and backoff.stop_event.is_set()):
                raise
            log.warning("%s: transport unavailable (%s); retrying in %.1f s", what, e, backoff.delay)
            backoff.wait()

# Teacher names become consumer-group names and Redis field prefixes.
_TEACHER_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class WorkItem:
    """One sample handed to one teacher; ``entry_id`` identifies the delivery for ``complete_work``."""

    entry_id: str
    sample: Sample


@dataclass(frozen=True)
class ReadySample:
    """A sample every teacher has answered, with each teacher's distributions by teacher name. ``problems``:
    teachers whose answer the transport could not even decode, with why (their ``dists`` entry is missing)."""

    entry_id: str
    sample: Sample
    dists: dict[str, AlignedDist]
    problems: dict[str, str] = field(default_factory=dict)


# How often a sample may go back to a teacher whose answer the trainer rejected, before it is dead-lettered.
REDISPATCH_LIMIT = 1


def check_ready(item: ReadySample, teachers: Sequence[str], vocab_size: int | None = None,
                num_positions: int | None = None) -> dict[str, str]:
    """The trainer's side of the trust boundary (DESIGN.md; issue 15): ``{teacher: reason}`` for each teacher
    whose answer for ``item`` cannot be trained on — undecodable, missing, or breaking
    :meth:`AlignedDist.validate` (NaN, +inf gold, ids outside the target's ``vocab_size``, not the sample's
    ``num_positions`` target positions: a teacher on another version or target tokenizer). Empty: train."""
    problems = dict(item.problems)
    for t in teachers:
        if t in problems:
            continue
        dist = item.dists.get(t)
        if dist is None:
            problems[t] = "no distributions from this teacher in the ready entry"
            continue
        try:
            dist.validate(vocab_size, num_positions)
        except ValueError as e:
            problems[t] = f"rejected by the trainer: {e}"
    return problems


class Transport(ABC):
    """Moves samples to teachers and aligned distributions to the trainer (see the module docstring)."""

    # A transport without teachers (the CLM-only baseline: a sample is ready when submitted); only the
    # in-process transport offers it.
    teacherless: bool = False
    # Each trainer rank has its own instance (one process each): every rank dispatches its own shard.
    per_process: bool = False
    # Other processes (the teachers) can write what the trainer reads: the trainer signs its samples with a key
    # of its own (:meth:`authenticate`) and takes back only samples signed so (issue 26).
    authenticates_samples: bool = False

    def authenticate(self, key: bytes) -> None:  # noqa: B027 - optional hook
        """Sign the samples this client submits with ``key`` (the trainer's secret) and accept from the ready
        queue only samples signed so. A no-op where nothing but this process writes the queue (in-process)."""

    def __init__(self, run: str, teachers: Sequence[str], window: int) -> None:
        self.run = validate_run(run)
        self.teachers = validate_teachers(teachers, allow_empty=self.teacherless)
        if window < 1:
            raise ValueError(f"transport window must be >= 1 sample, got {window}")
        self.window = int(window)

    # -- dispatcher (trainer rank 0) ------------------------------------------------------------------------

    @abstractmethod
    def submit(self, samples: Sequence[Sample], timeout_s: float | None = None) -> None:
        """Queue ``samples`` for every teacher, blocking while the dispatch window is full.
        Raises ``TimeoutError`` if ``timeout_s`` passes first (samples queued so far stay queued)."""

    def submit_at(self, position: int, samples: Sequence[Sample], timeout_s: float | None = None) -> None:
        """``submit`` for a dispatcher that walks one fixed sequence of samples: ``samples`` are its items
        ``position, position + 1, …``. Afterwards ``dispatch_position()`` says how far dispatch got, counting
        every sample queued (or skipped as in flight) even when a ``TimeoutError`` or a lost connection cut the
        call short, so a restarted dispatcher resumes exactly there: it neither queues again a sample that was
        trained and freed meanwhile nor skips one. ``RedisTransport`` records the position in the script that
        queues (atomic, durable with the queue); this default keeps it in memory, one sample at a time."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for i, sample in enumerate(samples):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.submit([sample], remaining)
            self._dispatch_position = position + i + 1

    def dispatch_position(self) -> int:
        """Items of the dispatcher's sequence consumed so far by ``submit_at`` (0 before any)."""
        return getattr(self, "_dispatch_position", 0)

    @abstractmethod
    def finish_submissions(self) -> None:
        """End of the epoch: no more samples until the next ``submit``."""

    @abstractmethod
    def dead_letter_inputs(self, items: Sequence[tuple[str, str, str]]) -> int:
        """Dead-letter samples that never reach a teacher: ``(sample id, reason, text)`` for each corpus document
        the dispatcher cannot send (not UTF-8, not JSON, a lone surrogate: issue 15), under the teacher name
        ``"corpus"``. Each counts as submitted and done like any dead letter, so ``stats()["dead_letters"]`` and
        ``train.max_dead_letter_fraction`` include it; once per sample id (a resumed run sends them again).
        Returns how many were new."""

    # -- teacher worker ---------------------------------------------------------------------------------------

    @abstractmethod
    def claim_work(self, teacher: str, consumer: str, count: int, block_ms: int) -> list[WorkItem]:
        """Up to ``count`` new samples for ``teacher``, delivered to ``consumer`` (a replica's unique name);
        waits up to ``block_ms`` for the first one (``<= 0``: no wait), returns ``[]`` if none came."""

    @abstractmethod
    def complete_work(
        self, teacher: str, item: WorkItem, dist: AlignedDist | None = None, error: str | None = None
    ) -> None:
        """Store ``teacher``'s result for ``item`` (idempotent per sample and teacher) or, with ``error``,
        dead-letter the sample with that reason; either way ack the delivery."""

    def complete_many(self, teacher: str, results: Sequence[tuple[WorkItem, AlignedDist | None, str | None]]) -> None:
        """``complete_work(teacher, item, dist, error)`` for each ``(item, dist, error)``, batched where the
        implementation can (one pipelined round trip on Redis)."""
        for item, dist, error in results:
            self.complete_work(teacher, item, dist=dist, error=error)

    @abstractmethod
    def reclaim_stale(self, teacher: str, consumer: str, min_idle_ms: int, count: int) -> list[WorkItem]:
        """Take over up to ``count`` of ``teacher``'s deliveries that have been pending (claimed, not
        completed) for longer than ``min_idle_ms`` — a replica that died — and return them to ``consumer``."""

    # -- trainer ----------------------------------------------------------------------------------------------

    @abstractmethod
    def next_ready(self, consumer: str, count: int, block_ms: int) -> list[ReadySample]:
        """Up to ``count`` samples every teacher has answered, delivered to trainer rank ``consumer``.
        The first call for a consumer name first returns what it had read but not acked (restart)."""

    @abstractmethod
    def ack_ready(self, items: Sequence[ReadySample]) -> None:
        """The step that used ``items`` is durable: free them (idempotent)."""

    @abstractmethod
    def reject_ready(self, item: ReadySample, teacher: str, reason: str, redispatch: bool) -> str:
        """``teacher``'s answer for ``item`` cannot be trained on (see :func:`check_ready`). With
        ``redispatch``, while the sample went back fewer than ``REDISPATCH_LIMIT`` times, forget that answer and
        queue the sample again (the other teachers' answers stand; they ignore the new entry as a duplicate);
        otherwise dead-letter it with ``reason`` and ``teacher``. Either way the ready entry is acked, so a bad
        entry never comes back to crash a restarted trainer. Returns ``"redispatched"``, ``"dead"``, or
        ``"gone"`` (already acked or freed)."""

    @abstractmethod
    def reclaim_ready(self, consumer: str, min_idle_ms: int, count: int) -> list[ReadySample]:
        """Take over ready samples read by a trainer rank that has not acked them for ``min_idle_ms``."""

    # -- monitoring -------------------------------------------------------------------------------------------

    @abstractmethod
    def stats(self) -> dict:
        """Counters and queue depths; the same keys in every implementation:
        ``submitted``, ``done`` (trained or dead-lettered), ``in_flight``, ``window``, ``finished``,
        ``work`` (work entries alive), ``ready`` (ready entries not yet acked), ``dead_letters`` (total),
        ``teachers``: {name: {``pending``, ``lag``}} and ``trainer``: {``pending``, ``lag``} where
        ``pending`` is delivered-not-acked and ``lag`` is not yet delivered (``None`` if unknown)."""

    @abstractmethod
    def dead_letters(self, count: int = 100) -> list[dict]:
        """The oldest ``count`` dead letters kept: ``{"sample_id", "teacher", "reason", "text"}``."""

    @abstractmethod
    def is_finished(self) -> bool:
        """Submissions are finished and every submitted sample was trained or dead-lettered."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the run's data stays where it is."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_teacher(self, teacher: str) -> None:
        if teacher not in self.teachers:
            raise ValueError(f"teacher {teacher!r} is not one of this run's teachers {self.teachers}")


def validate_run(run: str) -> str:
    if not run or any(c in run for c in "{}") or any(c.isspace() for c in run):
        raise ValueError(f"run name {run!r} must be non-empty, without braces or whitespace")
    return run


def validate_teachers(teachers: Sequence[str], allow_empty: bool = False) -> list[str]:
    names = list(teachers)
    if not names and not allow_empty:
        raise ValueError("a transport needs at least one teacher name")
    bad = [t for t in names if not _TEACHER_NAME_RE.match(t)]
    if bad:
        raise ValueError(f"teacher names {bad} must match {_TEACHER_NAME_RE.pattern}")
    if len(set(names)) != len(names):
        raise ValueError(f"teacher names must be unique, got {names}")
    return names


def check_result(item: WorkItem, dist: AlignedDist | None, error: str | None) -> None:
    """Exactly one of ``dist`` and ``error``; ``dist`` well-formed."""
    if (dist is None) == (error is None):
        raise ValueError(f"complete_work for sample {item.sample.id!r}: pass exactly one of dist and error")
    if dist is not None:
        dist.validate()


def spans_to_json(spans: tuple[tuple[int, int], ...] | None) -> str:
    return "" if spans is None else json.dumps([list(s) for s in spans])


def spans_from_json(text: str | bytes) -> tuple[tuple[int, int], ...] | None:
    if not text:
        return None
    return tuple((int(a), int(b)) for a, b in json.loads(text))
