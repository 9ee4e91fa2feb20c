"""The run's corpus on the trainer side: training samples (each with its target encoding, made once by the cut)
and held-out documents, split by document so that no held-out document is ever trained on (DESIGN.md, "Corpus")."""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field

from fuseflow.config import FuseConfig
from fuseflow.corpus import CorpusTally, Rejected, corpus_samples, iter_documents, render_chat
from fuseflow.sparse import Sample

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
        samples = itertools.islice(samples, cfg.train.max_steps * cfg.train.samples_per_step(world))
    samples = list(samples)
    if tally.rejected or tally.empty:
        log.warning("corpus: %d documents set aside (dead-lettered), %d empty documents skipped%s",
                    len(tally.rejected), len(tally.empty),
                    f"; first set aside: {tally.rejected[0].reason}" if tally.rejected else "")
    if not samples:
        bad = f"; {len(tally.rejected)} documents set aside, first: {tally.rejected[0].reason}" if tally.rejected else ""
        raise ValueError(f"corpus: no training samples (check corpus.source and corpus.held_out_*){bad}")
    held, held_corpus = held_out_documents(cfg, target_tokenizer)
    return Corpus(train=samples, held_out=held, held_out_corpus=held_corpus, rejected=tally.rejected,
                  empty=len(tally.empty))


def held_out_documents(cfg: FuseConfig, target_tokenizer) -> tuple[list[str], list[str]]:
    """The held-out texts (a chat rendered with the target's template, cut to ``eval.max_chars_per_document``)
    and each one's corpus, without cutting the training part (``fuseflow evaluate`` needs no more). Drawn from
    documents that can be read and are not empty (:func:`fuseflow.corpus.evaluable`), so ``held_out_documents:
    N`` evaluates N; no tally: none is a training sample to dead-letter (issue 26)."""
    docs = list(iter_documents(cfg.corpus, "held_out"))
    held = [render_chat(d.messages, target_tokenizer, d.origin)[0] if d.is_chat else d.text for d in docs]
    held = [t[: cfg.eval.max_chars_per_document] for t in held]
    if not held:
        raise ValueError("corpus: no held-out documents to evaluate on (set corpus.held_out_documents)")
    return held, [d.corpus for d in docs]
