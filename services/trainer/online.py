"""The one knowledge-fusion recipe, :func:`run_online` (DESIGN.md, "Data flow" and "Trainer"; issue 13), and
``fuseflow train RUN.yaml --redis URL``, which runs it over Redis.

The recipe takes a :class:`~fuseflow.wire.transport.Transport`: teachers on its other side stream aligned
top-k distributions in; no logits cache is ever written. Over ``RedisTransport`` they are ``fuseflow teacher
serve --redis`` processes; ``fuseflow fuse`` runs the same recipe over ``InProcessTransport`` with the teacher
workers as threads (:func:`fuseflow.trainer.knowledge_fusion.train_in_process`). Top to bottom:

1. every rank joins the DeepSpeed group (``deepspeed`` / ``torchrun`` launchers: ``RANK``, ``WORLD_SIZE``,
   ``MASTER_ADDR``, ``MASTER_PORT``) and loads the target;
2. rank 0 splits the corpus (``prepare_corpus``; an in-process transport: every rank, its own shard) and starts the
   :class:`~fuseflow.trainer.dispatcher.Dispatcher` thread: the samples go to the teachers in order, through a
   bounded window;
3. every rank reads ready samples as consumer ``rank<r>`` (:class:`ReadyFeed`) and trains with the same loop
   as ``fuseflow fuse`` (``fuseflow.trainer.loop.train``); a sample is acked only once the checkpoint that
   covers it is written ("XACK after the step is durable");
4. the epoch ends when the dispatcher has finished and every sample was trained or dead-lettered; the HF
   model directory, ``metrics.jsonl``, ``trained_samples*.log`` and ``dead_letter.jsonl`` are written under
   ``run_dir/fused``. (The CLM baseline, pairwise runs and the evaluation are ``fuseflow fuse``'s outer loop.)

Restarts: a run directory with a checkpoint resumes; the transport hands each rank the samples it had read but
not acked, those the checkpoint already covers are acked without training again, and the dispatcher resumes
at its recorded position, so every sample is trained exactly once. A run directory without a checkpoint
starts the run afresh: its keys in Redis are reset.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from fuseflow.config import ConfigError, FuseConfig, RunFailed, load_config
from fuseflow.models import encode
from fuseflow.wire.transport import ReadySample, Transport, TransportUnavailable, check_ready, retrying

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Lockstep between ranks
# ----------------------------------------------------------------------------------------------------------


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


def required_window(cfg: FuseConfig, world: int) -> int:
    """Samples in flight that a checkpoint interval needs: samples are acked only at a checkpoint, so the
    window must hold every sample trained since the last one plus a micro-batch per rank, or the dispatcher
    waits on acks that wait on samples."""
    t = cfg.train
    return (t.checkpoint_every * t.grad_accum + 1) * t.micro_batch_size * world


def default_window(cfg: FuseConfig, world: int) -> int:
    """Samples in flight by default: twice what a checkpoint interval needs, at least 256."""
    return max(256, 2 * required_window(cfg, world))


# ----------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------


def run_online(
    cfg: FuseConfig,
    transport: Transport,
    *,
    out: Path | None = None,
    samples: list | None = None,
    progress: bool = True,
    metrics=None,
    poll_ms: int = 100,
    check_teachers: Callable[[], None] | None = None,
    rejected: Sequence = (),
    tokenizer=None,
):
    """The one recipe (issue 13): dispatch the corpus into ``transport`` and train ``cfg.target`` on its ready
    samples until the epoch ends; returns the loop's ``TrainResult``. Teachers answer on the other side of the
    transport: ``fuseflow teacher serve --redis`` processes over ``RedisTransport`` (``fuseflow train``), or
    worker threads over ``InProcessTransport`` (``fuseflow fuse``, :func:`fuseflow.trainer.knowledge_fusion.
    train_in_process`). ``cfg.sources`` are the transport's teachers; none (a teacherless in-process transport)
    is the CLM-only baseline.

    ``out``: the run's output folder (default ``run_dir/fused``); ``samples``: the training samples when the
    caller has split the corpus already (default: :func:`prepare_corpus` on rank 0). A ``per_process``
    transport (in-process) serves one rank: every rank dispatches its own shard ``samples[rank::world]``.
    ``metrics``: a :class:`~fuseflow.trainer.metrics.TrainerMetrics` (rank 0) or None. ``check_teachers``: called
    while the trainer waits for samples, raises to end the run (in-process teachers: the error a worker thread
    died of, :meth:`fuseflow.teacher.worker.WorkerThreads.check`; served teachers are replaced by their
    supervisor instead, their pending work reclaimed). ``rejected``: the corpus documents set aside with the given
    ``samples`` (:class:`fuseflow.corpus.Rejected`); rank 0 dead-letters them, as those it sets aside itself.
    ``tokenizer``: the target's, when the caller has loaded it already."""
    import torch.distributed as dist

    from fuseflow.models import load

    from .dispatcher import Dispatcher, dispatch_sequence
    from .knowledge_fusion import prepare_corpus, total_steps
    from .loop import init_distributed, train, trained_ids_path

    rank, world = init_distributed()
    teachers = [s.key for s in cfg.sources]
    if list(transport.teachers) != teachers:
        raise ValueError(f"transport teachers {transport.teachers} != the config's sources {teachers}")
    need = required_window(cfg, 1 if transport.per_process else world)
    if transport.window < need:
        raise ValueError(
            f"transport window {transport.window} < {need} samples, what train.checkpoint_every="
            f"{cfg.train.checkpoint_every} steps of {cfg.train.micro_batch_size}x{cfg.train.grad_accum}x{world} "
            "samples need (samples are acked at checkpoints): raise online.window (--window) or lower "
            "train.checkpoint_every"
        )
    out = Path(out) if out is not None else Path(cfg.run_dir) / "fused"
    out.mkdir(parents=True, exist_ok=True)
    target = load(cfg.target.model, device=cfg.device, attn_implementation=cfg.target.attn_implementation,
                  tokenizer=tokenizer)
    local = transport.per_process  # this rank's own pipeline: it dispatches its own shard
    dispatching = local or rank == 0

    fresh = not (out / "checkpoints" / "latest").exists()
    new_key = False
    shared = [-1, None]  # rank 0's sample count and sample key, for every rank
    try:
        if samples is None and dispatching:
            corpus = prepare_corpus(cfg, target.tokenizer)
            samples, rejected = corpus.train, corpus.rejected
        if samples is not None:
            shared[0] = len(samples)
        if transport.authenticates_samples and dispatching:
            shared[1], new_key = sample_key(out, fresh)
    finally:  # the other ranks wait for the count: tell them when rank 0 failed (-1), not only when it did not
        if world > 1 and not local:
            dist.broadcast_object_list(shared, src=0)
    if shared[0] < 0:
        raise RuntimeError("rank 0 could not prepare the corpus (see its log)")
    if shared[1] is not None:
        transport.authenticate(shared[1])
        if dispatching and new_key and not fresh:  # resumed without its key (deleted, or a run older than it)
            n = retrying(transport.sign_in_flight, "sign samples in flight")
            log.warning("resumed without %s: a new key signs the %d samples in flight as they are now",
                        out / SAMPLE_KEY_FILE, n)
    steps = total_steps(cfg, shared[0], world)
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * (1 if local else world)
    limit = steps * per_step if cfg.train.max_steps else None

    dispatcher = None
    if dispatching:
        if fresh and hasattr(transport, "reset"):
            deleted = retrying(transport.reset, "reset")
            log.info("fresh run %r: reset its queue (%d keys deleted)", transport.run, deleted)
        if rejected and rank == 0:  # unreadable documents: dead letters of the run, in its fraction (issue 15)
            items = [(r.id, r.reason, r.text) for r in rejected]
            retrying(lambda: transport.dead_letter_inputs(items), "dead letters")
        sequence = dispatch_sequence(samples[rank::world] if local else samples, cfg.train.epochs, limit)
        log.info("online run %r: %d samples to dispatch, %d steps, %d ranks, window %d", transport.run,
                 len(sequence), steps, world, transport.window)
        dispatcher = Dispatcher(transport, sequence)
    if world > 1:
        dist.barrier()  # nobody reads the queue before rank 0 has reset it
    if dispatcher is not None:
        dispatcher.start()

    stop_poll = threading.Event()
    if metrics is not None:
        threading.Thread(target=_poll_queue, args=(transport, metrics, stop_poll), daemon=True, name="queue-poll").start()
    feed = ReadyFeed(
        transport, f"rank{rank}", cfg.train.micro_batch_size, cfg.train.grad_accum,
        trained_ids_path(out, rank, world), poll_ms=poll_ms,
        on_batch=metrics.observe_batch if metrics is not None else None,
        check=result_check(target.model, target.tokenizer, teachers),
        redispatch=cfg.train.rejected_results == "redispatch", check_teachers=check_teachers,
        tokenizer=target.tokenizer,
    )
    try:
        result = train(
            target.model, target.tokenizer, feed,
            teachers=teachers, train_cfg=cfg.train, fusion_cfg=cfg.fusion, total_steps=steps, run_dir=out, seed=cfg.seed,
            on_durable=feed.ack_durable, progress=progress, skip_consumed=False,
            on_log=metrics.observe_log if metrics is not None else None,
        )
    finally:
        stop_poll.set()
        if dispatcher is not None:
            dispatcher.stop()
    if dispatcher is not None:
        dispatcher.join_checked(timeout=30)
    if dispatching:
        stats = retrying(transport.stats, "trainer stats")
        if metrics is not None:
            metrics.observe_queue(stats)
        dead = retrying(lambda: transport.dead_letters(count=100_000), "dead letters")
        with (out / ("dead_letter.jsonl" if rank == 0 else f"dead_letter.rank{rank}.jsonl")).open("w") as f:
            for d in dead:
                f.write(json.dumps({"sample": d["sample_id"], "reason": f"{d['teacher']}: {d['reason']}"}) + "\n")
        if not retrying(transport.is_finished, "trainer stats"):
            log.warning("online run %r ended with samples still in flight: %s", transport.run, stats)
        log.info("online run %r done: %d steps, %d samples on rank 0, %d dead letters, %d redelivered and skipped, "
                 "%d answers rejected", transport.run, result.steps, result.samples, stats["dead_letters"],
                 feed.skipped, feed.rejected)
        check_dead_letters(stats, cfg.train.max_dead_letter_fraction, out)
    return result


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


