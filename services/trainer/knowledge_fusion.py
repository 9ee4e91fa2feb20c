"""``fuseflow fuse CONFIG``: knowledge fusion in one process (the embedded default).

A thin outer loop over the one recipe (:func:`fuseflow.trainer.online.run_online`, issue 13): load the target
and split the corpus → evaluate every source and the target → train the target on ``λ·CLM + (1−λ)·KL`` with
the recipe over an in-process transport, the teachers as worker threads (:func:`train_in_process`: the same
dispatcher, workers, dead letters and ready feed as ``fuseflow train --redis``) → optionally train a CLM-only
copy on the same samples (the baseline: the recipe without teachers) → evaluate → print the table, write
``report.json``, ``metrics.jsonl`` and ``loss.png`` into the run directory.

With ``pairwise: true`` (FuseChat, arXiv 2402.16107 §3.2) each source is fused *separately* into the
target (with the target's own distribution as the other candidate when the target is listed among the
sources), giving one fused copy of the target per source, ready for ``fuseflow merge``.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from fuseflow.config import FuseConfig, SourceConfig, dump_config
from fuseflow.corpus import CorpusTally, Rejected, corpus_samples, iter_documents, render_chat
from fuseflow.models import load, load_tokenizer
from fuseflow.sparse import Sample

from .evaluate import evaluate_lm, group_bpb
from .report import format_table, plot_loss

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    train: list[Sample]
    held_out: list[str]
    held_out_corpus: list[str] = field(default_factory=list)  # each held-out text's corpus ("" unless a mix)
    rejected: list[Rejected] = field(default_factory=list)  # documents set aside: the run dead-letters them
    empty: int = 0  # empty documents (no samples)


def prepare_corpus(cfg: FuseConfig, target_tokenizer) -> Corpus:
    """Split documents (held-out documents never reach training) and cut training samples to fit (a
    ``corpus.sources`` mix: samples interleaved by weight, held-out documents per corpus). Documents that cannot
    be read are set aside with their file and line (``rejected``), empty ones counted (issue 15)."""
    tally = CorpusTally()
    samples = corpus_samples(cfg.corpus, target_tokenizer, cfg.train.max_length, tally=tally)
    if cfg.train.max_steps:  # cut no more than the run can train on (a large corpus takes minutes to cut)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        samples = itertools.islice(samples, cfg.train.max_steps * cfg.train.micro_batch_size * cfg.train.grad_accum * world)
    samples = list(samples)
    # Held-out documents are drawn from those that can be read and are not empty (fuseflow.corpus.evaluable), so
    # held_out_documents: N evaluates N, and no tally: none is a training sample to dead-letter (issue 26).
    docs = list(iter_documents(cfg.corpus, "held_out"))
    held = [render_chat(d.messages, target_tokenizer, d.origin)[0] if d.is_chat else d.text for d in docs]
    held = [t[: cfg.eval.max_chars_per_document] for t in held]
    if tally.rejected or tally.empty:
        log.warning("corpus: %d documents set aside (dead-lettered), %d empty documents skipped%s",
                    len(tally.rejected), len(tally.empty),
                    f"; first set aside: {tally.rejected[0].reason}" if tally.rejected else "")
    if not samples:
        bad = f"; {len(tally.rejected)} documents set aside, first: {tally.rejected[0].reason}" if tally.rejected else ""
        raise ValueError(f"corpus: no training samples (check corpus.source and corpus.held_out_*){bad}")
    if not held:
        raise ValueError("corpus: no held-out documents to evaluate on (set corpus.held_out_documents)")
    return Corpus(train=samples, held_out=held, held_out_corpus=[d.corpus for d in docs], rejected=tally.rejected,
                  empty=len(tally.empty))


def build_teachers(cfg: FuseConfig, sources: Sequence[SourceConfig], target_tokenizer, stats_texts=None):
    """A :class:`~fuseflow.score.aligner.TeacherAligner` per source, on the engine the config describes, built
    as ``fuseflow teacher serve`` builds it (:func:`~fuseflow.score.engine.engine_from_source` with the serve
    section's defaults), so in-process teachers score as served ones. ``stats_texts``:
    the ``stats`` vocab map's texts (default: :func:`fuseflow.score.aligner.stats_texts`, as served teachers)."""
    from fuseflow.score.aligner import TeacherAligner
    from fuseflow.score.aligner import stats_texts as run_stats_texts
    from fuseflow.score.engine import engine_from_source

    if stats_texts is None and sources:
        stats_texts = run_stats_texts(cfg)
    return [TeacherAligner.for_run(cfg, src.key, engine_from_source(src, cfg.device, cfg.serve.engine_defaults()),
                                 target_tokenizer, stats_texts)
            for src in sources]


# Samples a teacher worker thread claims at once. The teachers' batches change the scores at fp32 rounding
# (packed rows of other lengths), so runs that must agree bit for bit use the same value.
WORKER_BATCH_SIZE = 8


def train_in_process(
    cfg: FuseConfig, out: Path, samples: Sequence[Sample] | None = None, progress: bool = True,
    worker_batch_size: int = WORKER_BATCH_SIZE, rejected: Sequence[Rejected] = (), tokenizer=None,
):
    """The recipe over :class:`~fuseflow.wire.inprocess.InProcessTransport`: ``cfg.sources`` scored by worker
    threads (:class:`fuseflow.teacher.worker.WorkerThreads`) while this thread dispatches and trains; no sources is
    the CLM-only baseline. Writes ``out`` (model, checkpoints, logs, dead letters); returns the ``TrainResult``.
    ``rejected``: the corpus documents set aside with ``samples`` (:class:`Corpus`), dead-lettered by the run.
    ``tokenizer``: the target's, loaded once by the caller (else here)."""
    from fuseflow.models import load_tokenizer
    from fuseflow.teacher.worker import WorkerThreads
    from fuseflow.wire.inprocess import InProcessTransport

    from .online import default_window, run_online

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.target.model)
    teachers = build_teachers(cfg, cfg.sources, tokenizer)
    transport = InProcessTransport("fuse", [t.name for t in teachers], window=default_window(cfg, 1))
    try:
        # A worker thread that dies (its engine fails on every sample) ends the run with its error at once.
        with WorkerThreads(teachers, lambda: transport, batch_size=worker_batch_size) as workers:
            return run_online(cfg, transport, out=out, samples=list(samples) if samples is not None else None,
                              progress=progress, check_teachers=workers.check, rejected=rejected, tokenizer=tokenizer)
    finally:
        del teachers
        gc.collect()


