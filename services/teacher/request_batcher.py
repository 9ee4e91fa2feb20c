"""Dynamic batching of concurrent requests onto the one thread that owns the engine.

gRPC serves every RPC on its own thread, and the Redis worker runs on another, but a torch model is not
safe for concurrent forwards and small requests waste the device. So callers only *queue* work here; a
single batcher thread takes the queued scoring requests, merges their sequences into one
``engine.score_ids`` call under a token budget, and hands each request its own results. Generation runs
on the same thread, one request at a time, in queue order.

Scheduling follows the dynamic batchers of inference servers (Triton's ``max_queue_delay_microseconds``,
vLLM's ``max_num_batched_tokens``): the oldest request starts a batch; the batch waits at most
``max_wait_ms`` from that request's arrival for others to fill the token budget, and runs as soon as the
budget is full. A request larger than the budget is split across consecutive engine calls and its
sequences stream out as each call finishes. Requests merge when their temperature is equal; their
``top_k`` may differ (the call uses the largest and each request keeps its first ``k`` columns, which
are the top ``k``: rows are sorted).

Every input is validated in the caller's thread before it is queued (the engine's own checks, request
relative indices), so a bad request fails alone and never enters a merged batch. Should a merged call
fail anyway, each request in it is retried on its own so that only the culprit fails.

Texts are tokenized outside the batcher thread: a fast tokenizer called without padding or truncation
only reads its state, and the Rust side releases the GIL, so tokenization runs in parallel with the model.
It runs on a pool of ``max_tokenizing`` threads (issue 15): tokenizing with offsets holds
about 250 bytes per text byte until it returns (measured on the test tokenizers: 70 MB for 256 KiB of text),
and it is CPU-bound, so more concurrent calls than cores add memory, not throughput. A pool, not a semaphore
over the callers' threads: glibc gives each thread that allocates its own malloc arena and keeps what is
freed there for that arena, so tokenizing in turn on 20 RPC threads left many arenas each holding a
tokenizer call's peak; on a fixed pool the memory one call frees is what the next one reuses. Measured with
20 concurrent 1 MB calls and at most 2 tokenizing (tests/integration/test_grpc_limits.py's RSS test): peak
RSS +2.0 GB on the callers' threads, +0.7 GB on the pool.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from fuseflow.sparse import ScoredText
from fuseflow.score.engine import Engine, Generated, ScoreError

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_TOKENS = 8192
DEFAULT_MAX_TOKENIZING = 2  # concurrent tokenizer calls (see the module docstring)


class ShuttingDown(RuntimeError):
    """The batcher is closing: it takes no new work (servers answer UNAVAILABLE)."""


class RequestTooLarge(Exception):
    """A request over a size limit the caller set (servers answer RESOURCE_EXHAUSTED)."""


class Cancelled(Exception):
    """The caller cancelled the request before it finished."""


class BatchObserver(Protocol):
    """What the batcher reports (implemented by :class:`fuseflow.teacher.metrics.TeacherMetrics`)."""

    def observe_batch(self, requests: int, sequences: int, tokens: int, seconds: float) -> None: ...

    def set_queue_depth(self, depth: int) -> None: ...


# ----------------------------------------------------------------------------------------------------------
# Queued work.
# ----------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _ScoreJob:
    seqs: list[np.ndarray]  # each [L_i] int32, validated
    lengths: np.ndarray  # [R] int64 tokens per sequence
    top_k: int
    temperature: float
    offsets: list[np.ndarray] | None  # each [L_i, 2] int32 (text requests only)
    tokens: list[list[str]] | None  # token strings of text requests, None unless asked for
    return_tokens: bool
    enqueued: float = field(default_factory=time.monotonic)
    next: int = 0  # first sequence not yet handed to the engine
    delivered: int = 0
    finished: bool = False  # failed, cancelled or fully delivered
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # (index, ScoredText) | exception

    def deliver(self, index: int, scored: ScoredText) -> None:
        if self.finished:
            return
        self.out.put((index, scored))
        self.delivered += 1
        if self.delivered == len(self.seqs):
            self.finished = True

    def fail(self, error: BaseException) -> None:
        if not self.finished:
            self.finished = True
            self.out.put(error)


@dataclass(eq=False)
class _GenerateJob:
    """One call of an engine method that runs alone (generate, score_tails), in queue order."""

    kwargs: dict
    future: Future
    enqueued: float = field(default_factory=time.monotonic)
    method: str = "generate"

    @property
    def finished(self) -> bool:
        return self.future.done()


class ScoreStream:
    """A queued scoring request: iterate for ``(index, ScoredText)`` as sequences finish, or call
    :meth:`result` for the list in input order. Errors of the request are raised by either."""

    def __init__(self, job: _ScoreJob, batcher: "RequestBatcher"):
        self._job = job
        self._batcher = batcher
        self._consumed = False

    def __len__(self) -> int:
        return len(self._job.seqs)

    def __iter__(self) -> Iterator[tuple[int, ScoredText]]:
        if self._consumed:
            raise RuntimeError("a ScoreStream can be consumed once")
        self._consumed = True
        complete = False
        try:
            for _ in range(len(self._job.seqs)):
                item = self._job.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
            complete = True
        finally:
            if not complete:  # the consumer stopped early (an RPC cancelled, an error): drop the rest
                self.cancel()

    def result(self) -> list[ScoredText]:
        out: list[ScoredText | None] = [None] * len(self._job.seqs)
        for index, scored in self:
            out[index] = scored
        return out  # type: ignore[return-value]

    def cancel(self) -> None:
        """Stop scoring this request's remaining sequences; a waiting iterator raises :class:`Cancelled`."""
        self._batcher._cancel(self._job)


