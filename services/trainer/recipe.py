"""The knowledge-fusion recipe (FuseLLM, arXiv 2401.10491; DESIGN.md, "Data flow" and "Trainer"), read top to bottom:

    corpus → dispatch → teachers → ready feed → train step → checkpoint → report

:func:`run` is the one recipe, over any :class:`~fuseflow.wire.transport.Transport`: teachers on its other side
stream aligned top-k distributions in (no logits cache is ever written). Three commands run it:

- ``fuseflow fuse`` (:func:`fuse`): in one process, the teachers as worker threads on the in-process transport
  (:func:`train_in_process`); each run of the config (the fused target, FuseChat's pairwise copies, the CLM
  baseline: the recipe without teachers) on the same samples, then one report;
- ``fuseflow finetune`` (:func:`finetune`): the recipe with no teachers, CLM only: how an expert is made;
- ``fuseflow train`` (:func:`train_over_redis`): the same recipe over Redis, the teachers ``fuseflow teacher serve
  --redis`` processes, on N DeepSpeed ranks; rank 0 reports.

Each stage is a small part of its own module; this file only composes them: :mod:`.data` (the corpus),
:mod:`.dispatcher` (the samples to the teachers, in order, through a bounded window), :mod:`.teachers` (the
in-process teachers), :mod:`.ready` (the ready feed: the trust boundary and the lockstep of ranks), :mod:`.loop`
(the DeepSpeed train step and checkpoints), :mod:`.report` (evaluation, table, dead letters).

Restarts: a run directory with a checkpoint resumes; the transport hands each rank the samples it had read but
not acked, those the checkpoint already covers are acked without training again, and the dispatcher resumes
at its recorded position, so every sample is trained exactly once. A run directory without a checkpoint starts
the run afresh: its keys in Redis are reset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from fuseflow.config import ConfigError, FuseConfig, SourceConfig, dump_config
from fuseflow.wire.transport import Transport

from .data import Corpus, prepare_corpus
from .dispatcher import new_dispatcher, share_corpus
from .loop import TrainResult, init_distributed, seed_everything, train, trained_ids_path
from .ready import ReadyFeed, check_transport, result_check
from .report import (ONLINE_BASELINE_NOTE, check_dead_letters, evaluate_before, report_runs,
                     write_dead_letters)
from .teachers import WORKER_BATCH_SIZE, in_process_teachers

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# The commands: `fuseflow fuse` and `fuseflow train`.
# ----------------------------------------------------------------------------------------------------------


def fuse(cfg: FuseConfig, progress: bool = True) -> dict:
    """``fuseflow fuse``: cut the corpus once, evaluate the sources and the target, train every run of the config
    in this process, evaluate and report; returns the report (also ``run_dir/report.json``).

    With ``pairwise: true`` (FuseChat, arXiv 2402.16107 §3.2) each source is fused *separately* into the target
    (with the target's own distribution as the other candidate when the target is listed among the sources):
    one fused copy of the target per source, ready for ``fuseflow merge``."""
    run_dir = Path(cfg.run_dir)
    # Each run is the recipe on a config whose sources are that run's teachers (model_copy: not re-validated,
    # so the baseline's empty list is allowed).
    plan: dict[str, tuple[list[SourceConfig], Path]] = {}
    if cfg.pairwise:
        pivots = [s for s in cfg.sources if s.model == cfg.target.model]
        for src in (s for s in cfg.sources if s.model != cfg.target.model):
            plan[f"pairwise {src.key}"] = ([src, *pivots], run_dir / "pairwise" / _slug(src.key))
    else:
        plan["fused"] = (list(cfg.sources), run_dir / "fused")
    if cfg.baseline == "clm":
        plan["baseline clm"] = ([], run_dir / "baseline-clm")
    return _run_in_process(cfg, plan, progress)


def finetune(cfg: FuseConfig, progress: bool = True) -> dict:
    """``fuseflow finetune``: the recipe with no teachers — CLM on the corpus, the target written as an HF directory
    (``run_dir/finetuned/model``), evaluated before and after on the held-out documents; returns the report (also
    ``run_dir/report.json``). How an expert for fusion is made (issue 22): the same corpus, train loop,
    checkpoints and resume as ``fuseflow fuse``, so there is no second trainer. The config's sources are not used."""
    if cfg.sources:
        log.info("finetune: the config's %d sources are not used (CLM on the text alone)", len(cfg.sources))
    cfg = cfg.model_copy(update={"sources": [], "baseline": "none", "pairwise": False})
    report = _run_in_process(cfg, {"finetuned": ([], Path(cfg.run_dir) / "finetuned")}, progress)
    log.info("finetuned model: %s", report["runs"]["finetuned"]["model_dir"])
    return report


def _run_in_process(cfg: FuseConfig, plan: dict[str, tuple[list[SourceConfig], Path]], progress: bool) -> dict:
    """What ``fuse`` and ``finetune`` share: cut the corpus once, evaluate the models the runs start from, train
    each run of ``plan`` (name → (its teachers, its output folder)) in this process on the same samples, and
    report them all."""
    from fuseflow.models import load_tokenizer

    seed_everything(cfg.seed)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    tokenizer = load_tokenizer(cfg.target.model)  # the target's, loaded once for every run
    corpus = prepare_corpus(cfg, tokenizer)
    log.info("corpus: %d training samples, %d held-out documents", len(corpus.train), len(corpus.held_out))
    rows_before = evaluate_before(cfg, corpus, progress)
    runs = {name: train_in_process(cfg.model_copy(update={"sources": sources}), out, corpus, progress,
                                   tokenizer=tokenizer)
            for name, (sources, out) in plan.items()}
    return report_runs(cfg, corpus, runs, rows_before, progress)


def train_over_redis(cfg: FuseConfig, progress: bool = True) -> TrainResult:
    """``fuseflow train``: this rank of the recipe over Redis (``online.redis``), the teachers served by ``fuseflow
    teacher serve --redis``; rank 0 cuts the corpus, exports the trainer's metrics (``online.metrics_port``) and
    writes the report of ``fuseflow fuse`` for the fused run (no CLM baseline here: said in a note)."""
    from fuseflow.models import load_tokenizer
    from fuseflow.wire.redis_streams import RedisTransport

    from .metrics import TrainerMetrics

    url = cfg.online.redis_url()
    if not url:
        raise ConfigError("no Redis URL: pass --redis URL, set online.redis, or set env FUSEFLOW_REDIS_URL")
    rank, world = init_distributed()
    window = cfg.online.window if cfg.online.window is not None else cfg.train.default_window(world)
    teachers = [s.key for s in cfg.sources]
    tokenizer = load_tokenizer(cfg.target.model) if rank == 0 else None
    cut: list[Corpus] = []  # rank 0's corpus: the training samples, and the report's held-out documents

    def prepare() -> Corpus:
        cut.append(prepare_corpus(cfg, tokenizer))
        return cut[0]

    metrics = None
    if rank == 0 and cfg.online.metrics_port:
        metrics = TrainerMetrics(teachers)
        port = metrics.start_http(cfg.online.metrics_port, cfg.online.metrics_host)
        log.info("trainer metrics on :%d/metrics", port)
    try:
        with RedisTransport(url, cfg.run_name(), teachers, window=window) as transport:
            result = run(cfg, transport, corpus=prepare, tokenizer=tokenizer, progress=progress, metrics=metrics)
    finally:
        if metrics is not None:
            metrics.stop_http()
    if rank == 0:  # the report, plot and table of `fuseflow fuse`, by the same function (issue 15)
        notes = [ONLINE_BASELINE_NOTE] if cfg.baseline == "clm" else []
        report_runs(cfg, cut[0], {"fused": result}, evaluate_before(cfg, cut[0], progress), progress, notes)
    return result


def train_in_process(cfg: FuseConfig, out: Path, corpus: Corpus | None = None, progress: bool = True,
                     worker_batch_size: int = WORKER_BATCH_SIZE, tokenizer=None) -> TrainResult:
    """One run of ``fuseflow fuse``: the recipe over the in-process transport, ``cfg.sources`` scored by worker
    threads while this thread dispatches and trains (no sources: the CLM-only baseline). Writes ``out`` (model,
    checkpoints, logs, dead letters). ``corpus``/``tokenizer``: cut and loaded by the caller, once for every run."""
    from fuseflow.models import load_tokenizer

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.target.model)
    with in_process_teachers(cfg, tokenizer, cfg.train.default_window(1), worker_batch_size) as (transport, check):
        return run(cfg, transport, out=out, corpus=corpus, tokenizer=tokenizer, progress=progress,
                   check_teachers=check)


