"""The records that travel between stages: a text, a teacher's scores in its own vocabulary, and a
teacher's distributions aligned to the target's positions and vocabulary.

Conventions (shared by every stage, the wire codec and the trainer):
- Position ``t`` *predicts* token ``t + 1`` (FuseLLM issue #27: align on the predicted token, not the input).
- Sparse top-k rows are sorted by logprob, descending; unused slots hold id 0 and logprob ``-inf``.
- Arrays are numpy, little-endian: ids ``int32``, logprobs ``float32`` in memory (``float16`` on the wire).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PAD_LOGPROB = -np.inf


@dataclass(frozen=True)
class Sample:
    """One unit of training text. ``id`` is unique in a run and is what deduplication keys on."""

    id: str
    text: str
    # Character spans (start, end) of the text whose target tokens the fusion loss applies to
    # (assistant turns of a chat sample); ``None`` means the whole text.
    loss_spans: tuple[tuple[int, int], ...] | None = None


@dataclass
class ScoredText:
    """A teacher's view of one text, in the teacher's own tokenization and vocabulary."""

    token_ids: np.ndarray  # [L] int32, special tokens included
    offsets: np.ndarray | None  # [L, 2] int32 character spans; None if the tokenizer gives no offsets
    tokens: list[str] | None  # [L] token strings, for alignment methods that work on strings
    topk_ids: np.ndarray  # [L-1, k] int32 source ids; row t predicts token t+1
    topk_logprobs: np.ndarray  # [L-1, k] float32, descending
    gold_logprobs: np.ndarray  # [L-1] float32, logprob of the actual token t+1

    @property
    def nll(self) -> float:
        """Negative log-likelihood of the text under the teacher (sum over predicted tokens)."""
        return float(-self.gold_logprobs.astype(np.float64).sum())

    @property
    def ce(self) -> float:
        """Mean per-token cross-entropy in the teacher's own tokenization."""
        n = len(self.gold_logprobs)
        return self.nll / n if n else 0.0


@dataclass
class AlignedDist:
    """One teacher's next-token distributions at every target position, in target vocabulary ids.

    ``T = len(target token ids) - 1``. Where the teacher has no usable prediction for a position
    (``aligned[t] == False``) the row is the one-hot gold next target token (FuseLLM's fallback):
    ``ids[t] = [gold, 0, …]``, ``logprobs[t] = [0, -inf, …]``.
    """

    ids: np.ndarray  # [T, k] int32 target ids
    logprobs: np.ndarray  # [T, k] float32, descending, -inf padding
    gold_logprobs: np.ndarray  # [T] float32: teacher's logprob of the gold next text at t (0 where not aligned)
    aligned: np.ndarray  # [T] bool
    meta: dict = field(default_factory=dict)  # e.g. {"teacher": name, "source_tokens": L}

    @property
    def num_positions(self) -> int:
        return int(self.ids.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[1])

    def validate(self) -> None:
        """Raise ``ValueError`` if shapes or dtypes break the conventions above."""
        t, k = self.ids.shape
        if self.logprobs.shape != (t, k):
            raise ValueError(f"logprobs shape {self.logprobs.shape} != ids shape {(t, k)}")
        if self.gold_logprobs.shape != (t,) or self.aligned.shape != (t,):
            raise ValueError(f"gold_logprobs/aligned must have shape ({t},)")
        if self.ids.dtype != np.int32:
            raise ValueError(f"ids must be int32, got {self.ids.dtype}")


class ScoreError(ValueError):
    """A request the engine rejects; the message names the request index and the limit to change.

    ``index`` is the position of the offending text in the request (``None`` when the whole request is
    at fault, e.g. ``top_k``). Servers map this to INVALID_ARGUMENT and workers to the dead-letter stream.
    """

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


@dataclass
class Generated:
    """A continuation sampled by an engine's ``generate`` (:class:`fuseflow.score.engine.Engine`).

    ``logprobs`` are the model's raw next-token logprobs of the chosen tokens (temperature 1, before top-p),
    as vLLM's default ``logprobs_mode="raw_logprobs"``: Cool-Fusion reranks segments by the models' own
    likelihood, not by the sampling distribution.
    """

    token_ids: np.ndarray  # [N] int32, the stop token included when one ended the sequence
    logprobs: np.ndarray  # [N] float32
    finish_reason: str  # "stop" (a stop token was produced) or "length" (max_new_tokens reached)
