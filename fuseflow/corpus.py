"""Corpora: stream documents from what the user brings, split them by document into train / held-out, and
cut them into :class:`~fuseflow.sparse.Sample` pieces that fit the target model's context.

Sources (``CorpusConfig.source``): ``builtin`` (the interpreter's help topics, one document per topic),
``manpages:LANG`` (Debian's translated manual pages, e.g. ``manpages:de``, as prose: :mod:`fuseflow.manpages`), or a
path to a JSONL file (``text`` or ``messages`` per line; ``.jsonl.gz`` too), a Parquet file, a ``.txt`` /
``.md`` file, a folder of any one of those kinds, or an HF ``datasets`` directory written by
``save_to_disk``. Everything is streamed: JSONL line by line, Parquet batch by batch, ``datasets``
memory-mapped batch by batch, text folders one file at a time.

Bad documents (issue 15): a line that is not JSON, not UTF-8, lacks the text field, or holds a lone surrogate
(``"\\ud800"``, which no tokenizer takes) is one document the run cannot train on, not a broken corpus. Given a
:class:`CorpusTally`, the readers set it aside with its file and line (:class:`Rejected`; the run dead-letters
it and goes on) and count empty documents; without one they raise :class:`DocumentError`, naming both.

A document's ``index`` is its ordinal in the source (JSONL: non-blank line; Parquet / ``datasets``: row;
folder: file in sorted path order). Sample ids (``f"{index}:{piece}"``) and the held-out split derive from
it alone (the split also skips documents that cannot be read or are empty: :func:`evaluable`), so they are the
same on every run over the same files: resume and deduplication rely on that.

Several corpora mix with weights (``corpus.sources: [{name, source, weight, …}]``, issue 11): each is split
into train / held-out on its own (so every corpus has held-out documents to report on), training samples
are interleaved in proportion to the weights (:func:`corpus_samples`: training *samples*, so a weight is a
corpus's share of the training tokens), and a document carries its corpus ``name``; its sample ids are
``f"{name}/{index}:{piece}"``, still a function of the document's ordinal in its own source alone.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator

from fuseflow.sparse import Encoded, Sample

log = logging.getLogger(__name__)

Message = dict[str, str]  # {"role": ..., "content": ...}
Part = Literal["all", "train", "held_out"]

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".md")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# ShareGPT / FuseChat training data (``conversations: [{from, value}]``) uses these role names.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


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


class CorpusSourceConfig(BaseModel):
    """One corpus of a mix (``corpus.sources[i]``). Held-out settings and ``max_documents`` left unset take the
    ``corpus:`` section's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="reported per corpus; prefixes sample ids")
    source: str = Field(description="'builtin', 'manpages:LANG', or a path to a file or folder")
    weight: float = Field(1.0, gt=0, description="share of the training samples, relative to the others")
    format: Literal["auto", "jsonl", "parquet", "text", "hf"] = "auto"
    text_field: str = "text"
    messages_field: str = "messages"
    hf_split: str = "train"
    max_documents: PositiveInt | None = None
    held_out_fraction: float | None = Field(None, ge=0.0, lt=1.0)
    held_out_documents: NonNegativeInt | None = None

    @model_validator(mode="after")
    def _one_held_out_rule(self) -> "CorpusSourceConfig":
        if self.held_out_documents is not None and self.held_out_fraction:
            raise ValueError("set held_out_fraction or held_out_documents, not both")
        return self


