"""The teachers of a run in this process (``fuseflow fuse``): an aligner per source on the engine the config
describes, scored by worker threads on the in-process transport, the same workers and transport contract as
``fuseflow teacher serve --redis`` processes (DESIGN.md: "no second pipeline that could drift")."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence

from fuseflow.config import FuseConfig, SourceConfig

# Samples a teacher worker thread claims at once. The teachers' batches change the scores at fp32 rounding
# (packed rows of other lengths), so runs that must agree bit for bit use the same value.
WORKER_BATCH_SIZE = 8


def build_teachers(cfg: FuseConfig, sources: Sequence[SourceConfig], target_tokenizer, stats_texts=None):
    """A :class:`~fuseflow.score.aligner.TeacherAligner` per source, on the engine the config describes, built
    as ``fuseflow teacher serve`` builds it (:func:`~fuseflow.score.engine.engine_from_source` with the serve
    section's defaults), so in-process teachers score as served ones. The engines first, then the aligners over
    them, all with the same ``stats`` vocab map texts, read once for every source (``stats_texts``, default
    :func:`fuseflow.score.aligner.stats_texts`, as served teachers)."""
    from fuseflow.score.aligner import TeacherAligner
    from fuseflow.score.aligner import stats_texts as run_stats_texts
    from fuseflow.score.engine import engine_from_source

    engines = [engine_from_source(src, cfg.device, cfg.serve.engine_defaults()) for src in sources]
    if stats_texts is None and sources:
        stats_texts = run_stats_texts(cfg)
    return [TeacherAligner.for_run(cfg, src.key, engine, target_tokenizer, stats_texts)
            for src, engine in zip(sources, engines)]


@contextlib.contextmanager
def in_process_teachers(cfg: FuseConfig, target_tokenizer, window: int, worker_batch_size: int = WORKER_BATCH_SIZE,
                        teachers: Sequence | None = None) -> Iterator[tuple]:
    """``(transport, check)``: an :class:`~fuseflow.wire.inprocess.InProcessTransport` whose teachers are
    ``cfg.sources`` (none: the CLM-only baseline), each answered by a worker thread
    (:class:`fuseflow.teacher.worker.WorkerThreads`) while the caller trains; ``check`` raises the error a worker
    thread died of (an engine failing on every sample ends the run at once). ``teachers``: aligners built
    already (default :func:`build_teachers`). The engines are freed on exit."""
    from fuseflow.teacher.worker import WorkerThreads
    from fuseflow.wire.inprocess import InProcessTransport

    teachers = list(teachers) if teachers is not None else build_teachers(cfg, cfg.sources, target_tokenizer)
    transport = InProcessTransport("fuse", [t.name for t in teachers], window=window)
    try:
        with WorkerThreads(teachers, lambda: transport, batch_size=worker_batch_size) as workers:
            yield transport, workers.check
    finally:
        del teachers
        gc.collect()
