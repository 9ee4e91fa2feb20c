"""Reading documents from what the user brings: the built-in corpus, translated manual pages, JSONL, Parquet,
text files and HF ``datasets`` directories, each streamed; a document that cannot be read comes back with its
error (:class:`~fuseflow.corpus.documents.Document` ``error``), for the caller to set aside."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from .config import CorpusConfig
from .documents import CorpusError, Document, DocumentError, Message, check_text

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".md")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# ShareGPT / FuseChat training data (``conversations: [{from, value}]``) uses these role names.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


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
