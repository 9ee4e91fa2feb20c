"""Small task sets with checkable answers, generated from a seed: no dataset download, same problems on
every machine. Each task is registered by name (``eval.task``) and gives problems, a few-shot prompt, the
stop strings that end an answer and the answer check.

``arithmetic``: one- and two-step word problems in the style of GSM8K (Cobbe et al. 2021, the benchmark on
which Cool-Fusion reports its largest gains), small numbers, integer answers, few-shot prompt
``Question: … / Answer: N``. ``arithmetic-1step`` keeps the one-step templates only (for small models).

``next-word``: a task where small sources differ (issue 16): predict the next word of a held-out passage of
the mixed corpus (:mod:`fuseflow.corpus`): English technical text (the built-in corpus, Python's own
documentation, where SmolLM2 leads) and Debian's translated manual pages (``manpages:LANG``, where Gemma-3's
multilingual training leads). The prompt is the passage up to the end of a word; the answer is the next word
(letters only, at least two); a system is right when the first word it writes is that word. Each problem is
tagged with its language (``Problem.group``), reported on its own.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fuseflow.registry import Registry


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: int | str
    group: str = ""  # reported on its own (the language of a next-word passage)


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[..., list[Problem]]  # (n, seed, **options) → problems
    stop: tuple[str, ...]
    kind: str = "arithmetic"  # "arithmetic": few-shot Question/Answer, integer answers; "next-word"

    def answer_end(self, text: str) -> int | None:
        """Where the answer in ``text`` is decided (generation can end there, the check unchanged), or ``None``
        while more text could change it. Next-word: after the first word once a non-word character follows it,
        or at a first character that is neither space nor a word character (no first word: wrong whatever
        follows). Arithmetic ends at its stop strings."""
        if self.kind != "next-word":
            return None
        m = _DECIDED.match(text)
        return m.end() if m else None

    def problems(self, n: int, seed: int, **options) -> list[Problem]:
        return self.make(n, seed, **options)

    def shots(self, k: int, seed: int, **options) -> list[Problem]:
        """``k`` solved examples, drawn from a stream disjoint from :meth:`problems`' for the same seed."""
        if self.kind != "arithmetic":
            return []  # a passage is its own prompt
        return self.make(k, seed + 1_000_003, **options) if k else []

    def prompt(self, problem: Problem, shots: list[Problem]) -> str:
        if self.kind == "next-word":
            return problem.question
        solved = "".join(f"Question: {s.question}\nAnswer: {s.answer}\n\n" for s in shots)
        return f"{solved}Question: {problem.question}\nAnswer:"

    @staticmethod
    def extract(text: str) -> int | None:
        """The first integer in the answer text (``-3``, ``1,200``), or ``None``."""
        m = re.search(r"-?\d[\d,]*", text)
        if m is None:
            return None
        digits = m.group(0).replace(",", "")
        return int(digits) if digits.lstrip("-").isdigit() else None

    @staticmethod
    def first_word(text: str) -> str | None:
        """The first word of a continuation (after its leading whitespace), or ``None``."""
        m = _FIRST_WORD.match(text)
        return m.group(1) if m else None

    def correct(self, text: str, problem: Problem) -> bool:
        if self.kind == "next-word":
            return self.first_word(text) == problem.answer
        return self.extract(text) == problem.answer


TASKS: Registry[Task] = Registry("task", field="eval.task")


_FIRST_WORD = re.compile(r"\s*(\w+)")
_DECIDED = re.compile(r"\s*(?:\w+(?=\W)|[^\w\s])")  # a whole first word, or no first word at all


def register_task(name: str, stop: tuple[str, ...] = ("\n",), kind: str = "arithmetic"):
    """Register ``make(n, seed, **options) -> [Problem]`` as task ``name`` (the ``eval.task`` config field)."""

    def wrap(make: Callable[..., list[Problem]]):
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        TASKS.register(name, Task(name, make, stop, kind))
        return make

    return wrap


def get_task(name: str) -> Task:
    return TASKS.lookup(name)


# ----------------------------------------------------------------------------------------------------------
# Arithmetic word problems.
# ----------------------------------------------------------------------------------------------------------

_NAMES = ("Tom", "Anna", "Ravi", "Mei", "Lucas", "Sara", "Omar", "Lena", "Kofi", "Ines")
_ITEMS = ("apples", "pencils", "marbles", "stickers", "books", "coins", "cards", "shells")


def _one_step(rng: np.random.Generator, name: str, item: str) -> tuple[str, int]:
    kind = rng.integers(3)
    if kind == 0:
        a, b = (int(x) for x in rng.integers(1, 20, size=2))
        return f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?", a + b
    if kind == 1:
        a = int(rng.integers(5, 30))
        b = int(rng.integers(1, a))
        return f"{name} had {a} {item} and gave {b} away. How many {item} does {name} have left?", a - b
    a, b = (int(x) for x in rng.integers(2, 10, size=2))
    return f"{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?", a * b


def _two_step(rng: np.random.Generator, name: str, item: str) -> tuple[str, int]:
    a, b = (int(x) for x in rng.integers(2, 20, size=2))
    c = int(rng.integers(1, a + b))
    return (
        f"{name} has {a} {item}, buys {b} more and then gives {c} to a friend. How many {item} does {name} have now?",
        a + b - c,
    )