# ----------------------------------------------------------------------------------------------------------
# The batcher.
# ----------------------------------------------------------------------------------------------------------


class RequestBatcher:
    """Owns ``engine``: the only thread that calls its ``score_ids`` and ``generate``.

    Presents the engine's own surface (``score_texts``, ``score_ids``, ``generate``, ``tokenizer``,
    ``max_length``, …) so the teacher aligner and the Redis worker use it in place of the engine.
    """

    def __init__(
        self,
        engine: Engine,
        max_batch_tokens: int | None = None,
        max_wait_ms: float = 5.0,
        observer: BatchObserver | None = None,
        max_tokenizing: int = DEFAULT_MAX_TOKENIZING,
    ):
        self.engine = engine
        budget = max_batch_tokens or getattr(engine, "max_batch_tokens", None) or DEFAULT_MAX_BATCH_TOKENS
        if budget < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {budget}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.max_batch_tokens = int(budget)
        self.max_wait_s = max_wait_ms / 1000.0
        if max_tokenizing < 1:
            raise ValueError(f"max_tokenizing must be >= 1, got {max_tokenizing}")
        self._tokenizers = ThreadPoolExecutor(max_tokenizing, thread_name_prefix="teacher-tokenize")
        self.observer = observer
        self._pending: deque[_ScoreJob | _GenerateJob] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="teacher-batcher", daemon=True)
        self._thread.start()

    # -- the engine's surface ------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def kind(self) -> str:
        return self.engine.kind

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    @property
    def max_length(self) -> int:
        return self.engine.max_length

    @property
    def max_top_k(self) -> int | None:
        return self.engine.max_top_k

    def score_texts(self, texts: list[str], top_k: int, temperature: float = 1.0) -> list[ScoredText]:
        """As :meth:`Engine.score_texts`, batched with whatever else is queued."""
        return self.submit_texts(texts, top_k, temperature).result()

    def score_ids(self, ids: list[np.ndarray], top_k: int, temperature: float = 1.0) -> list[ScoredText]:
        """As :meth:`Engine.score_ids`, batched with whatever else is queued."""
        return self.submit_ids(ids, top_k, temperature).result()

    def generate(
        self,
        prompt_ids: np.ndarray,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] = (),
        seed: int | None = None,
    ) -> Generated:
        """As :meth:`Engine.generate`, run on the batcher thread in queue order."""
        return self.submit_generate(prompt_ids, max_new_tokens, temperature, top_p, stop_token_ids, seed).result()

    def tokenize(
        self,
        texts: Sequence[str],
        add_special_tokens: bool = True,
        return_tokens: bool = False,
        max_tokens: int | None = None,
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[list[str]] | None]:
        """``(ids, offsets, tokens)`` of ``texts``: each ``[L_i]`` int32, ``[L_i, 2]`` int32 and the token
        strings (None unless ``return_tokens``). Runs on the tokenizer pool (``max_tokenizing`` threads, see
        the module docstring); the caller waits. Raises :class:`RequestTooLarge` if the texts hold more than
        ``max_tokens`` tokens together, before their offsets and strings become arrays."""
        try:
            done = self._tokenizers.submit(self._tokenize, list(texts), add_special_tokens, return_tokens, max_tokens)
        except RuntimeError:  # the pool is shut down: close() ran
            raise ShuttingDown("the teacher is shutting down; retry on another replica") from None
        return done.result()

    def _tokenize(self, texts: list[str], add_special_tokens: bool, return_tokens: bool, max_tokens: int | None):
        enc = self.engine.tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        total = sum(len(x) for x in enc["input_ids"])
        if max_tokens is not None and total > max_tokens:
            # The exception's traceback holds this frame, and with it ``enc`` (~250 bytes per text byte), until
            # the cycle collector runs, which large buffers do not prompt: 20 refused 1 MB texts took the peak
            # RSS up 2.9 GB.
            del enc
            raise RequestTooLarge(
                f"request holds {total} tokens, more than the server's limit of {max_tokens} per request; "
                "send fewer or shorter texts"
            )
        ids = [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]  # each [L_i]
        offsets = [np.asarray(o, dtype=np.int32).reshape(-1, 2) for o in enc["offset_mapping"]]  # each [L_i, 2]
        tokens = [enc.tokens(i) for i in range(len(ids))] if return_tokens else None
        return ids, offsets, tokens

    # -- queueing --------------------------------------------------------------------------------------------

    def submit_texts(
        self,
        texts: Sequence[str],
        top_k: int,
        temperature: float = 1.0,
        return_tokens: bool = True,
        max_tokens: int | None = None,
    ) -> ScoreStream:
        """Validate and tokenize ``texts`` here (the caller's thread) and queue them for scoring.

        Raises :class:`ScoreError` for a bad input (its ``index`` is the text's position in ``texts``) and
        :class:`RequestTooLarge` if the texts hold more than ``max_tokens`` tokens together.
        """
        self._check_request(top_k, temperature)
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text:
                raise ScoreError(f"text {i} is empty" if isinstance(text, str) else f"text {i} is not a string", i)
        if not texts:
            return self._queue(_ScoreJob([], np.zeros(0, np.int64), top_k, temperature, [], None, return_tokens))
        seqs, offsets, tokens = self.tokenize(texts, return_tokens=return_tokens, max_tokens=max_tokens)
        lengths = self._check_lengths(seqs, max_tokens)
        return self._queue(_ScoreJob(seqs, lengths, top_k, temperature, offsets, tokens, return_tokens))

    def submit_ids(
        self,
        ids: Sequence[np.ndarray],
        top_k: int,
        temperature: float = 1.0,
        return_tokens: bool = True,
        max_tokens: int | None = None,
    ) -> ScoreStream:
        """Validate token id sequences here (the caller's thread) and queue them for scoring."""
        self._check_request(top_k, temperature)
        vocab = self.engine.vocab_size
        seqs = []
        for i, x in enumerate(ids):
            a = np.asarray(x)
            if a.ndim != 1 or a.size == 0:
                raise ScoreError(f"token ids {i} must be a non-empty 1-D array, got shape {a.shape}", i)
            if not np.issubdtype(a.dtype, np.integer):
                raise ScoreError(f"token ids {i} must be integers, got dtype {a.dtype}", i)
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi >= vocab:
                raise ScoreError(f"token ids {i} holds id {lo if lo < 0 else hi}, outside the vocabulary [0, {vocab})", i)
            seqs.append(a.astype(np.int32, copy=False))
        lengths = self._check_lengths(seqs, max_tokens)
        return self._queue(_ScoreJob(seqs, lengths, top_k, temperature, None, None, return_tokens))

    def submit_generate(
        self,
        prompt_ids: np.ndarray,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] = (),
        seed: int | None = None,
    ) -> Future:
        """Queue one generation; the future holds a :class:`Generated` or the engine's error."""
        kwargs = dict(
            prompt_ids=prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            stop_token_ids=tuple(stop_token_ids), seed=seed,
        )
        job = _GenerateJob(kwargs, Future())
        self._enqueue(job)
        return job.future

    def submit_call(self, method: str, **kwargs) -> Future:
        """Queue one call of the engine's ``method`` that is not merged with others (``score_tails``); the
        future holds its result or its error."""
        job = _GenerateJob(kwargs, Future(), method=method)
        self._enqueue(job)
        return job.future

    def _check_request(self, top_k: int, temperature: float) -> None:
        # The engine's own checks, so a merged batch never fails on them (messages stay the engine's).
        self.engine._check_top_k(top_k)
        self.engine._check_temperature(temperature)

    def _check_lengths(self, seqs: list[np.ndarray], max_tokens: int | None) -> np.ndarray:
        self.engine._check_lengths(seqs)
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))  # [R]
        total = int(lengths.sum())
        if max_tokens is not None and total > max_tokens:
            raise RequestTooLarge(
                f"request holds {total} tokens, more than the server's limit of {max_tokens} per request; "
                "send fewer or shorter texts"
            )
        return lengths

    def _queue(self, job: _ScoreJob) -> ScoreStream:
        if not job.seqs:
            job.finished = True
            return ScoreStream(job, self)
        self._enqueue(job)
        return ScoreStream(job, self)

    def _enqueue(self, job) -> None:
        with self._cond:
            if self._closing:
                raise ShuttingDown("the teacher is shutting down; retry on another replica")
            self._pending.append(job)
            self._report_depth()
            self._cond.notify()

    def _cancel(self, job: _ScoreJob) -> None:
        with self._cond:
            job.fail(Cancelled("request cancelled"))
            if job in self._pending:
                self._pending.remove(job)
                self._report_depth()

    def _report_depth(self) -> None:
        if self.observer is not None:
            self.observer.set_queue_depth(len(self._pending))

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closing

    def close(self, timeout: float | None = None, cancel_pending: bool = False) -> None:
        """Take no new work; finish queued work (or fail it with :class:`ShuttingDown` when
        ``cancel_pending``), then stop the thread. Waits up to ``timeout`` seconds for it."""
        with self._cond:
            self._closing = True
            if cancel_pending:
                for job in self._pending:
                    err = ShuttingDown("the teacher shut down before this request ran")
                    job.fail(err) if isinstance(job, _ScoreJob) else job.future.set_exception(err)
                self._pending.clear()
                self._report_depth()
            self._cond.notify_all()
        self._tokenizers.shutdown(wait=False, cancel_futures=cancel_pending)
        self._thread.join(timeout)

    def __enter__(self) -> "RequestBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the batcher thread ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                work = self._next_work()
                if work is None:
                    return
            try:
                if isinstance(work, _GenerateJob):
                    self._run_generate(work)
                else:
                    self._run_score(work)
            except Exception as e:  # a bug here must fail the requests, not leave them waiting forever
                log.exception("teacher batcher: unexpected error")
                with self._cond:
                    if isinstance(work, _GenerateJob):
                        if not work.future.done():
                            work.future.set_exception(e)
                    else:
                        for job, _, _ in work:
                            job.fail(e)

    def _next_work(self):
        """Under the lock: wait for work and return a generate job or a score batch (None: closed)."""
        while True:
            while not self._pending and not self._closing:
                self._cond.wait()
            if not self._pending:
                return None
            head = self._pending[0]
            if head.finished:  # cancelled while queued
                self._pending.popleft()
                continue
            if isinstance(head, _GenerateJob):
                self._pending.popleft()
                self._report_depth()
                return head
            deadline = head.enqueued + self.max_wait_s
            while not self._closing and self._compatible_tokens(head) < self.max_batch_tokens:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
                if head.finished:
                    break
            if head.finished:
                continue
            batch = self._take_batch(head)
            self._report_depth()
            return batch

    def _compatible_tokens(self, head: _ScoreJob) -> int:
        return sum(
            int(j.lengths[j.next :].sum())
            for j in self._pending
            if isinstance(j, _ScoreJob) and not j.finished and j.temperature == head.temperature
        )

    def _take_batch(self, head: _ScoreJob) -> list[tuple[_ScoreJob, int, int]]:
        """Sequences for one engine call, oldest request first: ``(job, start, stop)`` slices of each."""
        parts: list[tuple[_ScoreJob, int, int]] = []
        used = 0
        for job in list(self._pending):
            if not isinstance(job, _ScoreJob) or job.temperature != head.temperature:
                continue
            if job.finished:
                self._pending.remove(job)
                continue
            # How many of the job's next sequences fit in what is left of the budget (at least one per batch).
            cum = np.cumsum(job.lengths[job.next :])  # [R - next]
            n = int(np.searchsorted(cum, self.max_batch_tokens - used, side="right"))
            if n == 0 and not parts:
                n = 1
            if n == 0:  # a later, shorter request may still fit; this one heads a coming batch
                continue
            parts.append((job, job.next, job.next + n))
            used += int(cum[n - 1])
            job.next += n
            if job.next == len(job.seqs):
                self._pending.remove(job)
            if used >= self.max_batch_tokens:
                break
        return parts

    def _run_score(self, parts: list[tuple[_ScoreJob, int, int]]) -> None:
        seqs = [s for job, a, b in parts for s in job.seqs[a:b]]
        top_k = max(job.top_k for job, _, _ in parts)
        tokens = sum(int(job.lengths[a:b].sum()) for job, a, b in parts)
        t0 = time.perf_counter()
        try:
            scored = self.engine.score_ids(seqs, top_k, parts[0][0].temperature)
        except Exception as e:
            if len(parts) > 1:
                log.warning("merged batch of %d requests failed (%s); retrying each alone", len(parts), e)
                for part in parts:
                    self._run_score([part])
            else:
                with self._cond:
                    parts[0][0].fail(e)
            return
        if self.observer is not None:
            self.observer.observe_batch(len(parts), len(seqs), tokens, time.perf_counter() - t0)
        pos = 0
        with self._cond:  # deliveries race with cancel(); both take the lock
            for job, a, b in parts:
                for i in range(a, b):
                    job.deliver(i, _as_requested(job, i, scored[pos]))
                    pos += 1

    def _run_generate(self, job: _GenerateJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        t0 = time.perf_counter()
        try:
            result = getattr(self.engine, job.method)(**job.kwargs)
        except Exception as e:
            job.future.set_exception(e)
            return
        if self.observer is not None and job.method == "generate":
            self.observer.observe_batch(1, 1, len(result.token_ids), time.perf_counter() - t0)
        job.future.set_result(result)


def _as_requested(job: _ScoreJob, i: int, scored: ScoredText) -> ScoredText:
    """One sequence's result as its request asked: its own ``top_k`` columns, its text's offsets and
    token strings (the merged call scored ids, so it knows neither)."""
    k = job.top_k
    return replace(
        scored,
        offsets=job.offsets[i] if job.offsets is not None else None,
        tokens=(job.tokens[i] if job.tokens is not None else scored.tokens) if job.return_tokens else None,
        topk_ids=scored.topk_ids[:, :k],  # [L-1, k]
        topk_logprobs=scored.topk_logprobs[:, :k],  # [L-1, k]
    )
