"""The dispatcher (DESIGN.md, "Data flow"): trainer rank 0 feeds the corpus into the transport, in order.

``Transport.submit`` blocks while the dispatch window is full, so the dispatcher runs in a thread and the
window is the backpressure: the corpus is never queued whole. How far it got is recorded by the transport
with each submission (``submit_at`` / ``dispatch_position``; in Redis, in the script that queues), so a
resumed run neither queues again a sample that was trained and freed, nor skips one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import replace

from fuseflow.sparse import Sample
from fuseflow.wire.transport import Backoff, Transport, TransportUnavailable

log = logging.getLogger(__name__)


def dispatch_sequence(samples: Sequence[Sample], epochs: int = 1, limit: int | None = None) -> list[Sample]:
    """The samples a run dispatches, in order: ``epochs`` passes over ``samples`` (the order of
    ``prepare_corpus``, as the in-process path), cut to the first ``limit`` (``train.max_steps``).

    The transport deduplicates by sample id, so passes after the first carry the epoch in the id
    (``"<id>#e2"``): a sample may be trained once per epoch, and ``trained_samples.log`` tells the passes apart.
    """
    if epochs < 1:
        raise ValueError(f"train.epochs must be >= 1, got {epochs}")
    out = [s if e == 0 else replace(s, id=f"{s.id}#e{e + 1}") for e in range(epochs) for s in samples]
    return out if limit is None else out[: max(0, limit)]


class Dispatcher(threading.Thread):
    """Submits ``samples[dispatch_position():]`` to ``transport`` in chunks of ``chunk``, then marks the
    submissions finished. Redis outages are retried from the transport's recorded position; any other error
    ends the thread and is re-raised by :meth:`join_checked`. ``stop()`` ends it early (the trainer failed)."""

    def __init__(self, transport: Transport, samples: Sequence[Sample], chunk: int = 64, poll_s: float = 0.5):
        super().__init__(name="dispatcher", daemon=True)
        if chunk < 1:
            raise ValueError(f"dispatcher chunk must be >= 1, got {chunk}")
        self.transport = transport
        self.samples = samples
        self.chunk = chunk
        self.poll_s = poll_s
        self.submitted_here = 0  # samples this thread consumed (queued or found in flight)
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        try:
            self._dispatch()
        except BaseException as e:  # noqa: BLE001 - handed to the trainer thread by join_checked
            self.error = e
            log.error("dispatcher failed: %r", e)

    def join_checked(self, timeout: float | None = None) -> None:
        self.join(timeout)
        if self.error is not None:
            raise RuntimeError(f"the dispatcher failed: {self.error!r}") from self.error

    def _dispatch(self) -> None:
        n = len(self.samples)
        backoff = Backoff(self._stop_event)
        start = None
        while not self._stop_event.is_set():
            try:
                position = self.transport.dispatch_position()
                if start is None:
                    start = position
                    if position > 0:
                        log.info("dispatcher resumes at sample %d of %d", position, n)
                if position >= n:
                    self.transport.finish_submissions()
                    log.info("dispatcher finished: %d samples (%d in this process)", n, position - start)
                    return
                chunk = self.samples[position : position + self.chunk]
                # A bounded wait, so stop() is noticed while the window stays full.
                self.transport.submit_at(position, chunk, timeout_s=self.poll_s)
                self.submitted_here = self.transport.dispatch_position() - start
                backoff.reset()
            except TimeoutError:
                continue  # window full: the position recorded what was queued; go on from there
            except TransportUnavailable as e:
                log.warning("dispatcher: transport unavailable (%s); retrying in %.1f s", e, backoff.delay)
                backoff.wait()