class CorpusConfig(BaseModel):
    """The ``corpus:`` section of a run config: one ``source``, or a weighted mix of ``sources``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field("builtin", description="'builtin', 'manpages:LANG', or a path to a file or folder")
    sources: list[CorpusSourceConfig] | None = Field(
        None, min_length=1, description="several corpora mixed by weight, each split and reported on its own"
    )
    format: Literal["auto", "jsonl", "parquet", "text", "hf"] = "auto"
    text_field: str = "text"
    messages_field: str = "messages"
    hf_split: str = Field("train", description="split to read when an HF directory holds a DatasetDict")
    max_documents: PositiveInt | None = Field(None, description="read only the first N documents of the source")
    held_out_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    held_out_documents: NonNegativeInt | None = Field(None, description="exact held-out count (instead of a fraction)")
    seed: int = Field(0, description="the held-out split's seed; in a run config, the run's seed unless set here (set "
                      "it to keep the same held-out documents while the seed changes)")

    @model_validator(mode="after")
    def _one_held_out_rule(self) -> "CorpusConfig":
        if self.held_out_documents is not None and self.held_out_fraction > 0:
            raise ValueError("set corpus.held_out_fraction or corpus.held_out_documents, not both")
        if self.sources is not None:
            # compared with the defaults, not model_fields_set: a dumped config (run_dir/config.yaml) re-validates
            fields = type(self).model_fields
            clash = sorted(f for f in ("source", "format", "text_field", "messages_field", "hf_split")
                           if getattr(self, f) != fields[f].default)
            if clash:
                raise ValueError(f"corpus.sources is set: give {', '.join(clash)} per source (corpus.sources[i]), not here")
            names = [s.name for s in self.sources]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"corpus.sources: names must be unique, {dup} repeated")
        return self

    def corpora(self) -> list[tuple[str, float, "CorpusConfig"]]:
        """(name, weight, single-source config) of each corpus; one unnamed corpus when ``sources`` is unset.

        A source's unset held-out settings take this section's; ``seed`` is shared, and the split of a
        corpus depends only on its own documents.
        """
        if self.sources is None:
            return [("", 1.0, self)]
        out = []
        for src in self.sources:
            own = src.held_out_documents is not None or src.held_out_fraction is not None
            held = (
                {"held_out_documents": src.held_out_documents, "held_out_fraction": src.held_out_fraction or 0.0}
                if own
                else {"held_out_documents": self.held_out_documents, "held_out_fraction": self.held_out_fraction}
            )
            fields = src.model_dump(exclude={"name", "weight", "held_out_documents", "held_out_fraction"})
            fields["max_documents"] = src.max_documents or self.max_documents
            out.append((src.name, src.weight, CorpusConfig(**fields, **held, seed=self.seed)))
        return out


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


# ----------------------------------------------------------------------------------------------------------
# Reading documents.
# ----------------------------------------------------------------------------------------------------------


def iter_documents(config: CorpusConfig, part: Part = "train", tally: CorpusTally | None = None) -> Iterator[Document]:
    """Stream the documents of ``config`` (the first ``max_documents``), restricted to ``part``.

    ``part`` defaults to ``"train"`` so that held-out documents cannot reach training by accident; pass
    ``"held_out"`` for evaluation, ``"all"`` for everything. A mix (``sources``) yields its corpora's
    documents interleaved by weight (:func:`interleave`), each tagged with its corpus name. A document that
    cannot be read goes to ``tally`` (:meth:`CorpusTally.reject`), or raises :class:`DocumentError` without one.
    """
    if config.sources is not None:
        return interleave([(weight, _documents(sub, part, tally, name)) for name, weight, sub in config.corpora()])
    return _documents(config, part, tally)


def _documents(config: CorpusConfig, part: Part, tally: CorpusTally | None, corpus: str = "") -> Iterator[Document]:
    docs: Iterator[Document] = _read_source(config)
    if config.max_documents is not None:
        docs = islice(docs, config.max_documents)
    if part != "all":
        docs = split_held_out(docs, config, part)
    for doc in docs:
        if corpus:
            doc = replace(doc, corpus=corpus)
        if doc.error is None:
            yield doc
        elif tally is None:
            raise DocumentError(doc.origin, doc.error)
        else:
            tally.reject(doc, 0, DocumentError(doc.origin, doc.error))


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


def count_documents(config: CorpusConfig) -> int:
    """Number of documents :func:`iter_documents` sees with ``part="all"``, without parsing them."""
    if config.sources is not None:
        return sum(count_documents(sub) for _, _, sub in config.corpora())
    fmt, files = _resolve(config)
    if fmt == "builtin":
        n = len(_builtin_topics())
    elif fmt == "manpages":
        n = sum(1 for _ in _manpage_documents(config.source))
    elif fmt == "jsonl":
        n = sum(_count_jsonl_lines(f) for f in files)
    elif fmt == "parquet":
        n = sum(_parquet_file(f).metadata.num_rows for f in files)
    elif fmt == "text":
        n = len(files)
    else:
        n = len(_hf_dataset(files[0], config))
    return n if config.max_documents is None else min(n, config.max_documents)


def _read_source(config: CorpusConfig) -> Iterator[Document]:
    fmt, files = _resolve(config)
    if fmt == "builtin":
        topics = _builtin_topics()
        for i, key in enumerate(sorted(topics)):
            yield Document(index=i, text=topics[key], origin=f"builtin:{key}")
        return
    if fmt == "manpages":
        yield from _manpage_documents(config.source)
        return
    records = {"jsonl": _jsonl_records, "parquet": _parquet_records, "hf": _hf_records}
    index = 0
    for path in files:
        if fmt == "text":
            try:
                yield Document(index=index, text=_read_text_file(path, alone=len(files) == 1), origin=str(path))
            except DocumentError as e:
                yield Document(index=index, origin=str(path), error=e.reason)
            index += 1
            continue
        for origin, record in records[fmt](path, config):
            try:
                yield _to_document(index, record, origin, config)
            except DocumentError as e:
                yield Document(index=index, origin=origin, error=e.reason, text=_raw_head(record))
            index += 1


def _builtin_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def _manpage_documents(source: str) -> Iterator[Document]:
    from fuseflow import manpages

    try:
        for i, (origin, text) in enumerate(manpages.iter_pages(manpages.language_of(source))):
            yield Document(index=i, text=text, origin=origin)
    except manpages.ManpagesMissing as e:
        raise CorpusError(str(e)) from None


def _resolve(config: CorpusConfig) -> tuple[str, list[Path]]:
    """(format, files in reading order) for ``config``; an HF directory is its single 'file'."""
    if config.source == "builtin":
        return "builtin", []
    if config.source.startswith("manpages:"):
        if not config.source[len("manpages:"):].isalpha():
            raise CorpusError(f"corpus.source {config.source!r}: expected manpages:LANG, e.g. manpages:de")
        return "manpages", []
    path = Path(config.source).expanduser()
    if not path.exists():
        raise CorpusError(f"corpus.source {config.source!r} does not exist (a path, or 'builtin')")
    fmt = config.format
    if path.is_file():
        fmt = _format_of_file(path) if fmt == "auto" else fmt
        if fmt == "hf":
            raise CorpusError(f"corpus.format 'hf' needs a directory written by save_to_disk, got file {path}")
        return fmt, [path]
    if fmt == "hf" or (fmt == "auto" and any((path / m).exists() for m in HF_MARKERS)):
        return "hf", [path]
    kinds = {k: _files_under(path, sfx) for k, sfx in
             (("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES), ("text", TEXT_SUFFIXES))}
    if fmt == "auto":
        present = [k for k, fs in kinds.items() if fs]
        if len(present) != 1:
            found = ", ".join(f"{len(kinds[k])} {k}" for k in present) or "no .jsonl/.parquet/.txt/.md files"
            raise CorpusError(f"corpus.source folder {path}: cannot pick a format ({found}); set corpus.format")
        fmt = present[0]
    if not kinds[fmt]:
        raise CorpusError(f"corpus.source folder {path} has no {fmt} files")
    return fmt, kinds[fmt]


def _format_of_file(path: Path) -> str:
    name = path.name.lower()
    for fmt, suffixes in (("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES), ("text", TEXT_SUFFIXES)):
        if name.endswith(suffixes):
            return fmt
    raise CorpusError(f"corpus.source {path}: unknown file type; set corpus.format (jsonl, parquet, text)")


def _files_under(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    files = [
        p for p in folder.rglob("*")
        if p.is_file() and p.name.lower().endswith(suffixes)
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _read_text_file(path: Path, alone: bool) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DocumentError(str(path), f"not UTF-8 text ({e.reason} at byte {e.start})") from e
    if alone and not text.strip():
        raise CorpusError(f"{path}: empty file")
    return text


class _Unreadable:
    """A JSONL line that is no record: why (``reason``), and its raw head for the dead letter."""

    def __init__(self, reason: str, raw: bytes):
        self.reason, self.raw = reason, raw


def _jsonl_records(path: Path, config: CorpusConfig) -> Iterator[tuple[str, dict | _Unreadable]]:
    """``(origin, record)`` per non-blank line; a line that is not UTF-8, not JSON or not an object comes as
    :class:`_Unreadable`. Lines are decoded one by one (a text-mode file decodes ahead in blocks, so its error
    would point at the wrong line)."""
    seen = False
    with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            seen = True
            origin = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield origin, _Unreadable(f"not UTF-8 ({e.reason} at byte {e.start} of the line)", raw)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                hint = "; a JSON array is not JSON Lines: convert it with jq -c '.[]'" if line.lstrip()[:1] == "[" else ""
                yield origin, _Unreadable(f"{json_error(e)}{hint}", raw)
                continue
            if not isinstance(record, dict):
                yield origin, _Unreadable(f"expected a JSON object, got {type(record).__name__}", raw)
                continue
            yield origin, record
    if not seen:
        raise CorpusError(f"{path}: empty file (no JSON lines)")


def json_error(e: json.JSONDecodeError) -> str:
    """``invalid JSON at column 23 (invalid control character)``. Python's messages that point at a position end
    in " at" (``"Invalid control character at"``), meant to be followed by the position (issue 26)."""
    reason = e.msg.removesuffix(" at")
    return f"invalid JSON at column {e.colno} ({reason[:1].lower()}{reason[1:]})"


def _raw_head(record, chars: int = 200) -> str | None:
    """An unreadable record's start, printable: what a dead letter shows of it."""
    if isinstance(record, _Unreadable):
        return record.raw[: chars * 4].decode("utf-8", "backslashreplace")[:chars].rstrip("\r\n")
    text = record.get("text") if isinstance(record, dict) else None
    return text[:chars].encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(text, str) else None


