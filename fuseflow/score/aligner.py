"""Teacher side of knowledge fusion: score samples with a source engine and align the result to the
target's positions and vocabulary (DESIGN.md: alignment runs where the teacher runs; the trainer never
sees a source vocabulary).

The same object serves the in-process pipeline and the Redis worker; it knows nothing of transports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from fuseflow.align.project import align_scored
from fuseflow.align.tokens import vocab_info
from fuseflow.align.vocab import build_vocab_map, target_splits, token_strings
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
        ``stats`` texts of :func:`stats_texts` (pass ``texts`` to reuse them across teachers; read here only for
        the ``stats`` map, the one that counts them). The fusion temperature is applied once, in the trainer's
        loss, so the teacher scores at temperature 1."""
        if texts is None and cfg.align.vocab_map == "stats":
            texts = stats_texts(cfg)
        return cls(
            name, engine, target_tokenizer, vocab_map_method=cfg.align.vocab_map, sequence_method=cfg.align.sequence,
            top_k=cfg.fusion.top_k, temperature=1.0, stats_texts=texts, chain_rule=cfg.align.chain_rule,
            score_top_k=cfg.align.score_top_k,
        )

    def __init__(
        self,
        name: str,
        engine,
        target_tokenizer,
        vocab_map_method: str = "first-token",
        sequence_method: str = "offsets",
        top_k: int = 10,
        temperature: float = 1.0,
        stats_texts: Sequence[str] | None = None,
        chain_rule: bool = True,
        score_top_k: int | None = None,
    ):
        self.name = name
        self.engine = engine
        self.target_tokenizer = target_tokenizer
        self.sequence_method = sequence_method
        self.top_k = top_k
        # The teacher scores more candidates than it sends (align.score_top_k): the projection merges them and
        # the chain rule finds more of them agreeing with the text; the rows are cut to top_k after.
        self.score_top_k = max(top_k, score_top_k or top_k)
        cap = getattr(engine, "max_top_k", None)
        if cap is not None and self.score_top_k > cap:
            log.info("teacher %s scores top-%d, its engine's max_top_k, not align.score_top_k %d", name,
                     max(cap, top_k), self.score_top_k)
            self.score_top_k = max(cap, top_k)
        self.temperature = temperature
        self.vocab_map = build_vocab_map(vocab_map_method, engine.tokenizer, target_tokenizer, texts=stats_texts)
        # How the target splits each teacher token's text: the chain rule's table (identical vocabularies
        # never split a teacher token, so they need none).
        self.same_vocab = vocab_info(engine.tokenizer).digest == vocab_info(target_tokenizer).digest
        self.splits = target_splits(engine.tokenizer, target_tokenizer) if chain_rule and not self.same_vocab else None
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
        scored = self.score([samples[i] for i in texts_ok])
        for i, sc in zip(texts_ok, scored):
            results[i] = self.align_result(samples[i], sc)
        return results  # type: ignore[return-value]

    def align_result(self, sample: Sample, scored) -> AlignedResult:
        """:meth:`align` with its failure (or ``scored``, an error string from :meth:`score`) as the result's error."""
        if isinstance(scored, str):
            return AlignedResult(sample, None, scored)
        try:
            return AlignedResult(sample, self.align(sample, scored))
        except (ValueError, IndexError) as e:
            return AlignedResult(sample, None, f"alignment failed: {e}")

    def score(self, samples: Sequence[Sample]) -> list:
        """:func:`score_samples` with this teacher's engine, top-k and temperature."""
        return score_samples(self.engine, samples, self.score_top_k, self.temperature)

    def align(self, sample: Sample, scored) -> AlignedDist:
        """``scored`` (:meth:`score`'s) on the target's positions and vocabulary (raises ``ValueError``). The
        sample's target encoding when it carries one (an in-process teacher: made once where the sample was cut,
        issue 25), else this teacher's own (a sample from the wire carries none)."""
        tgt = sample.encoding if sample.encoding is not None else encode(self.target_tokenizer, sample.text)
        tgt_tokens = [self._tgt_strings[i] for i in tgt.ids] if self._tgt_strings is not None else None
        src_tokens = scored.tokens
        if self._src_strings is not None:
            # Normalised strings from the ids, whatever the engine sent: an engine's own token strings are raw
            # ('▁der', 'Ġder'), and the DP compares them with the target's normalised ones (issue 21).
            src_tokens = [self._src_strings[i] for i in scored.token_ids]
        # The target's own tokenizer (the target as a teacher, or a same-tokenizer model): position t is position t,
        # also where a token begins inside a character (a byte-level piece), which offsets cannot link.
        same = self.same_vocab and np.array_equal(scored.token_ids, tgt.ids)
        dist = align_scored(
            replace(scored, tokens=src_tokens),
            pos_map=np.arange(len(tgt.ids) - 1, dtype=np.int32) if same else None,
            target_ids=tgt.ids,
            target_offsets=tgt.offsets,
            target_tokens=tgt_tokens,
            vocab_map=self.vocab_map,
            method=self.sequence_method,
            k=self.top_k,
            text=sample.text,
            splits=self.splits,
        )
        dist.meta.update(teacher=self.name, source_tokens=int(len(scored.token_ids)), nll=scored.nll)
        return dist


def score_samples(engine, samples: Sequence[Sample], top_k: int, temperature: float = 1.0) -> list:
    """The engine's :class:`~fuseflow.sparse.ScoredText` per sample, in the teacher's own vocabulary, or the
    error string of a sample the engine refused (the batch is retried one by one to find it; a batch of one
    raises)."""
    if not samples:
        return []
    texts = [s.text for s in samples]
    try:
        return engine.score_texts(texts, top_k=top_k, temperature=temperature)
    except ValueError:
        if len(samples) == 1:
            raise
    # One bad text fails the whole batch: retry one by one so only the bad sample is dead-lettered.
    out: list = []
    for s in samples:
        try:
            out.append(engine.score_texts([s.text], top_k=top_k, temperature=temperature)[0])
        except ValueError as e:
            out.append(str(e))
    return out


def aligned_fraction(dists: Sequence[AlignedDist]) -> float:
    n = sum(d.num_positions for d in dists)
    return float(sum(int(d.aligned.sum()) for d in dists) / n) if n else 0.0