# ----------------------------------------------------------------------------------------------------------
# The recipe.
# ----------------------------------------------------------------------------------------------------------


def run(
    cfg: FuseConfig,
    transport: Transport,
    *,
    out: Path | None = None,
    corpus: Corpus | Callable[[], Corpus] | None = None,
    tokenizer=None,
    progress: bool = True,
    metrics=None,
    poll_ms: int = 100,
    check_teachers: Callable[[], None] | None = None,
) -> TrainResult:
    """Dispatch the corpus into ``transport`` and train ``cfg.target`` on its ready samples until the epoch ends;
    returns the loop's :class:`~fuseflow.trainer.loop.TrainResult`. ``cfg.sources`` are the transport's teachers.

    ``out``: the run's output folder (default ``run_dir/fused``). ``corpus``: cut by the caller, or a function that
    cuts it, called on the dispatching rank where a failure is told to the other ranks (default: cut here); a
    ``per_process`` transport (in-process) serves one rank, which dispatches its own shard. ``tokenizer``: the target's, loaded by the caller. ``metrics``: a
    :class:`~fuseflow.trainer.metrics.TrainerMetrics` (rank 0) or None. ``check_teachers``: called while the
    trainer waits for samples, raises to end the run (in-process teachers: the error a worker thread died of;
    served teachers are replaced by their supervisor instead, their pending work reclaimed)."""
    import torch.distributed as dist

    from fuseflow.models import load

    from .metrics import poll_queue

    rank, world = init_distributed()
    check_transport(cfg, transport, world)
    out = Path(out) if out is not None else Path(cfg.run_dir) / "fused"
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)  # before anything new is initialised
    target = load(cfg.target.model, device=cfg.device, attn_implementation=cfg.target.attn_implementation,
                  tokenizer=tokenizer)
    teachers = [s.key for s in cfg.sources]
    dispatching = transport.per_process or rank == 0  # an in-process transport: every rank its own pipeline
    fresh = not (out / "checkpoints" / "latest").exists()

    # 1. Corpus: the dispatching rank has it cut; every rank learns how many samples (hence steps) there are.
    given = corpus
    prepare = given if callable(given) else lambda: given if given is not None else prepare_corpus(cfg, target.tokenizer)
    corpus, n_samples = share_corpus(transport, out, prepare, fresh=fresh, dispatching=dispatching,
                                     broadcast=world > 1 and not transport.per_process)
    steps = cfg.train.total_steps(n_samples, world)

    # 2. Dispatch: the samples go to the teachers in order, through the transport's bounded window.
    dispatcher = None
    if dispatching:
        dispatcher = new_dispatcher(transport, corpus.train, corpus.rejected, cfg.train, steps, fresh=fresh,
                                    rank=rank, world=world)
    if world > 1:
        dist.barrier()  # nobody reads the queue before rank 0 has reset it
    if dispatcher is not None:
        dispatcher.start()

    # 3. Teachers answer on the other side of the transport. 4. The ready feed checks their answers and yields
    # micro-batches in lockstep with the other ranks.
    stop_poll = poll_queue(transport, metrics) if metrics is not None else None
    feed = ReadyFeed(
        transport, f"rank{rank}", cfg.train.micro_batch_size, cfg.train.grad_accum,
        trained_ids_path(out, rank, world), poll_ms=poll_ms,
        on_batch=metrics.observe_batch if metrics is not None else None,
        check=result_check(target.model, target.tokenizer, teachers),
        redispatch=cfg.train.rejected_results == "redispatch", check_teachers=check_teachers,
        tokenizer=target.tokenizer,
    )

    # 5. Train steps and 6. checkpoints: a sample is acked once the checkpoint that covers it is written.
    try:
        result = train(
            target.model, target.tokenizer, feed,
            teachers=teachers, train_cfg=cfg.train, fusion_cfg=cfg.fusion, total_steps=steps, run_dir=out,
            seed=cfg.seed, on_durable=feed.ack_durable, progress=progress, skip_consumed=False,
            on_log=metrics.observe_log if metrics is not None else None,
        )
    finally:
        if stop_poll is not None:
            stop_poll.set()
        if dispatcher is not None:
            dispatcher.stop()
    if dispatcher is not None:
        dispatcher.join_checked(timeout=30)

    # 7. The run's dead letters (the evaluation and table are the commands' report).
    if dispatching:
        stats = write_dead_letters(transport, out, rank, metrics)
        log.info("online run %r done: %d steps, %d samples on rank 0, %d dead letters, %d redelivered and skipped, "
                 "%d answers rejected", transport.run, result.steps, result.samples, stats["dead_letters"],
                 feed.skipped, feed.rejected)
        check_dead_letters(stats, cfg.train.max_dead_letter_fraction, out)
    return result


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