def _count_jsonl_lines(path: Path) -> int:
    with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
        return sum(1 for line in f if line.strip())


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise CorpusError(f"reading {path} needs pyarrow: pip install pyarrow") from e
    return pq.ParquetFile(path)


def _columns(names: Sequence[str], config: CorpusConfig, where: str) -> list[str]:
    cols = [c for c in (config.messages_field, config.text_field) if c in names]
    if not cols:
        raise CorpusError(
            f"{where}: no column {config.text_field!r} (corpus.text_field) or {config.messages_field!r} "
            f"(corpus.messages_field); columns: {list(names)}"
        )
    return cols


def _batched_rows(batches: Iterable[dict[str, list]], where: str) -> Iterator[tuple[str, dict]]:
    row = 0
    for batch in batches:
        names = list(batch)
        for values in zip(*(batch[n] for n in names)):
            yield f"{where}#row {row}", dict(zip(names, values))
            row += 1


def _parquet_records(path: Path, config: CorpusConfig) -> Iterator[tuple[str, dict]]:
    pf = _parquet_file(path)
    if pf.metadata.num_rows == 0:
        raise CorpusError(f"{path}: empty file (0 rows)")
    cols = _columns(pf.schema_arrow.names, config, str(path))
    batches = (b.to_pydict() for b in pf.iter_batches(batch_size=256, columns=cols))
    yield from _batched_rows(batches, str(path))


