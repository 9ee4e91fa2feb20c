"""One source LLM as the Cool-Fusion decoder sees it: a teacher (an in-process engine or a gRPC client, the
same ``score_ids`` / ``generate`` surface) plus a local copy of its tokenizer.

The tokenizer is local even for a remote teacher: boundary detection tokenizes every candidate with every
source's tokenizer at every step, and chat prompts are rendered with each source's own chat template; a
round trip per call would cost more than the tokenization itself. The service has no detokenize RPC either.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fuseflow.models import Encoded
from fuseflow.sparse import ScoredText

# Tokens that end an assistant turn in common chat formats (ChatML / SmolLM2, Gemma, Llama-3, Phi-3):
# a source stops on the ones its vocabulary has, besides its EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")

# Context ids decoded in front of new ids, so that decoders which strip a leading space from the first token
# (SentencePiece ``▁``, Metaspace ``prepend_scheme="first"``) keep it on a continuation.
_DECODE_TAIL = 8


class Teacher(Protocol):
    """What the decoder needs of a teacher: :class:`fuseflow.score.engine.Engine` and
    :class:`fuseflow.wire.client.TeacherClient` both provide it."""

    max_length: int

    def score_ids(self, ids: list[np.ndarray], top_k: int, temperature: float = 1.0) -> list[ScoredText]: ...

    def generate(
        self,
        prompt_ids: np.ndarray,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] = (),
        seed: int | None = None,
    ): ...


@dataclass
class EnsembleSource:
    """A source: ``teacher`` does the model work, ``tokenizer`` (fast, with offsets) the text work."""

    name: str
    teacher: Teacher
    tokenizer: "transformers.PreTrainedTokenizerFast"  # noqa: F821
    max_length: int
    stop_token_ids: tuple[int, ...]
    remote: bool = False
    closer: object | None = field(default=None, repr=False)  # what ``close`` releases (a gRPC channel)
    # A fast tokenizer must not be called from two threads at once ("Already borrowed"): parallel proposals
    # tokenize every source's text from each source's thread.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def from_engine(cls, engine, name: str | None = None) -> "EnsembleSource":
        """An in-process engine (:class:`~fuseflow.score.engine.Engine`): its own tokenizer and limits."""
        return cls(
            name=name or engine.name,
            teacher=engine,
            tokenizer=engine.tokenizer,
            max_length=int(engine.max_length),
            stop_token_ids=default_stop_token_ids(engine.tokenizer),
        )

    @classmethod
    def from_client(cls, client, tokenizer, name: str | None = None) -> "EnsembleSource":
        """A served teacher (:class:`~fuseflow.wire.client.TeacherClient`) and a local copy of its tokenizer."""
        return cls(
            name=name or client.name,
            teacher=client,
            tokenizer=tokenizer,
            max_length=int(client.max_length),
            stop_token_ids=default_stop_token_ids(tokenizer),
            remote=True,
            closer=client,
        )

    def close(self) -> None:
        if self.closer is not None and hasattr(self.closer, "close"):
            self.closer.close()

    # -- text ↔ ids ------------------------------------------------------------------------------------

    def encode(self, texts: Sequence[str], add_special_tokens: bool) -> list[Encoded]:
        """Tokenize ``texts`` in one call: ids and character offsets, as :func:`fuseflow.models.encode`."""
        if not texts:
            return []
        with self._lock:
            enc = self.tokenizer(list(texts), add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return [
            Encoded(
                ids=np.asarray(ids, dtype=np.int32),  # [L]
                offsets=np.asarray(off, dtype=np.int32).reshape(-1, 2),  # [L, 2]
            )
            for ids, off in zip(enc["input_ids"], enc["offset_mapping"])
        ]

    def decode_continuation(self, context_ids: np.ndarray, new_ids: np.ndarray) -> str:
        """The text ``new_ids`` add after ``context_ids`` (special tokens skipped)."""
        tail = [int(x) for x in np.asarray(context_ids)[-_DECODE_TAIL:]]
        new = [int(x) for x in np.asarray(new_ids)]
        before, after = self.decode_batch([tail, tail + new])
        if after.startswith(before):
            return after[len(before) :]
        return self.decode_batch([new])[0]

    def prefix_char_ends(self, context_ids: np.ndarray, new_ids: np.ndarray, text: str) -> np.ndarray:
        """For each prefix ``new_ids[:m + 1]``: the length of its text if that text is a prefix of ``text``
        (the continuation of all of ``new_ids``), else -1. Returns [M] int64, one batched decode."""
        tail = [int(x) for x in np.asarray(context_ids)[-_DECODE_TAIL:]]
        new = [int(x) for x in np.asarray(new_ids)]
        if not new:
            return np.zeros(0, dtype=np.int64)
        decoded = self.decode_batch([tail + new[:m] for m in range(len(new) + 1)])
        base = decoded[0]
        ends = np.full(len(new), -1, dtype=np.int64)  # [M]
        for m, d in enumerate(decoded[1:]):
            if d.startswith(base) and text.startswith(d[len(base) :]):
                ends[m] = len(d) - len(base)
        return ends

    def decode_batch(self, seqs: list[list[int]]) -> list[str]:
        """Each id list as text (special tokens skipped, no clean-up of spaces)."""
        with self._lock:
            return self.tokenizer.batch_decode(seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # -- prompts ---------------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict]) -> str:
        """``messages`` in this source's own chat template, ending with the assistant's turn opened."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"source {self.name!r}: its tokenizer has no chat template; use /v1/completions, or give the "
                "source a tokenizer that has one (sources[].tokenizer)"
            )
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def default_stop_token_ids(tokenizer) -> tuple[int, ...]:
    """EOS and the end-of-turn tokens the vocabulary has (see :data:`END_OF_TURN_TOKENS`)."""
    ids: set[int] = set()
    eos = tokenizer.eos_token_id
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(x) for x in eos)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return tuple(sorted(ids))


@dataclass(frozen=True)
class Prompt:
    """A prompt as each source sees it: ``texts[i]`` for source ``i`` (chat prompts differ per template)."""

    texts: tuple[str, ...]
    add_special_tokens: bool  # True for plain text (BOS as the tokenizer adds it); chat templates write their own


def completion_prompt(sources: Sequence[EnsembleSource], text: str) -> Prompt:
    return Prompt(texts=tuple(text for _ in sources), add_special_tokens=True)


def chat_prompt(sources: Sequence[EnsembleSource], messages: list[dict]) -> Prompt:
    return Prompt(texts=tuple(s.render_chat(messages) for s in sources), add_special_tokens=False)
