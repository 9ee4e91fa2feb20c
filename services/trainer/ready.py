"""The ready feed (DESIGN.md, "Data flow"): every trainer rank reads the samples all teachers have answered, checks
them at the trust boundary (one target encoding per sample, its positions counted once), and yields
micro-batches in lockstep with the other ranks; a sample is acked once the checkpoint that covers it is written.
Also what the feed needs of the transport: its teachers and a window that holds a checkpoint interval."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from fuseflow.config import FuseConfig
from fuseflow.models import encode
from fuseflow.wire.transport import ReadySample, Transport, check_ready, retrying

log = logging.getLogger(__name__)


def all_reduce(values: list[int], op: str = "sum") -> list[int]:
    """Element-wise ``sum`` / ``min`` / ``max`` of ``values`` over every rank (identity without a process group)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.int64, device=device)  # [n]
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return [int(v) for v in t.tolist()]


def cannot_grow(stats: dict) -> bool:
    """No sample can reach a trainer rank before one is acked: every sample in flight is already held by a
    rank, and the dispatcher has finished or the window is full."""
    held_by_ranks = stats["in_flight"] <= stats["trainer"]["pending"]
    return held_by_ranks and (stats["finished"] or stats["in_flight"] >= stats["window"])


def drained(stats: dict) -> bool:
    """The epoch's samples have all reached the trainer ranks (or the dead-letter stream)."""
    return stats["finished"] and stats["in_flight"] <= stats["trainer"]["pending"]


class ReadyFeed:
    """One rank's micro-batches of ready samples, in lockstep with the other ranks.

    Each micro-step the rank waits for ``micro_batch`` samples, or fewer when no more can come (end of the
    epoch); then one all-reduce tells every rank whether any has data. If one has, all step — a rank without
    data yields ``[]`` (``loop.train`` runs a fully masked batch) so that DeepSpeed's collectives never wait
    on a missing rank. If none has, the epoch is over: the feed pads to the gradient-accumulation boundary
    with empty micro-steps (so the last samples reach an optimizer step) and ends, on every rank together.

    ``tokenizer``: the target's; a sample that arrives without its target encoding (from Redis: the wire carries
    the text) gets it here, once, for the check and the batch (issue 25).

    ``trained_log``: this rank's ``trained_samples*.log``, read on the first micro-step (the loop has then cut
    it to the checkpoint it resumed from): a redelivered sample listed there is already in the weights, and is
    acked instead of trained again. ``ack_durable`` is the loop's ``on_durable``.
    """

    def __init__(
        self,
        transport: Transport,
        consumer: str,
        micro_batch: int,
        grad_accum: int,
        trained_log: Path,
        poll_ms: int = 100,
        on_batch: Callable[[int, int], None] | None = None,
        stall_timeout_s: float = 120.0,
        check: Callable[[ReadySample], dict[str, str]] | None = None,
        redispatch: bool = True,
        check_teachers: Callable[[], None] | None = None,
        tokenizer=None,
    ):
        self.transport = transport
        self.tokenizer = tokenizer  # the target's: encodes each received sample that carries no encoding, once
        self.consumer = consumer
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.trained_log = Path(trained_log)
        self.poll_ms = poll_ms
        self.on_batch = on_batch
        self.stall_timeout_s = stall_timeout_s
        self.micro_steps = 0
        self.skipped = 0  # redelivered samples that a checkpoint already covered
        self.check = check  # the trust boundary: {teacher: reason} for answers that cannot be trained on
        self.redispatch = redispatch
        self.check_teachers = check_teachers  # raises when a teacher can no longer answer (a dead worker thread)
        self.rejected = 0
        self._unacked: dict[str, ReadySample] = {}  # trained, waiting for the checkpoint that covers them
        self._skip: set[str] | None = None

    def __iter__(self) -> Iterator[list]:
        stalled_since = None
        while True:
            if self._skip is None:
                self._skip = set(self.trained_log.read_text().split()) if self.trained_log.exists() else set()
            batch = self._fill()
            tokens = sum(next(iter(r.dists.values())).num_positions for r in batch if r.dists)
            ranks_with_data, samples, tokens = all_reduce([int(bool(batch)), len(batch), tokens])
            if ranks_with_data:
                stalled_since = None
                if self.on_batch is not None:
                    self.on_batch(samples, tokens)
                for r in batch:
                    self._unacked[r.sample.id] = r
                self.micro_steps += 1
                yield [(r.sample, r.dists) for r in batch]
                continue
            if self.micro_steps % self.grad_accum:
                self.micro_steps += 1
                yield []
                continue
            stats = retrying(self.transport.stats, "trainer stats")
            if all_reduce([int(drained(stats))], "min")[0]:
                return
            # Every rank is empty-handed and more can only come after an ack: the window cannot hold a
            # checkpoint's worth of samples (checked at start), or ranks saw the queue at different moments.
            stalled_since = stalled_since or time.monotonic()
            too_long = int(time.monotonic() - stalled_since > self.stall_timeout_s)
            if all_reduce([too_long], "max")[0]:  # every rank gives up together, none waits on the others
                raise RuntimeError(
                    f"online trainer stalled for {self.stall_timeout_s:.0f} s: {stats['in_flight']} samples in "
                    f"flight, all held by trainer ranks, window {stats['window']}: raise online.window (--window) "
                    "or lower train.checkpoint_every"
                )
            time.sleep(self.poll_ms / 1000)

    def _fill(self) -> list[ReadySample]:
        batch: list[ReadySample] = []
        while len(batch) < self.micro_batch:
            if self.check_teachers is not None:
                self.check_teachers()
            need = self.micro_batch - len(batch)
            got = retrying(lambda: self.transport.next_ready(self.consumer, need, self.poll_ms), "next_ready")
            for r in got:
                if r.sample.id in self._skip:
                    retrying(lambda r=r: self.transport.ack_ready([r]), "ack")
                    self._skip.discard(r.sample.id)
                    self.skipped += 1
                    log.info("sample %s is in the checkpoint already: acked, not trained again", r.sample.id)
                    continue
                if self.tokenizer is not None and r.sample.encoding is None:
                    r = replace(r, sample=replace(r.sample, encoding=encode(self.tokenizer, r.sample.text)))
                if problems := (self.check(r) if self.check is not None else r.problems):
                    self._reject(r, problems)
                else:
                    batch.append(r)
            if not got and cannot_grow(retrying(self.transport.stats, "trainer stats")):
                break
        return batch

    def _reject(self, r: ReadySample, problems: dict[str, str]) -> None:
        """An entry that fails the checks never reaches the loss, and is acked so that it cannot crash-loop a
        restarted trainer (issue 15): back to its teacher once, or dead-lettered, per train.rejected_results."""
        teacher, reason = next(iter(problems.items()))
        outcome = retrying(lambda: self.transport.reject_ready(r, teacher, reason, self.redispatch), "reject")
        self.rejected += 1
        log.warning("sample %s: teacher %s's answer rejected (%s): %s", r.sample.id, teacher, outcome, reason,
                    extra={"fields": {"sample": r.sample.id, "teacher": teacher, "outcome": outcome}})

    def ack_durable(self, sample_ids: list[str]) -> None:
        items = [self._unacked.pop(i) for i in sample_ids if i in self._unacked]
        if items:
            retrying(lambda: self.transport.ack_ready(items), "ack")


