"""The dispatcher (DESIGN.md, "Data flow"): trainer rank 0 feeds the corpus into the transport, in order.

``Transport.submit`` blocks while the dispatch window is full, so the dispatcher runs in a thread and the
window is the backpressure: the corpus is never queued whole. How far it got is recorded by the transport
with each submission (``submit_at`` / ``dispatch_position``; in Redis, in the script that queues), so a
resumed run neither queues again a sample that was trained and freed, nor skips one.

Before it starts, the dispatching rank shares with the others what they need of the corpus (how many samples,
hence how many steps) and the key its samples are signed with (:func:`share_corpus`, issue 26).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fuseflow.config import TrainConfig
from fuseflow.sparse import Sample
from fuseflow.wire.transport import Backoff, Transport, TransportUnavailable, retrying

if TYPE_CHECKING:
    from .data import Corpus

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


# ----------------------------------------------------------------------------------------------------------
# What every rank learns before the dispatch starts, and the dispatch itself.
# ----------------------------------------------------------------------------------------------------------


def share_corpus(transport: Transport, out: Path, prepare: Callable[[], "Corpus"], *, fresh: bool,
                 dispatching: bool, broadcast: bool) -> tuple["Corpus | None", int]:
    """``(corpus, number of training samples)``: the dispatching rank runs ``prepare()`` (the corpus, cut) and,
    where other processes write the queue, makes or reads the key that signs its samples (:func:`sample_key`);
    with ``broadcast`` the count and the key go to every rank (whose corpus is None), also when rank 0 failed (the
    others then raise instead of waiting). A resumed run without its key signs the samples in flight anew."""
    import torch.distributed as dist

    corpus = None
    shared: list = [-1, None]  # rank 0's sample count and sample key
    new_key = False
    try:
        if dispatching:
            corpus = prepare()
            shared[0] = len(corpus.train)
        if transport.authenticates_samples and dispatching:
            shared[1], new_key = sample_key(out, fresh)
    finally:
        if broadcast:
            dist.broadcast_object_list(shared, src=0)
    if shared[0] < 0:
        raise RuntimeError("rank 0 could not prepare the corpus (see its log)")
    if shared[1] is not None:
        transport.authenticate(shared[1])
        if dispatching and new_key and not fresh:  # resumed without its key (deleted, or a run older than it)
            n = retrying(transport.sign_in_flight, "sign samples in flight")
            log.warning("resumed without %s: a new key signs the %d samples in flight as they are now",
                        out / SAMPLE_KEY_FILE, n)
    return corpus, shared[0]


def new_dispatcher(transport: Transport, samples: Sequence[Sample], rejected: Sequence, train: TrainConfig,
                   steps: int, *, fresh: bool, rank: int, world: int) -> Dispatcher:
    """The dispatching rank's :class:`Dispatcher`, not started: a fresh run resets its queue first; rank 0
    dead-letters the documents the corpus set aside (counted in the run's dead-letter fraction, issue 15); a
    per-process transport (in-process) dispatches this rank's shard ``samples[rank::world]``. ``steps`` cut the
    sequence when ``train.max_steps`` is set."""
    local = transport.per_process
    if fresh and hasattr(transport, "reset"):
        deleted = retrying(transport.reset, "reset")
        log.info("fresh run %r: reset its queue (%d keys deleted)", transport.run, deleted)
    if rejected and rank == 0:
        items = [(r.id, r.reason, r.text) for r in rejected]
        retrying(lambda: transport.dead_letter_inputs(items), "dead letters")
    per_step = train.samples_per_step(1 if local else world)
    sequence = dispatch_sequence(samples[rank::world] if local else samples, train.epochs,
                                 steps * per_step if train.max_steps else None)
    log.info("online run %r: %d samples to dispatch, %d steps, %d ranks, window %d", transport.run,
             len(sequence), steps, world, transport.window)
    return Dispatcher(transport, sequence)


SAMPLE_KEY_FILE = "sample.key"


def sample_key(out: Path, fresh: bool) -> tuple[bytes, bool]:
    """The key the trainer signs its samples with (:meth:`Transport.authenticate`, issue 26) and whether it is
    new: a new one for a fresh run, the run's own (``out/sample.key``, readable by this user only) when it
    resumes, so the samples in flight at a restart stay valid. It lives with the checkpoints, never in Redis: a
    teacher's login cannot read it, so it can neither forge a sample nor change one's text."""
    path = out / SAMPLE_KEY_FILE
    if not fresh and path.exists():
        return bytes.fromhex(path.read_text().strip()), False
    key = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    os.replace(tmp, path)
    return key, True