def total_steps(cfg: FuseConfig, n_samples: int, world: int = 1) -> int:
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * world
    steps = math.ceil(n_samples * cfg.train.epochs / per_step)
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def _eval(name: str, model_ref, cfg: FuseConfig, corpus: Corpus, progress: bool) -> dict:
    lm = load(model_ref, device=cfg.device)
    res = evaluate_lm(
        lm.model, lm.tokenizer, corpus.held_out, max_length=cfg.eval.max_length, batch_tokens=cfg.eval.batch_tokens,
        progress=progress,
    )
    del lm
    gc.collect()
    text_nll, text_bytes = res.pop("text_nll"), res.pop("text_bytes")
    if any(corpus.held_out_corpus):  # a mix: held-out bits/byte per corpus too (issue 11)
        res["per_corpus"] = group_bpb(text_nll, text_bytes, corpus.held_out_corpus)
    return {"model": name, **res}


def run_fuse(cfg: FuseConfig, progress: bool = True) -> dict:
    """Run the whole recipe; returns the report (also written to ``run_dir/report.json``)."""
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    target_tok = load_tokenizer(cfg.target.model)
    corpus = prepare_corpus(cfg, target_tok)
    log.info("corpus: %d training samples, %d held-out documents", len(corpus.train), len(corpus.held_out))

    rows_before = evaluate_before(cfg, corpus, progress)

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
    runs = {name: train_in_process(cfg.model_copy(update={"sources": sources}), out, corpus.train, progress,
                                   rejected=corpus.rejected, tokenizer=target_tok)
            for name, (sources, out) in plan.items()}

    return report_runs(cfg, corpus, runs, rows_before, progress)


def evaluate_before(cfg: FuseConfig, corpus: Corpus, progress: bool = True) -> list[dict]:
    """The rows of the models a run starts from (``eval.before``): every source, then the target."""
    rows: list[dict] = []
    if cfg.eval.before:
        for src in cfg.sources:
            rows.append(_eval(f"source {src.key}", src.model, cfg, corpus, progress))
        rows.append(_eval("target before", cfg.target.model, cfg, corpus, progress))
    return rows


def report_runs(cfg: FuseConfig, corpus: Corpus, runs: dict, rows_before: Sequence[dict] = (),
                progress: bool = True, notes: Sequence[str] = ()) -> dict:
    """Evaluate each trained run (``{name: TrainResult}``) on the held-out documents and report them after
    ``rows_before`` (:func:`evaluate_before`): ``run_dir/report.json``, ``run_dir/loss.png`` and the table on
    stdout. The one report of ``fuseflow fuse`` and of the online trainer, ``fuseflow train`` (issue 15).
    ``notes``: what the table leaves out and why, printed under it and kept in the report."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = list(rows_before)
    for name, res in runs.items():
        rows.append({**_eval(f"target {name}", res.model_dir, cfg, corpus, progress), "train_tokens": res.tokens,
                     "train_seconds": round(res.seconds, 1)})
    report = {
        "config": json.loads(json.dumps(cfg.model_dump(mode="json"))),
        "train_samples": len(corpus.train),
        "held_out_documents": len(corpus.held_out),
        "rejected_documents": len(corpus.rejected),
        "empty_documents": corpus.empty,
        "rows": rows,
        "runs": {name: {"model_dir": str(r.model_dir), "steps": r.steps, "tokens": r.tokens,
                        "final_loss": r.final_loss, "teachers": r.teachers} for name, r in runs.items()},
        "notes": list(notes),
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    plot_loss({name: Path(r.model_dir).parent / "metrics.jsonl" for name, r in runs.items()}, run_dir / "loss.png")
    print(format_table(rows))
    for note in notes:
        print(f"note: {note}")
    return report


# `fuseflow train` (and so `fuseflow stack up`) trains the fused target only; said where its table is printed
# instead of dropping the config's row silently (issue 26).
ONLINE_BASELINE_NOTE = ("baseline: clm is not trained by the online trainer (fuseflow train, fuseflow stack up), so "
                        "the table has no 'target baseline clm' row: run `fuseflow fuse RUN.yaml` for it (the same "
                        "samples, in one process), or set baseline: none")


def evaluate_models(cfg: FuseConfig, models: dict[str, str], progress: bool = True) -> list[dict]:
    """``fuseflow evaluate``: the table of :func:`run_fuse` for any models (pivot, pairwise, merged …) on the
    run config's held-out documents."""
    corpus = prepare_corpus(cfg, load_tokenizer(cfg.target.model))
    rows = [_eval(name, ref, cfg, corpus, progress) for name, ref in models.items()]
    print(format_table(rows))
    return rows


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
