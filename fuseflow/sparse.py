"""The records that travel between stages: a text, a teacher's scores in its own vocabulary, and a
teacher's distributions aligned to the target's positions and vocabulary.

Conventions (shared by every stage, the wire codec and the trainer):
- Position ``t`` *predicts* token ``t + 1`` (FuseLLM issue #27: align on the predicted token, not the input).
- Sparse top-k rows are sorted by logprob, descending; unused slots hold id 0 and logprob ``-inf``.
- Arrays are numpy, little-endian: ids ``int32``, logprobs ``float32`` in memory (``float16`` on the wire).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

PAD_LOGPROB = -np.inf


@dataclass
class Encoded:
    """A text in one tokenizer: ids with the tokenizer's own special tokens, and character spans
    (:func:`fuseflow.models.encode`)."""

    ids: np.ndarray  # [L] int32
    offsets: np.ndarray  # [L, 2] int32


@dataclass(frozen=True)
class Sample:
    """One unit of training text. ``id`` is unique in a run and is what deduplication keys on."""

    id: str
    text: str
    # Character spans (start, end) of the text whose target tokens the fusion loss applies to
    # (assistant turns of a chat sample); ``None`` means the whole text.
    loss_spans: tuple[tuple[int, int], ...] | None = None
    # The text in the target tokenizer, made once where the sample is cut (issue 25: it was tokenized 3 + N
    # times) and used by whatever in this process needs it: the in-process teachers' aligners, the trainer's
    # check and the batch. Never on the wire: a process that receives the sample encodes it itself.
    encoding: Encoded | None = field(default=None, compare=False, repr=False)


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


# Slack above 0 for logprobs that went through fp16 on the wire (a log-softmax's max rounds to at most +0).
LOGPROB_SLACK = 1e-3


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

    def validate(self, vocab_size: int | None = None, num_positions: int | None = None) -> None:
        """Raise ``ValueError`` naming the first broken rule: shapes and dtypes as above, ``num_positions`` rows
        and ids in ``[0, vocab_size)`` when given, and values a log-softmax can produce — no NaN, no +inf,
        logprobs and gold logprobs <= 0 (``LOGPROB_SLACK`` for fp16 rounding), a finite best logprob in every
        row, a finite gold logprob where aligned and 0 where not.

        This is the trust boundary between teachers and the trainer (DESIGN.md; issue 15): one NaN turned the
        KL off for a whole run, and a gold logprob of +inf made its teacher win MinCE on every sample.
        """
        if self.ids.ndim != 2 or self.logprobs.ndim != 2:
            raise ValueError(f"ids and logprobs must be [T, k], got shapes {self.ids.shape} and {self.logprobs.shape}")
        t, k = self.ids.shape
        if self.logprobs.shape != (t, k):
            raise ValueError(f"logprobs shape {self.logprobs.shape} != ids shape {(t, k)}")
        if self.gold_logprobs.shape != (t,) or self.aligned.shape != (t,):
            raise ValueError(f"gold_logprobs/aligned must have shape ({t},), got {self.gold_logprobs.shape} and "
                             f"{self.aligned.shape}")
        if self.ids.dtype != np.int32:
            raise ValueError(f"ids must be int32, got {self.ids.dtype}")
        if self.aligned.dtype != np.bool_:
            raise ValueError(f"aligned must be bool, got {self.aligned.dtype}")
        if not (np.issubdtype(self.logprobs.dtype, np.floating) and np.issubdtype(self.gold_logprobs.dtype, np.floating)):
            raise ValueError(f"logprobs must be floating point, got {self.logprobs.dtype} and {self.gold_logprobs.dtype}")
        if num_positions is not None and t != num_positions:
            raise ValueError(f"{t} positions for a sample of {num_positions} target positions (another target "
                             "tokenizer or fuseflow version?)")
        if k == 0 or t == 0:
            return
        if vocab_size is not None and (int(self.ids.min()) < 0 or int(self.ids.max()) >= vocab_size):
            raise ValueError(f"ids outside the target vocabulary [0, {vocab_size}): min {int(self.ids.min())}, "
                             f"max {int(self.ids.max())}")
        lp = self.logprobs
        if np.isnan(lp).any() or np.isposinf(lp).any() or (lp > LOGPROB_SLACK).any():
            raise ValueError("logprobs must be <= 0 and not NaN (a log-softmax's values), got "
                             f"max {np.nanmax(lp) if not np.isnan(lp).all() else 'nan'} and "
                             f"{int(np.isnan(lp).sum())} NaN")
        if not np.isfinite(lp.max(axis=1)).all():
            raise ValueError("every position needs a finite logprob (the one-hot fallback has 0)")
        gold = self.gold_logprobs
        if not np.isfinite(gold).all() or (gold > LOGPROB_SLACK).any():
            raise ValueError(f"gold logprobs must be finite and <= 0, got min {gold.min()} max {gold.max()}")
        if (gold[~self.aligned] != 0).any():
            raise ValueError("gold logprobs must be 0 where a position is not aligned (the one-hot fallback)")
        nll = self.meta.get("nll")
        if nll is not None and not (isinstance(nll, (int, float)) and math.isfinite(nll) and nll >= 0):
            raise ValueError(f"meta 'nll' (the teacher's nll of the whole text) must be a finite number >= 0, got {nll!r}")


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
