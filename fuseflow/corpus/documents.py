"""Documents and what reading them sets aside: :class:`Document`, the errors that name a file and line, the tally
of rejected and empty documents, sample ids, and the weighted interleaving of streams (a mix of corpora)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("fuseflow.corpus")

Message = dict[str, str]  # {"role": ..., "content": ...}


class CorpusError(ValueError):
    """A corpus that cannot be read as configured; the message names the file, line or config field."""


class DocumentError(CorpusError):
    """One document that cannot be trained on (not JSON, not UTF-8, no text, a lone surrogate, …), as
    ``"<origin>: <reason>"`` (origin: ``file.jsonl:12``, a text file's path). A run sets it aside and goes on."""

    def __init__(self, origin: str, reason: str):
        super().__init__(f"{origin}: {reason}" if origin else reason)
        self.origin, self.reason = origin, reason


@dataclass(frozen=True)
class Rejected:
    """A document set aside (issue 15): ``id`` is the sample id of the piece it stopped at (``"12:0"``, in a mix
    ``"de/12:0"``), ``reason`` names its file and line, ``text`` is its head (escaped: it may hold what broke)."""

    id: str
    reason: str
    text: str = ""


@dataclass
class CorpusTally:
    """What reading a corpus set aside: ``rejected`` documents (the run dead-letters them) and the origins of
    ``empty`` ones (no text to train on: counted and logged, never silently dropped)."""

    rejected: list[Rejected] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)

    def reject(self, doc: "Document", piece: int, error: DocumentError) -> None:
        self.rejected.append(Rejected(sample_id(doc, piece), str(error), _head(doc)))
        log.warning("corpus: document set aside (dead-lettered as %s): %s", sample_id(doc, piece), error)

    def add_empty(self, doc: "Document") -> None:
        self.empty.append(doc.origin or f"document {doc.index}")
        _log_empty(doc, len(self.empty))


def _log_empty(doc: "Document", n: int) -> None:
    if n <= 10:
        log.warning("corpus: %s is empty: no sample%s", doc.origin or f"document {doc.index}",
                    "; further empty documents are counted, not logged" if n == 10 else "")


def _head(doc: "Document", chars: int = 200) -> str:
    """The start of ``doc``'s text (or first message), printable and encodable (lone surrogates escaped)."""
    text = doc.text if doc.text is not None else (doc.messages[0].get("content", "") if doc.messages else "")
    return str(text)[:chars].encode("utf-8", "backslashreplace").decode("utf-8")


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def check_text(text: str, origin: str, what: str = "text") -> None:
    """Raise :class:`DocumentError` for a lone surrogate (JSON allows ``"\\ud800"``; no tokenizer, UTF-8 file or
    Redis field takes it)."""
    m = _SURROGATE.search(text)
    if m is not None:
        raise DocumentError(origin, f"{what} holds a lone surrogate U+{ord(m.group()):04X} at character {m.start()} "
                                    "(invalid Unicode: fix or drop the document)")

@dataclass(frozen=True)
class Document:
    """One document: plain ``text`` or a chat (``messages``), never both."""

    index: int
    text: str | None = None
    messages: tuple[Message, ...] | None = None
    origin: str = ""  # "file.jsonl:12", "file.parquet#row 7": where errors point
    corpus: str = ""  # the name in corpus.sources; "" for a single-source corpus
    error: str | None = None  # why it cannot be read (its text, if any, is the raw head): see DocumentError

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def sample_id(doc: Document, piece: int) -> str:
    """``"{index}:{piece}"``, prefixed ``"{corpus}/"`` for a document of a mix: stable across runs."""
    return f"{doc.corpus}/{doc.index}:{piece}" if doc.corpus else f"{doc.index}:{piece}"


def corpus_of(sample_id: str) -> str:
    """The corpus name a sample id carries (``"de/12:0"`` → ``"de"``); ``""`` for a single-source corpus."""
    name, sep, _ = sample_id.partition("/")
    return name if sep else ""



def interleave(streams: Sequence[tuple[float, Iterable]]) -> Iterator:
    """Merge streams (of documents or samples) so that every prefix holds them in proportion to their weights (stride
    scheduling: next comes the stream whose ``(taken + 1) / weight`` is smallest, ties to the first listed).
    A stream that runs out drops out; the others go on in their proportions, so every item is used once.
    Deterministic: the same streams give the same order on every run.
    """
    iters = [iter(s) for _, s in streams]
    weights = np.array([w for w, _ in streams], dtype=np.float64)  # [S]
    taken = np.zeros(len(iters), dtype=np.float64)  # [S]
    live = np.ones(len(iters), dtype=bool)  # [S]
    while live.any():
        due = np.where(live, (taken + 1) / weights, np.inf)  # [S]
        i = int(np.argmin(due))
        item = next(iters[i], None)
        if item is None:
            live[i] = False
            continue
        taken[i] += 1
        yield item
