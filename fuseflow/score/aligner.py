"""Teacher side of knowledge fusion: score samples with a source engine and align the result to the
target's positions and vocabulary (DESIGN.md: alignment runs where the teacher runs; the trainer never
sees a source vocabulary).

The same object serves the in-process pipeline and the Redis worker; it knows nothing of transports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from fuseflow.align.project import align_scored
from fuseflow.align.vocab import build_vocab_map, token_strings
from fuseflow.models import encode
from fuseflow.sparse import AlignedDist, Sample

log = logging.getLogger(__name__)


@dataclass
class AlignedResult:
    sample: Sample
    dist: AlignedDist | None
    error: str | None = None


def stats_texts(cfg) -> list[str] | None:
    """The texts the ``stats`` vocab map counts (None for the other maps): the first ``align.stats_documents``
    training documents, a chat's messages joined by newlines. One definition for ``fuseflow fuse`` and served
    teachers, so both build the same map (they used sample texts in one, document texts in the other; issue 13)."""
    if cfg.align.vocab_map != "stats":
        return None
    from itertools import islice

    from fuseflow.corpus import iter_documents

    texts = ("\n".join(m["content"] for m in d.messages) if d.is_chat else d.text
             for d in iter_documents(cfg.corpus, "train"))
    return list(islice((t for t in texts if t), cfg.align.stats_documents))


class TeacherAligner:
    """``engine`` (a :class:`fuseflow.score.engine.Engine`) → aligned distributions for target tokens."""

    @classmethod
    def for_run(cls, cfg, name: str, engine, target_tokenizer, texts: Sequence[str] | None = None) -> "TeacherAligner":
        """Teacher ``name`` of run config ``cfg`` (a ``FuseConfig``): its align and fusion settings, the
        ``stats`` texts of :func:`stats_texts` (pass ``texts`` to reuse them across teachers). The fusion
        temperature is applied once, in the trainer's loss, so the teacher scores at temperature 1."""
        return cls(
            name, engine, target_tokenizer, vocab_map_method=cfg.align.vocab_map, sequence_method=cfg.align.sequence,
            top_k=cfg.fusion.top_k, temperature=1.0, stats_texts=texts if texts is not None else stats_texts(cfg),
        )

    def __init__(
        self,
        name: str,
        engine,
        target_tokenizer,
        vocab_map_method: str = "mined",
        sequence_method: str = "offsets",
        top_k: int = 10,
        temperature: float = 1.0,
        stats_texts: Sequence[str] | None = None,
    ):
        self.name = name
        self.engine = engine
        self.target_tokenizer = target_tokenizer
        self.sequence_method = sequence_method
        self.top_k = top_k
        self.temperature = temperature
        self.vocab_map = build_vocab_map(vocab_map_method, engine.tokenizer, target_tokenizer, texts=stats_texts)
        # Token strings are needed only by string-based sequence alignment.
        self._src_strings = token_strings(engine.tokenizer) if sequence_method == "mined-dp" else None
        self._tgt_strings = token_strings(target_tokenizer) if sequence_method == "mined-dp" else None

    def run(self, samples: Sequence[Sample]) -> list[AlignedResult]:
        """Score and align ``samples``; a sample that fails is returned with ``error`` set, never raised."""
        texts_ok: list[int] = []
        results: list[AlignedResult | None] = [None] * len(samples)
        for i, s in enumerate(samples):
            if not s.text.strip():
                results[i] = AlignedResult(s, None, "empty text")
            elif self.engine.max_length and len(s.text) > 64 * self.engine.max_length:
                results[i] = AlignedResult(s, None, f"text of {len(s.text)} characters is far beyond max_length")
            else:
                texts_ok.append(i)
        scored = self._score([samples[i] for i in texts_ok])
        for i, sc in zip(texts_ok, scored):
            s = samples[i]
            if isinstance(sc, str):
                results[i] = AlignedResult(s, None, sc)
                continue
            try:
                results[i] = AlignedResult(s, self._align(s, sc))
            except (ValueError, IndexError) as e:
                results[i] = AlignedResult(s, None, f"alignment failed: {e}")
        return results  # type: ignore[return-value]

    def _score(self, samples: Sequence[Sample]) -> list:
        if not samples:
            return []
        texts = [s.text for s in samples]
        try:
            return self.engine.score_texts(texts, top_k=self.top_k, temperature=self.temperature)
        except ValueError:
            if len(samples) == 1:
                raise
        # One bad text fails the whole batch: retry one by one so only the bad sample is dead-lettered.
        out: list = []
        for s in samples:
            try:
                out.append(self.engine.score_texts([s.text], top_k=self.top_k, temperature=self.temperature)[0])
            except ValueError as e:
                out.append(str(e))
        return out

    def _align(self, sample: Sample, scored) -> AlignedDist:
        tgt = encode(self.target_tokenizer, sample.text)
        tgt_tokens = [self._tgt_strings[i] for i in tgt.ids] if self._tgt_strings is not None else None
        if scored.tokens is None and self._src_strings is not None:
            scored.tokens = [self._src_strings[i] for i in scored.token_ids]
        dist = align_scored(
            scored,
            target_ids=tgt.ids,
            target_offsets=tgt.offsets,
            target_tokens=tgt_tokens,
            vocab_map=self.vocab_map,
            method=self.sequence_method,
            k=self.top_k,
        )
        dist.meta.update(teacher=self.name, source_tokens=int(len(scored.token_ids)), nll=scored.nll)
        return dist


def aligned_fraction(dists: Sequence[AlignedDist]) -> float:
    n = sum(d.num_positions for d in dists)
    return float(sum(int(d.aligned.sum()) for d in dists) / n) if n else 0.0