def _hf_dataset(path: Path, config: CorpusConfig):
    try:
        import datasets
    except ImportError as e:
        raise CorpusError(f"reading the HF dataset directory {path} needs `datasets`: pip install datasets") from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if config.hf_split not in ds:
            raise CorpusError(f"{path}: no split {config.hf_split!r} (corpus.hf_split); splits: {list(ds)}")
        ds = ds[config.hf_split]
    return ds


def _hf_records(path: Path, config: CorpusConfig) -> Iterator[tuple[str, dict]]:
    ds = _hf_dataset(path, config)
    if len(ds) == 0:
        raise CorpusError(f"{path}: empty dataset (0 rows)")
    cols = _columns(ds.column_names, config, str(path))
    yield from _batched_rows(ds.select_columns(cols).iter(batch_size=256), str(path))


def _to_document(index: int, record: dict | _Unreadable, origin: str, config: CorpusConfig) -> Document:
    if isinstance(record, _Unreadable):
        raise DocumentError(origin, record.reason)
    messages = record.get(config.messages_field)
    if messages is not None:
        return Document(index=index, messages=_normalise_messages(messages, origin, config), origin=origin)
    text = record.get(config.text_field)
    if text is None:
        raise DocumentError(
            origin, f"no {config.text_field!r} (corpus.text_field) or {config.messages_field!r} "
            f"(corpus.messages_field); fields: {sorted(record)}"
        )
    if not isinstance(text, str):
        raise DocumentError(origin, f"field {config.text_field!r} must be a string, got {type(text).__name__}")
    check_text(text, origin, f"field {config.text_field!r}")
    return Document(index=index, text=text, origin=origin)