def _arithmetic(n: int, seed: int, two_step_share: float, **_) -> list[Problem]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        name, item = _NAMES[rng.integers(len(_NAMES))], _ITEMS[rng.integers(len(_ITEMS))]
        q, a = (_two_step if rng.random() < two_step_share else _one_step)(rng, name, item)
        out.append(Problem(f"arith-{seed}-{i}", q, a))
    return out


@register_task("arithmetic")
def arithmetic(n: int, seed: int, **_) -> list[Problem]:
    """One-step (+, −, ×) and two-step (+ then −) problems, a third of them two-step."""
    return _arithmetic(n, seed, two_step_share=1 / 3)


@register_task("arithmetic-1step")
def arithmetic_one_step(n: int, seed: int, **_) -> list[Problem]:
    """One-step problems only."""
    return _arithmetic(n, seed, two_step_share=0.0)


# ----------------------------------------------------------------------------------------------------------
# Next-word prediction on held-out passages of the mixed corpus.
# ----------------------------------------------------------------------------------------------------------

# A target: a space, then a word of letters (two or more), then no word character.
_TARGET = re.compile(r" ([^\W\d_]{2,})(?!\w)")


def corpus_source_of(language: str) -> str:
    """``en`` → the built-in corpus (English technical text); any other code → ``manpages:LANG``."""
    return "builtin" if language == "en" else f"manpages:{language}"


def passage_problems(text: str, doc_id: str, group: str, context_chars: int, rng: np.random.Generator,
                     k: int) -> list[Problem]:
    """Up to ``k`` problems from one document: at random target positions past ``context_chars``, the
    ``context_chars`` before the target's space (starting at a word) and the target word."""
    starts = np.array([m.start() for m in _TARGET.finditer(text) if m.start() >= context_chars], dtype=np.int64)
    if starts.size == 0:
        return []
    picks = np.sort(rng.choice(starts, size=min(k, starts.size), replace=False))
    out = []
    for pos in picks.tolist():
        context = text[pos - context_chars : pos]
        first_space = re.search(r"\s", context)
        context = context[first_space.end() :] if first_space else context  # start on a whole word
        if not context.strip():
            continue
        word = _TARGET.match(text, pos).group(1)
        out.append(Problem(f"{doc_id}@{pos}", context, word, group))
    return out


SPLITS = ("test", "dev")


def split_documents(language: str, seed: int, split: str, held_out_documents: int | None = None,
                    held_out_fraction: float = 0.2, corpora: Mapping[str, str] | None = None) -> list:
    """The held-out documents of ``language``'s corpus in ``split`` (with text): the corpus split of
    :func:`fuseflow.corpus.split_held_out` (``held_out_documents`` per corpus, else ``held_out_fraction``),
    its documents alternating between ``test`` (even positions) and ``dev`` (odd). ``corpora``: language →
    corpus source (a JSONL file …) where it is not :func:`corpus_source_of` the code."""
    from fuseflow.corpus import CorpusConfig, iter_documents

    if split not in SPLITS:
        raise ValueError(f"next-word: split must be one of {SPLITS} (eval.split), got {split!r}")
    split_by = {"held_out_documents": held_out_documents} if held_out_documents else {"held_out_fraction": held_out_fraction}
    cfg = CorpusConfig(source=(corpora or {}).get(language) or corpus_source_of(language), seed=seed, **split_by)
    return [doc for k, doc in enumerate(iter_documents(cfg, "held_out"))
            if k % 2 == SPLITS.index(split) and doc.text and doc.text.strip()]


@register_task("next-word", stop=(), kind="next-word")
def next_word(n: int, seed: int, languages: Sequence[str] = ("en", "de", "fr", "es"), context_chars: int = 600,
              held_out_fraction: float = 0.2, per_document: int = 2, split: str = "test",
              held_out_documents: int | None = None, corpora: Mapping[str, str] | None = None,
              **_) -> list[Problem]:
    """``n`` problems per language from the held-out documents of that language's corpus (the split of
    :func:`fuseflow.corpus.split_held_out`, never training text), at most ``per_document`` per document
    (more where the split has fewer than ``n / per_document`` documents).

    ``split``: the held-out documents alternate between ``test`` (even positions in the held-out stream: the
    reported figures) and ``dev`` (odd positions: for choosing a decoding setting), so the two never share a
    passage, whatever ``n``.

    ``held_out_documents``: hold out this many documents per corpus (the run config's ``corpus.held_out_documents``,
    same seed: the same documents) instead of ``held_out_fraction``; for models fine-tuned on the rest of the
    corpus (the experts of ``bench/experts.py``), whose training never read them. ``corpora``: language → corpus
    source instead of the code's own (``bench/experts.py --write-unread`` writes the documents no expert read)."""
    out = []
    for language in languages:
        rng = np.random.default_rng([seed, len(out)])
        docs = [doc for doc in split_documents(language, seed, split, held_out_documents, held_out_fraction, corpora)
                if len(doc.text) > context_chars + 20]
        # A corpus with few, long documents (the built-in one holds out about ten) gives more per document.
        k = max(per_document, -(-n // max(len(docs), 1)))
        problems: list[Problem] = []
        for doc in docs:
            problems += passage_problems(doc.text, f"{language}/{doc.index}", language, context_chars, rng, k)
            if len(problems) >= n:
                break
        if len(problems) < n:
            log.warning("next-word: only %d held-out problems in %s (asked for %d)", len(problems), language, n)
        out += problems[:n]
    return out