def check_transport(cfg: FuseConfig, transport: Transport, world: int) -> None:
    """The transport's teachers are the config's sources, and its window holds what a checkpoint interval needs
    (:meth:`~fuseflow.config.TrainConfig.required_window`; per process for an in-process transport, which serves
    one rank)."""
    teachers = [s.key for s in cfg.sources]
    if list(transport.teachers) != teachers:
        raise ValueError(f"transport teachers {transport.teachers} != the config's sources {teachers}")
    need = cfg.train.required_window(1 if transport.per_process else world)
    if transport.window < need:
        raise ValueError(
            f"transport window {transport.window} < {need} samples, what train.checkpoint_every="
            f"{cfg.train.checkpoint_every} steps of {cfg.train.micro_batch_size}x{cfg.train.grad_accum}x{world} "
            "samples need (samples are acked at checkpoints): raise online.window (--window) or lower "
            "train.checkpoint_every"
        )


def result_check(model, tokenizer, teachers: list[str]) -> Callable[[ReadySample], dict[str, str]]:
    """The trainer's checks of a ready sample (:func:`fuseflow.wire.transport.check_ready`) against this
    target: ids below its output vocabulary, one row per target position of the sample's text (its encoding,
    :class:`ReadyFeed` gives each sample one)."""
    head = model.get_output_embeddings()
    vocab_size = int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)

    def check(item: ReadySample) -> dict[str, str]:
        enc = item.sample.encoding if item.sample.encoding is not None else encode(tokenizer, item.sample.text)
        return check_ready(item, teachers, vocab_size, len(enc.ids) - 1)

    return check