def _normalise_messages(messages, origin: str, config: CorpusConfig) -> tuple[Message, ...]:
    field = config.messages_field
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DocumentError(origin, f"{field!r} must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(messages):
        if isinstance(m, dict) and "role" not in m and "from" in m:  # ShareGPT / FuseChat data
            m = {"role": SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m.get("value")}
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DocumentError(origin, f"{field}[{j}] must have string 'role' and 'content', got {m!r:.120}")
        check_text(m["role"] + m["content"], origin, f"{field}[{j}]")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# Train / held-out split by document.
# ----------------------------------------------------------------------------------------------------------


def split_keys(indices: np.ndarray, seed: int) -> np.ndarray:
    """SplitMix64 of each document index, salted by ``seed``: ``[N] int`` → ``[N] uint64``.

    A bijection on uint64, so distinct documents never share a key, and the same on every platform.
    """
    with np.errstate(over="ignore"):
        salt = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        z = indices.astype(np.uint64) ^ salt  # [N]
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def held_out_threshold(num_documents: int, held_out: int, seed: int, chunk: int = 1 << 20) -> np.uint64:
    """The largest of the ``held_out`` (≥ 1) smallest keys of documents ``0..num_documents-1``.

    Streams the indices in chunks: a corpus of any size needs O(chunk + held_out) memory.
    """
    if not 1 <= held_out <= num_documents:
        raise CorpusError(f"corpus.held_out_documents = {held_out} must be in 1..{num_documents} (the documents)")
    chunks = (np.arange(start, min(start + chunk, num_documents)) for start in range(0, num_documents, chunk))
    return _nth_smallest_key(chunks, held_out, seed)[0]


def evaluable(doc: Document) -> bool:
    """A document the held-out split may take (issue 26): it was read without error and has text to evaluate on.
    A document set aside or empty in that slot left the evaluation one document short, silently."""
    return doc.error is None and (doc.is_chat or bool(doc.text and doc.text.strip()))


def _nth_smallest_key(index_chunks: Iterable[np.ndarray], n: int, seed: int) -> tuple[np.uint64 | None, int]:
    """(the largest of the ``n`` smallest split keys of the indices in ``index_chunks``, how many indices);
    None when there are none. O(chunk + n) memory."""
    best = np.empty(0, dtype=np.uint64)  # [≤ n] smallest keys so far
    total = 0
    for indices in index_chunks:
        keys = split_keys(indices, seed)  # [chunk]
        total += len(keys)
        both = np.concatenate([best, keys])
        best = both if len(both) <= n else np.partition(both, n - 1)[:n]
    return (best.max() if len(best) else None), total


def _evaluable_threshold(config: CorpusConfig, held_out: int, chunk: int = 1 << 16) -> np.uint64:
    """:func:`held_out_threshold` over the :func:`evaluable` documents alone: one pass that reads (parses) the
    source, so ``held_out_documents: N`` holds out N documents that can be evaluated whenever there are N."""
    docs = _read_source(config)
    if config.max_documents is not None:
        docs = islice(docs, config.max_documents)
    seen = [0]

    def chunks() -> Iterator[np.ndarray]:
        buf: list[int] = []
        for doc in docs:
            seen[0] += 1
            if evaluable(doc):
                buf.append(doc.index)
            if len(buf) >= chunk:
                yield np.array(buf, dtype=np.int64)
                buf = []
        if buf:
            yield np.array(buf, dtype=np.int64)

    limit, good = _nth_smallest_key(chunks(), held_out, config.seed)
    if not 1 <= held_out <= good:
        raise CorpusError(f"corpus.held_out_documents = {held_out} must be in 1..{good} (the documents that can be "
                          f"read and are not empty, of {seen[0]} in all)")
    return limit


def split_held_out(documents: Iterable[Document], config: CorpusConfig, part: Part) -> Iterator[Document]:
    """Keep the documents of ``part`` (``"train"``, ``"held_out"`` or ``"all"``): a split by document index
    and ``config.seed`` alone, so a held-out document never reaches training on any run.

    Only :func:`evaluable` documents are ever held out (issue 26): one that cannot be read or is empty stays
    in the training part, where it is set aside (dead-lettered) or counted as a training document would be.

    ``held_out_fraction``: an evaluable document is held out iff its key / 2⁶⁴ < fraction (≈ that fraction,
    streamed). ``held_out_documents``: exactly that many, the evaluable ones with the smallest keys (costs one
    pass that reads the source, see :func:`_evaluable_threshold`).
    """
    if part not in ("all", "train", "held_out"):
        raise ValueError(f"part must be 'all', 'train' or 'held_out', got {part!r}")
    if part == "all":
        yield from documents
        return
    if config.held_out_documents:
        limit = _evaluable_threshold(config, config.held_out_documents)
    elif config.held_out_fraction > 0:
        bound = np.uint64(config.held_out_fraction * 2.0**64)  # fraction < 1, so below 2⁶⁴
        limit = bound - np.uint64(1) if bound > 0 else None
    else:
        limit = None
    for doc in documents:
        held = limit is not None and evaluable(doc) and split_keys(np.array([doc.index]), config.seed)[0] <= limit
        if held == (part == "held_out"):
            yield doc


# ----------------------------------------------------------------------------------------------------------
# Chat rendering.
# ----------------------------------------------------------------------------------------------------------


def render_chat(messages: Sequence[Message], tokenizer, where: str = "chat") -> tuple[str, tuple[tuple[int, int], ...]]:
    """Render ``messages`` with ``tokenizer``'s chat template; return (text, assistant character spans).

    A span runs from the first character of an assistant turn's content through the template's end-of-turn
    marker (the model must learn to stop), without trailing whitespace: FuseChat (FastChat ``preprocess``
    with ``mask_instruction``) applies the loss to exactly these tokens. Spans come from rendering the
    prefix of the chat before the turn (with the generation prompt) and through it; templates that do not
    render prefixes consistently fall back to locating the content verbatim.

    A leading BOS that the tokenizer also adds by itself is dropped from the text, so that the text
    tokenized with ``add_special_tokens=True`` (as every stage does) carries one BOS, not two.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise CorpusError(
            f"{where}: chat document, but tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no "
            "chat_template; use a chat model as the target or give the corpus a text field"
        )
    msgs = [dict(m) for m in messages]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start, end = _turn_span(msgs, i, text, tokenizer)
        if start < cursor:
            start = text.find(m["content"], cursor)
            if start < 0:
                raise DocumentError(where, f"assistant turn {i} not found in the rendered chat template output")
            end = start + len(m["content"])
        end = start + len(text[start:end].rstrip())
        if end > start:
            spans.append((start, end))
        cursor = max(cursor, end)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos):]
        spans = [(s - len(bos), e - len(bos)) for s, e in spans]
    return text, tuple(spans)


def _turn_span(msgs: list[Message], i: int, text: str, tokenizer) -> tuple[int, int]:
    """Character span of assistant turn ``i`` in ``text`` by prefix rendering; (-1, -1) if inconsistent."""
    try:
        before = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
    except Exception:  # noqa: BLE001 - a template may reject a prefix (raise_exception, indexing); fall back
        return -1, -1
    if i and text.startswith(before) and text.startswith(through) and len(before) < len(through):
        return len(before), len(through)
    return -1, -1


def _adds_bos(tokenizer) -> bool:
    bos_id = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos_id is not None and len(ids) > 0 and ids[0] == bos_id


# ----------------------------------------------------------------------------------------------------------
# Cutting documents into samples.
# ----------------------------------------------------------------------------------------------------------

_NEWLINE = ord("\n")
_SPACE = ord(" ")
_WHITESPACE = np.array([ord(c) for c in " \t\n\r\x0b\x0c\xa0\u3000"], dtype=np.uint32)


def cut_scores(codepoints: np.ndarray, offsets: np.ndarray, newline_cuts: bool = True) -> np.ndarray:
    """How good a cut just before each token is: ``[N] uint32`` text, ``[L, 2]`` offsets → ``[L] int8``.

    3 after a blank line, 2 after a newline, 1 at a word boundary, 0 inside a word, -1 never (the token
    shares a character with the previous one: a byte-level piece of a multi-byte character).
    ``newline_cuts=False`` is for tokenizers that prepend a space marker to every text (SentencePiece's
    dummy prefix): a piece re-tokenizes as it was cut only if it starts with a space, so then 1 before a
    token that starts with a space and 0 elsewhere.
    """
    n = len(codepoints)
    starts, ends = offsets[:, 0], offsets[:, 1]  # [L], [L]
    padded = np.concatenate([np.array([_NEWLINE, _NEWLINE], dtype=np.uint32), codepoints, np.zeros(1, np.uint32)])
    prev1 = padded[starts + 1]  # [L] character before the token (newline before the text's start)
    prev2 = padded[starts]  # [L]
    first = padded[np.minimum(starts, n) + 2]  # [L] the token's first character
    if newline_cuts:
        score = (np.isin(prev1, _WHITESPACE) | np.isin(first, _WHITESPACE)).astype(np.int8)  # [L]
        score[prev1 == _NEWLINE] = 2
        score[(prev1 == _NEWLINE) & (prev2 == _NEWLINE)] = 3
    else:
        score = (first == _SPACE).astype(np.int8)  # [L]
    overlaps = np.zeros(len(starts), dtype=bool)  # [L]
    overlaps[1:] = starts[1:] < ends[:-1]
    score[overlaps] = -1
    return score


def newline_cuts_are_clean(tokenizer) -> bool:
    """Whether text cut just after a newline tokenizes as the two halves do (false for tokenizers that
    prepend a space marker to every text, which the second half then gains)."""
    first, second = "The first line.\n", "The second line."
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return ids(first + second) == ids(first) + ids(second)


def best_cut(scores: np.ndarray, lo: int, hi: int, floor: int) -> int:
    """Token index in ``[lo, hi]`` to cut before: the best score, the latest among equals. When every
    candidate there is forbidden, search back to ``floor``; failing that, cut at ``hi`` regardless."""
    for a in (max(lo, floor), floor):
        window = scores[a : hi + 1]  # [≤ hi - a + 1]
        if len(window) and window.max() >= 0:
            return hi - int(np.argmax(window[::-1]))
    return hi


def make_samples(
    documents: Iterable[Document | str | Sequence[Message]],
    tokenizer,
    max_tokens: int,
    stride: int | None = None,
    block_chars: int = 1 << 20,
    tally: CorpusTally | None = None,
) -> Iterator[Sample]:
    """Cut documents into samples whose tokenization by ``tokenizer`` (``add_special_tokens=True``) has at
    most ``max_tokens`` tokens.

    Pieces end at token boundaries mapped back to character offsets, preferring (within the last quarter of
    the budget) a blank line, then a newline, then a word boundary, so that a piece re-tokenizes to the
    tokens it was cut from; each piece is re-tokenized and shortened if it still does not fit.
    ``stride`` (tokens) makes consecutive pieces start ``stride`` tokens apart (overlapping); ``None``
    gives non-overlapping pieces. Whitespace-only pieces are skipped; so are chat pieces without any
    assistant text (they carry no loss). Ids are ``f"{document.index}:{piece}"``; plain strings and message
    lists get their position in ``documents`` as index. Documents longer than ``block_chars`` are first
    split at a newline so tokenizing one never holds more than a block's offsets in memory.

    A document that cannot be cut (:class:`DocumentError`: unreadable, a lone surrogate, a chat its template
    cannot render) goes to ``tally`` as rejected at the piece it stopped at, and empty documents are counted
    there; without a tally the error is raised, and empty documents are logged.
    """
    budget = max_tokens - tokenizer.num_special_tokens_to_add(pair=False)
    if budget < 2:
        raise ValueError(f"max_tokens = {max_tokens} leaves no room for text after the special tokens")
    if stride is not None and not 0 < stride <= budget:
        raise ValueError(f"stride must be in 1..{budget} (max_tokens minus special tokens), got {stride}")
    newline_cuts = newline_cuts_are_clean(tokenizer)
    empty = 0
    for position, item in enumerate(documents):
        doc = _as_document(position, item)
        where = doc.origin or f"document {doc.index}"
        piece = 0
        try:
            if doc.error is not None:
                raise DocumentError(doc.origin, doc.error)
            if doc.is_chat:
                text, spans = render_chat(doc.messages, tokenizer, where)
            else:
                text, spans = doc.text or "", None
            if not text.strip():
                if tally is not None:
                    tally.add_empty(doc)
                else:
                    empty += 1
                    _log_empty(doc, empty)
                continue
            check_text(text, where)  # the tokenizer would raise a bare TypeError
            bounds = _piece_bounds(text, tokenizer, budget, max_tokens, stride, newline_cuts, block_chars, where)
            for start, end, enc in bounds:
                piece_text = text[start:end]
                piece_spans = None if spans is None else _clip_spans(spans, start, end)
                if piece_text.strip() and piece_spans != ():
                    yield Sample(id=sample_id(doc, piece), text=piece_text, loss_spans=piece_spans, encoding=enc)
                piece += 1
        except DocumentError as e:
            if tally is None:
                raise
            tally.reject(doc, piece, e)


def corpus_samples(
    config: CorpusConfig, tokenizer, max_tokens: int, part: Part = "train", tally: CorpusTally | None = None, **cut
) -> Iterator[Sample]:
    """The samples of ``part`` (:func:`make_samples` keyword arguments in ``cut``). A mix is cut corpus by corpus
    and its *samples* interleaved by weight (:func:`interleave`), so a weight is a corpus's share of the
    training samples (≈ tokens, samples being mostly full), whatever the lengths of its documents. Bad and
    empty documents go to ``tally`` (see :func:`make_samples`)."""
    if config.sources is None:
        return make_samples(_documents(config, part, tally), tokenizer, max_tokens, tally=tally, **cut)
    streams = [
        (weight, make_samples(_documents(sub, part, tally, name), tokenizer, max_tokens, tally=tally, **cut))
        for name, weight, sub in config.corpora()
    ]
    return interleave(streams)


def sample_id(doc: Document, piece: int) -> str:
    """``"{index}:{piece}"``, prefixed ``"{corpus}/"`` for a document of a mix: stable across runs."""
    return f"{doc.corpus}/{doc.index}:{piece}" if doc.corpus else f"{doc.index}:{piece}"


def corpus_of(sample_id: str) -> str:
    """The corpus name a sample id carries (``"de/12:0"`` → ``"de"``); ``""`` for a single-source corpus."""
    name, sep, _ = sample_id.partition("/")
    return name if sep else ""


def _as_document(position: int, item) -> Document:
    if isinstance(item, Document):
        return item
    if isinstance(item, str):
        return Document(index=position, text=item)
    return Document(index=position, messages=tuple(item))


def _clip_spans(spans: tuple[tuple[int, int], ...], start: int, end: int) -> tuple[tuple[int, int], ...]:
    return tuple((max(s, start) - start, min(e, end) - start) for s, e in spans if s < end and e > start)


def _blocks(text: str, block_chars: int) -> Iterator[int]:
    """Start offsets of blocks of at most ``block_chars`` characters, cut after a newline (else a space)
    where possible."""
    start = 0
    while start < len(text):
        yield start
        if len(text) - start <= block_chars:
            return
        cut = text.rfind("\n", start + block_chars // 2, start + block_chars)
        if cut < 0:
            cut = text.rfind(" ", start + block_chars // 2, start + block_chars)
        start = cut + 1 if cut >= 0 else start + block_chars


def _piece_bounds(text, tokenizer, budget, max_tokens, stride, newline_cuts, block_chars, where) -> Iterator[tuple[int, int, Encoded]]:
    block_starts = list(_blocks(text, block_chars))
    for b, block_start in enumerate(block_starts):
        block_end = block_starts[b + 1] if b + 1 < len(block_starts) else len(text)
        block = text[block_start:block_end]
        for s, e, enc in _block_piece_bounds(block, tokenizer, budget, max_tokens, stride, newline_cuts, where):
            yield block_start + s, block_start + e, enc


def _block_piece_bounds(text, tokenizer, budget, max_tokens, stride, newline_cuts, where) -> Iterator[tuple[int, int, Encoded]]:
    """``(start, end, encoding)`` of each piece: the encoding (:func:`fuseflow.models.encode`) is the call that
    checked the piece fits, kept as the sample's (issue 25). A block that fits whole is tokenized once."""
    from fuseflow.models import encode  # torch stays out of config loading, which imports this module

    whole = encode(tokenizer, text)
    if len(whole.ids) <= max_tokens:  # as len(text tokens) <= budget: the special tokens are the same count
        yield 0, len(text), whole
        return
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # [L, 2]
    num_tokens = len(offsets)
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")  # [N]
    scores = cut_scores(codepoints, offsets, newline_cuts)  # [L]
    lookback = max(1, budget // 4)

    def char_at(token: int) -> int:
        return 0 if token == 0 else (len(text) if token >= num_tokens else int(offsets[token, 0]))

    s = 0
    while True:
        e = num_tokens if num_tokens - s <= budget else best_cut(scores, s + budget - lookback, s + budget, s + 1)
        while True:
            piece = encode(tokenizer, text[char_at(s) : char_at(e)])
            n = len(piece.ids)
            if n <= max_tokens:
                break
            hi = min(e, num_tokens) - (n - max_tokens)
            if hi <= s:
                raise DocumentError(where, f"cannot cut a piece of at most {max_tokens} tokens at token {s}")
            e = best_cut(scores, hi - lookback, hi, s + 1)
        yield char_at(s), char_at(e), piece
        if e >= num_tokens:
            return
        if stride is None:
            s = e
        else:
            s = best_cut(scores, s + stride - max(1, stride // 4), min(s + stride, e), s + 1)
