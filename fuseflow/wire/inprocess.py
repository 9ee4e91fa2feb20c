"""``Transport`` in one process: plain Python containers behind one condition variable (thread-safe).

The embedded default: dispatcher, teacher workers and trainer run as threads of one process, no Redis. It
mirrors ``RedisTransport`` entry for entry — a work log with per-teacher cursors and pending lists (consumer
groups), a ready log with the trainer's pending list, dead letters — so the semantics the tests check are the
same. Distributions go through the wire codec (float16 logprobs) as in Redis, so ``fuseflow fuse`` and an
online run train on the same bits (issue 13). Two additions: one instance per process (``per_process``: each
trainer rank runs its own pipeline on its shard), and no teachers at all (``teacherless``: the CLM-only
baseline, a sample is ready as soon as it is submitted).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from fuseflow.sparse import AlignedDist, Sample
from fuseflow.wire.codec import decode_aligned, encode_aligned
from fuseflow.wire.transport import REDISPATCH_LIMIT, ReadySample, Transport, WorkItem, check_result

DEAD_TEXT_CHARS = 1000


def _seq(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


@dataclass
class _Delivery:
    consumer: str
    since: float  # time.monotonic() of the last delivery or claim


@dataclass
class _InFlight:
    sample: Sample
    work_id: str
    answers: dict[str, AlignedDist] = field(default_factory=dict)
    ready_id: str | None = None
    redispatched: int = 0


class InProcessTransport(Transport):
    """Thread-safe in-process ``Transport`` (see ``fuseflow.wire.transport`` for the semantics)."""

    teacherless = True
    per_process = True

    def __init__(self, run: str, teachers: Sequence[str], window: int = 256, dead_maxlen: int = 100_000) -> None:
        super().__init__(run, teachers, window)
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._work: OrderedDict[str, Sample] = OrderedDict()  # live work entries by entry id
        self._undelivered: dict[str, deque[str]] = {t: deque() for t in self.teachers}
        self._pending: dict[str, OrderedDict[str, _Delivery]] = {t: OrderedDict() for t in self.teachers}
        self._in_flight: dict[str, _InFlight] = {}  # by sample id
        self._ready: OrderedDict[str, str] = OrderedDict()  # ready entry id -> sample id, until acked
        self._ready_undelivered: deque[str] = deque()
        self._ready_pending: OrderedDict[str, _Delivery] = OrderedDict()
        self._history_done: set[str] = set()
        self._history_cursor: dict[str, int] = {}
        self._dead: deque[dict] = deque(maxlen=dead_maxlen)
        self._submitted = self._done = self._dead_total = 0
        self._dead_inputs: set[str] = set()  # sample ids dead-lettered before reaching a teacher
        self._finished = False

    def _entry_id(self) -> str:
        return f"{next(self._ids)}-0"

    @staticmethod
    def _wait(cond: threading.Condition, ready, deadline: float | None) -> bool:
        """Wait on ``cond`` (held) until ``ready()`` or ``deadline`` (None: forever); returns ``ready()``."""
        while not ready():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            cond.wait(remaining)
        return True

    # -- dispatcher -------------------------------------------------------------------------------------------

    def submit(self, samples: Sequence[Sample], timeout_s: float | None = None) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            for i, sample in enumerate(samples):
                if sample.id in self._in_flight:
                    continue
                if not self._wait(self._cond, lambda: self._submitted - self._done < self.window, deadline):
                    raise TimeoutError(
                        f"submit: dispatch window of {self.window} samples still full after {timeout_s} s "
                        f"({len(samples) - i} samples not queued, first {sample.id!r}); is the trainer acking?"
                    )
                if sample.id in self._in_flight:  # submitted by another thread while we waited
                    continue
                work_id = self._entry_id()
                self._work[work_id] = sample
                for t in self.teachers:
                    self._undelivered[t].append(work_id)
                state = self._in_flight[sample.id] = _InFlight(sample, work_id)
                self._submitted += 1
                if not self.teachers:  # nothing to wait for
                    self._make_ready(state)
                self._finished = False
            self._cond.notify_all()

    def finish_submissions(self) -> None:
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def dead_letter_inputs(self, items: Sequence[tuple[str, str, str]]) -> int:
        with self._cond:
            new = [(i, reason, text) for i, reason, text in items if i not in self._dead_inputs]
            for sample_id, reason, text in new:
                self._dead_inputs.add(sample_id)
                self._dead.append({"sample_id": sample_id, "teacher": "corpus", "reason": reason,
                                   "text": text[:DEAD_TEXT_CHARS]})
            self._submitted += len(new)
            self._done += len(new)
            self._dead_total += len(new)
            self._cond.notify_all()
            return len(new)

    # -- teacher worker ---------------------------------------------------------------------------------------

    def claim_work(self, teacher: str, consumer: str, count: int, block_ms: int) -> list[WorkItem]:
        self._check_teacher(teacher)
        queue, pending = self._undelivered[teacher], self._pending[teacher]

        def has_work() -> bool:
            while queue and queue[0] not in self._work:  # deleted (dead-lettered) before delivery
                queue.popleft()
            return bool(queue)

        deadline = time.monotonic() + max(block_ms, 0) / 1000
        with self._cond:
            if not self._wait(self._cond, has_work, deadline):
                return []
            items = []
            now = time.monotonic()
            while queue and len(items) < count:
                work_id = queue.popleft()
                sample = self._work.get(work_id)
                if sample is not None:
                    pending[work_id] = _Delivery(consumer, now)
                    items.append(WorkItem(work_id, sample))
            return items

    def complete_work(
        self, teacher: str, item: WorkItem, dist: AlignedDist | None = None, error: str | None = None
    ) -> None:
        self._check_teacher(teacher)
        check_result(item, dist, error)
        with self._cond:
            self._pending[teacher].pop(item.entry_id, None)  # ack
            state = self._in_flight.get(item.sample.id)
            if state is None or state.work_id != item.entry_id or teacher in state.answers:
                return  # finished sample, stale delivery, or a duplicate answer: the first one wins
            if error is not None:
                self._dead_letter(state, teacher, error)
            else:
                # What a Redis round trip gives back (float16 logprobs): one precision whatever the transport.
                state.answers[teacher] = decode_aligned(encode_aligned(dist))
                if len(state.answers) == len(self.teachers):
                    self._make_ready(state)
            self._cond.notify_all()

    def _make_ready(self, state: _InFlight) -> None:
        state.ready_id = self._entry_id()
        self._ready[state.ready_id] = state.sample.id
        self._ready_undelivered.append(state.ready_id)

    def _dead_letter(self, state: _InFlight, teacher: str, reason: str) -> None:
        self._dead.append(
            {"sample_id": state.sample.id, "teacher": teacher, "reason": reason, "text": state.sample.text[:DEAD_TEXT_CHARS]}
        )
        self._dead_total += 1
        self._free(state)

    def _free(self, state: _InFlight) -> None:
        self._work.pop(state.work_id, None)
        del self._in_flight[state.sample.id]
        self._done += 1

    def _reclaim(self, pending: OrderedDict[str, _Delivery], alive, consumer: str, min_idle_ms: int, count: int):
        now = time.monotonic()
        claimed = []
        for entry_id, delivery in list(pending.items()):
            if len(claimed) >= count:
                break
            if not alive(entry_id):
                del pending[entry_id]  # as XAUTOCLAIM drops deleted entries from the pending list
            elif (now - delivery.since) * 1000 >= min_idle_ms:
                pending[entry_id] = _Delivery(consumer, now)
                claimed.append(entry_id)
        return claimed

    def reclaim_stale(self, teacher: str, consumer: str, min_idle_ms: int, count: int) -> list[WorkItem]:
        self._check_teacher(teacher)
        with self._cond:
            ids = self._reclaim(self._pending[teacher], self._work.__contains__, consumer, min_idle_ms, count)
            return [WorkItem(i, self._work[i]) for i in ids]

    # -- trainer ----------------------------------------------------------------------------------------------

    def _ready_sample(self, ready_id: str) -> ReadySample:
        state = self._in_flight[self._ready[ready_id]]
        return ReadySample(ready_id, state.sample, {t: state.answers[t] for t in self.teachers})

    def next_ready(self, consumer: str, count: int, block_ms: int) -> list[ReadySample]:
        with self._cond:
            if consumer not in self._history_done:
                # Entry ids grow with time, so "after the cursor" pages through this consumer's pending list.
                cursor = self._history_cursor.get(consumer, 0)
                own = sorted(
                    (i for i, d in self._ready_pending.items() if d.consumer == consumer and _seq(i) > cursor),
                    key=_seq,
                )[:count]
                if len(own) < count:
                    self._history_done.add(consumer)
                if own:
                    self._history_cursor[consumer] = _seq(own[-1])
                    return [self._ready_sample(i) for i in own]
            deadline = time.monotonic() + max(block_ms, 0) / 1000
            if not self._wait(self._cond, lambda: bool(self._ready_undelivered), deadline):
                return []
            now = time.monotonic()
            out = []
            while self._ready_undelivered and len(out) < count:
                ready_id = self._ready_undelivered.popleft()
                self._ready_pending[ready_id] = _Delivery(consumer, now)
                out.append(self._ready_sample(ready_id))
            return out

    def reject_ready(self, item: ReadySample, teacher: str, reason: str, redispatch: bool) -> str:
        with self._cond:
            if self._ready_pending.pop(item.entry_id, None) is None:
                return "gone"
            state = self._in_flight[self._ready.pop(item.entry_id)]
            if redispatch and state.redispatched < REDISPATCH_LIMIT and teacher in self.teachers:
                state.redispatched += 1
                state.answers.pop(teacher, None)
                state.ready_id = None
                self._work.pop(state.work_id, None)
                state.work_id = self._entry_id()
                self._work[state.work_id] = state.sample
                self._undelivered[teacher].append(state.work_id)  # only the rejected teacher answers again
                self._cond.notify_all()
                return "redispatched"
            self._dead_letter(state, teacher, reason)
            self._cond.notify_all()
            return "dead"

    def reclaim_ready(self, consumer: str, min_idle_ms: int, count: int) -> list[ReadySample]:
        with self._cond:
            ids = self._reclaim(self._ready_pending, self._ready.__contains__, consumer, min_idle_ms, count)
            return [self._ready_sample(i) for i in ids]

    def ack_ready(self, items: Sequence[ReadySample]) -> None:
        with self._cond:
            for it in items:
                if self._ready_pending.pop(it.entry_id, None) is None:
                    continue  # already acked (or never delivered)
                sample_id = self._ready.pop(it.entry_id)
                self._free(self._in_flight[sample_id])
            self._cond.notify_all()

    # -- monitoring -------------------------------------------------------------------------------------------

    def stats(self) -> dict:
        with self._cond:
            return {
                "submitted": self._submitted,
                "done": self._done,
                "in_flight": self._submitted - self._done,
                "window": self.window,
                "finished": self._finished,
                "work": len(self._work),
                "ready": len(self._ready),
                "dead_letters": self._dead_total,
                "teachers": {
                    t: {
                        "pending": len(self._pending[t]),
                        "lag": sum(1 for i in self._undelivered[t] if i in self._work),
                    }
                    for t in self.teachers
                },
                "trainer": {"pending": len(self._ready_pending), "lag": len(self._ready_undelivered)},
            }

    def dead_letters(self, count: int = 100) -> list[dict]:
        with self._cond:
            return [dict(d) for d in itertools.islice(self._dead, count)]

    def is_finished(self) -> bool:
        with self._cond:
            return self._finished and self._submitted == self._done
