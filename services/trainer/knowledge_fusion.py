"""``fuseflow fuse CONFIG``: knowledge fusion in one process (the embedded default).

The recipe, top to bottom: load the target and split the corpus → evaluate every source and the target →
score + align with every teacher (in process) and train the target on ``λ·CLM + (1−λ)·KL`` → optionally
train a CLM-only copy on the same samples (the baseline) → evaluate → print the table, write
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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from fuseflow.config import FuseConfig, SourceConfig, dump_config
from fuseflow.corpus import iter_documents, make_samples, render_chat
from fuseflow.models import load, load_tokenizer
from fuseflow.sparse import Sample

from .evaluate import evaluate_lm
from .loop import ReadyGroup, train
from .report import format_table, plot_loss

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    train: list[Sample]
    held_out: list[str]


def prepare_corpus(cfg: FuseConfig, target_tokenizer) -> Corpus:
    """Split documents (held-out documents never reach training) and cut training samples to fit."""
    samples = list(make_samples(iter_documents(cfg.corpus, "train"), target_tokenizer, cfg.train.max_length))
    held = [
        render_chat(d.messages, target_tokenizer, d.origin)[0] if d.is_chat else d.text
        for d in iter_documents(cfg.corpus, "held_out")
    ]
    held = [t[: cfg.eval.max_chars_per_document] for t in held]
    if not samples:
        raise ValueError("corpus: no training samples (check corpus.source and corpus.held_out_*)")
    if not held:
        raise ValueError("corpus: no held-out documents to evaluate on (set corpus.held_out_documents)")
    return Corpus(train=samples, held_out=held)


def build_teachers(cfg: FuseConfig, sources: Sequence[SourceConfig], target_tokenizer, stats_texts):
    from fuseflow.score.aligner import TeacherAligner
    from fuseflow.score.engine import engine_from_source

    teachers = []
    for src in sources:
        engine = engine_from_source(src, cfg.device)
        teachers.append(
            TeacherAligner(
                src.key,
                engine,
                target_tokenizer,
                vocab_map_method=cfg.align.vocab_map,
                sequence_method=cfg.align.sequence,
                top_k=cfg.fusion.top_k,
                temperature=1.0,  # the fusion temperature is applied once, in the loss
                stats_texts=stats_texts,
            )
        )
    return teachers


def ready_groups(
    samples: Sequence[Sample], teachers, micro_batch: int, dead_letter: Path, rank: int = 0, world: int = 1
) -> Iterator[ReadyGroup]:
    """In-process transport: score each micro-batch with every teacher, in order; failures dead-lettered."""
    mine = samples[rank::world]
    for start in range(0, len(mine), micro_batch):
        chunk = mine[start : start + micro_batch]
        per_sample: list[dict] = [{} for _ in chunk]
        failed: dict[int, str] = {}
        for t in teachers:
            for i, res in enumerate(t.run(chunk)):
                if res.error is not None:
                    failed.setdefault(i, f"{t.name}: {res.error}")
                else:
                    per_sample[i][t.name] = res.dist
        if failed:
            with dead_letter.open("a") as f:
                for i, reason in failed.items():
                    f.write(json.dumps({"sample": chunk[i].id, "reason": reason}) + "\n")
                    log.warning("sample %s dead-lettered: %s", chunk[i].id, reason)
        group = [(s, d) for i, (s, d) in enumerate(zip(chunk, per_sample)) if i not in failed]
        if group:
            yield group


def clm_groups(samples: Sequence[Sample], micro_batch: int, rank: int = 0, world: int = 1) -> Iterator[ReadyGroup]:
    mine = samples[rank::world]
    for start in range(0, len(mine), micro_batch):
        yield [(s, None) for s in mine[start : start + micro_batch]]


def total_steps(cfg: FuseConfig, n_samples: int, world: int = 1) -> int:
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * world
    steps = math.ceil(n_samples * cfg.train.epochs / per_step)
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def _eval(name: str, model_ref, cfg: FuseConfig, texts: list[str], progress: bool) -> dict:
    lm = load(model_ref, device=cfg.device)
    res = evaluate_lm(
        lm.model, lm.tokenizer, texts, max_length=cfg.eval.max_length, batch_tokens=cfg.eval.batch_tokens, progress=progress
    )
    del lm
    gc.collect()
    return {"model": name, **res}


def _train_target(cfg: FuseConfig, corpus: Corpus, out: Path, teachers, progress: bool):
    from .loop import init_distributed

    rank, world = init_distributed()
    target = load(cfg.target.model, device=cfg.device, attn_implementation=cfg.target.attn_implementation)
    steps = total_steps(cfg, len(corpus.train), world)
    epochs = [corpus.train] * cfg.train.epochs
    stream = itertools.chain.from_iterable(
        ready_groups(ep, teachers, cfg.train.micro_batch_size, out / "dead_letter.jsonl", rank, world)
        if teachers
        else clm_groups(ep, cfg.train.micro_batch_size, rank, world)
        for ep in epochs
    )
    out.mkdir(parents=True, exist_ok=True)
    result = train(
        target.model,
        target.tokenizer,
        stream,
        teachers=[t.name for t in teachers],
        train_cfg=cfg.train,
        fusion_cfg=cfg.fusion,
        total_steps=steps,
        run_dir=out,
        progress=progress,
    )
    del target
    gc.collect()
    return result


def run_fuse(cfg: FuseConfig, progress: bool = True) -> dict:
    """Run the whole recipe; returns the report (also written to ``run_dir/report.json``)."""
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    target_tok = load_tokenizer(cfg.target.model)
    corpus = prepare_corpus(cfg, target_tok)
    log.info("corpus: %d training samples, %d held-out documents", len(corpus.train), len(corpus.held_out))

    rows: list[dict] = []
    if cfg.eval.before:
        for src in cfg.sources:
            rows.append(_eval(f"source {src.key}", src.model, cfg, corpus.held_out, progress))
        rows.append(_eval("target before", cfg.target.model, cfg, corpus.held_out, progress))

    stats_texts = [s.text for s in corpus.train[: cfg.align.stats_documents]] if cfg.align.vocab_map == "stats" else None
    runs: dict[str, object] = {}
    if cfg.pairwise:
        pivots = [s for s in cfg.sources if s.model == cfg.target.model]
        others = [s for s in cfg.sources if s.model != cfg.target.model]
        for src in others:
            teachers = build_teachers(cfg, [src, *pivots], target_tok, stats_texts)
            runs[f"pairwise {src.key}"] = _train_target(cfg, corpus, run_dir / "pairwise" / _slug(src.key), teachers, progress)
            del teachers
            gc.collect()
    else:
        teachers = build_teachers(cfg, cfg.sources, target_tok, stats_texts)
        runs["fused"] = _train_target(cfg, corpus, run_dir / "fused", teachers, progress)
        del teachers
        gc.collect()
    if cfg.baseline == "clm":
        runs["baseline clm"] = _train_target(cfg, corpus, run_dir / "baseline-clm", [], progress)

    for name, res in runs.items():
        rows.append({**_eval(f"target {name}", res.model_dir, cfg, corpus.held_out, progress), "train_tokens": res.tokens,
                     "train_seconds": round(res.seconds, 1)})
    report = {
        "config": json.loads(json.dumps(cfg.model_dump(mode="json"))),
        "train_samples": len(corpus.train),
        "held_out_documents": len(corpus.held_out),
        "rows": rows,
        "runs": {name: {"model_dir": str(r.model_dir), "steps": r.steps, "tokens": r.tokens,
                        "final_loss": r.final_loss} for name, r in runs.items()},
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    plot_loss({name: r.model_dir.parent / "metrics.jsonl" for name, r in runs.items()}, run_dir / "loss.png")
    print(format_table(rows))
    return report


def evaluate_models(cfg: FuseConfig, models: dict[str, str], progress: bool = True) -> list[dict]:
    """``fuseflow evaluate``: the table of :func:`run_fuse` for any models (pivot, pairwise, merged …) on the
    run config's held-out documents."""
    corpus = prepare_corpus(cfg, load_tokenizer(cfg.target.model))
    rows = [_eval(name, ref, cfg, corpus.held_out, progress) for name, ref in models.items()]
    print(format_table(rows))
    return rows


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