def check_dead_letters(stats: dict, max_fraction: float, out: Path) -> None:
    """Raise :class:`RunFailed` when more than ``max_fraction`` of the run's samples were dead-lettered: a run
    that lost most of its data must not exit 0 (issue 15)."""
    submitted, dead = int(stats["submitted"]), int(stats["dead_letters"])
    if submitted and dead / submitted > max_fraction:
        raise RunFailed(
            f"{dead} of {submitted} samples ({dead / submitted:.0%}) were dead-lettered, more than "
            f"train.max_dead_letter_fraction={max_fraction}: see {out / 'dead_letter.jsonl'} for each reason"
        )


def _poll_queue(transport: Transport, metrics, stop: threading.Event, every_s: float = 2.0) -> None:
    while not stop.wait(every_s):
        try:
            metrics.observe_queue(transport.stats())
        except TransportUnavailable as e:  # an outage: the trainer's own retries report it
            log.debug("queue poll failed: %s", e)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from fuseflow.config import OnlineConfig, add_field_flags

    p = argparse.ArgumentParser(
        prog="fuseflow train",
        description="Online knowledge fusion: train the target on aligned top-k distributions that teacher "
        "services (`fuseflow teacher serve --redis`) stream through Redis. Rank 0 dispatches the corpus; "
        "run N ranks with the deepspeed or torchrun launcher (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). "
        "The flags below set the run config's `online` fields in brackets, as key=value overrides do.",
        epilog="example: fuseflow train examples/quickstart.yaml --redis redis://:PASSWORD@localhost:6379/0 "
        "train.max_steps=20",
    )
    p.add_argument("config", help="run config YAML (see examples/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-5 online.window=512")
    add_field_flags(p, OnlineConfig, "online", ["redis", "run", "window", "metrics_host", "metrics_port"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # The deepspeed launcher passes --local_rank to each rank (torchrun sets env LOCAL_RANK instead).
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """``fuseflow train …`` (also ``python -m fuseflow.trainer.online``), through the one CLI wrapper."""
    from fuseflow.cli import run_command

    return run_command("train", sys.argv[1:] if argv is None else argv)


def run(args: argparse.Namespace) -> int:
    from fuseflow.config import flag_values
    from fuseflow.wire.redis_streams import RedisTransport

    from .loop import init_distributed
    from .metrics import TrainerMetrics

    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    cfg = load_config(FuseConfig, args.config, args.overrides, flag_values(args))
    online = cfg.online
    url = online.redis_url()
    if not url:
        raise ConfigError("no Redis URL: pass --redis URL, set online.redis, or set env FUSEFLOW_REDIS_URL")
    rank, world = init_distributed()
    window = online.window if online.window is not None else default_window(cfg, world)
    teachers = [s.key for s in cfg.sources]
    metrics = None
    if rank == 0 and online.metrics_port:
        metrics = TrainerMetrics(teachers)
        port = metrics.start_http(online.metrics_port, online.metrics_host)
        log.info("trainer metrics on :%d/metrics", port)
    try:
        with RedisTransport(url, cfg.run_name(), teachers, window=window) as transport:
            result = run_online(cfg, transport, progress=not args.no_progress, metrics=metrics)
    finally:
        if metrics is not None:
            metrics.stop_http()
    if rank == 0:  # the report, plot and table of `fuseflow fuse`, by the same function (issue 15)
        from fuseflow.models import load_tokenizer

        from . import knowledge_fusion as kf

        corpus = kf.prepare_corpus(cfg, load_tokenizer(cfg.target.model))
        progress = not args.no_progress
        notes = [kf.ONLINE_BASELINE_NOTE] if cfg.baseline == "clm" else []
        kf.report_runs(cfg, corpus, {"fused": result}, kf.evaluate_before(cfg, corpus, progress), progress, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
