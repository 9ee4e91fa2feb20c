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


The package, by concern: :mod:`~fuseflow.corpus.config` (the ``corpus:`` section), :mod:`~fuseflow.corpus.documents`
(documents, errors, the tally, sample ids), :mod:`~fuseflow.corpus.readers` (the five formats),
:mod:`~fuseflow.corpus.split` (train / held-out), :mod:`~fuseflow.corpus.chat` (chat templates) and
:mod:`~fuseflow.corpus.cut` (samples). Its public names are importable from ``fuseflow.corpus``.
"""

from .chat import render_chat
from .config import CorpusConfig, CorpusSourceConfig
from .cut import best_cut, corpus_samples, cut_scores, make_samples, newline_cuts_are_clean
from .documents import (CorpusError, CorpusTally, Document, DocumentError, Message, Rejected, check_text, corpus_of,
                        interleave, sample_id)
from .readers import count_documents, json_error
from .split import Part, evaluable, held_out_threshold, iter_documents, split_held_out, split_keys

__all__ = [
    "CorpusConfig", "CorpusError", "CorpusSourceConfig", "CorpusTally", "Document", "DocumentError", "Message", "Part",
    "Rejected", "best_cut", "check_text", "corpus_of", "corpus_samples", "count_documents", "cut_scores", "evaluable",
    "held_out_threshold", "interleave", "iter_documents", "json_error", "make_samples", "newline_cuts_are_clean",
    "render_chat", "sample_id", "split_held_out", "split_keys",
]
