"""Cool-Fusion decoding (Liu et al., "Cool-Fusion: Fuse Large Language Models without Training",
arXiv 2407.19807): training-free fusion of LLMs with different tokenizers, at the level of text.

One step (the paper's method, as its abstract states it: generate to a common word boundary, rerank jointly, append):

1. every source continues the shared text on its own (its own tokens, its own prompt rendering), and its
   continuation is cut at the first position that is a token boundary for every source
   (:mod:`fuseflow.ensemble.boundaries`): one candidate segment per source;
2. every source scores every candidate — the log-likelihood of the candidate's tokens given the shared
   prefix, in its own tokenization — and a rerank rule combines the scores
   (:mod:`fuseflow.ensemble.rerank`; the paper's is the lowest perplexity averaged over sources);
3. the winning segment is appended to the text of every source, and decoding goes on.

Choices made here where the paper leaves room:

- Boundaries (``boundary``): ``word`` (default) requires a common token boundary that is not between two
  word characters, as the paper's "word boundaries common to all source LLMs"; ``token`` accepts any
  common token boundary (for text without spaces).
- A source proposes by generating up to ``segment_max_tokens`` tokens in one call (one RPC for a remote
  teacher) and the segment is the shortest prefix ending at a common boundary; tokens past it are dropped.
  Without a common boundary in that window the longest prefix that decodes cleanly is proposed
  (``Segment.at_common_boundary`` is then false).
- The proposer of the winning segment keeps its own token ids; the other sources re-tokenize the text.
  With a single source this makes decoding the source's own generation, cut into segments.
- Generation ends when a segment ends with a source's EOS / end-of-turn token (an empty candidate that is
  only the EOS competes like any other: each scorer scores its own EOS after the candidate text), at a
  stop string (OpenAI semantics: not returned), or at ``max_tokens``.
- ``max_tokens`` and ``usage`` count tokens of the FIRST source's tokenizer (the ``primary``).
- Sampling (``temperature > 0``) applies to the sources' proposals, each seeded from (seed, step, source);
  the rerank choice itself is always the argmax.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from fuseflow.ensemble.boundaries import (
    common_boundary_mask,
    cut_at_token,
    first_boundary,
    own_token_mask,
    token_boundary_mask,
    word_boundary_mask,
)
from fuseflow.ensemble.rerank import RERANKERS, rerank
from fuseflow.ensemble.sources import EnsembleSource, Prompt
from fuseflow.ensemble.stops import find_stop, stop_holdback
from fuseflow.models import Encoded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeParams:
    """Per-request sampling parameters (the OpenAI request's fields)."""

    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Segment:
    """One decoding step, for debugging: who proposed what, how each candidate scored, who won."""

    step: int
    text: str
    winner: str  # the first source that proposed the winning text
    proposers: list[str]  # every source that proposed exactly this text
    final: bool  # the segment ended with an EOS / end-of-turn token
    at_common_boundary: bool
    candidates: list[dict] = field(default_factory=list)  # {"sources", "text", "final", "score", "logprob_per_token"}


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int  # in the tokenizer of ``token_source``
    completion_tokens: int
    token_source: str
    mode: str  # "cool-fusion" | "single"
    segments: list[Segment] = field(default_factory=list)
    seconds: float = 0.0

    def trace(self) -> list[dict]:
        return [asdict(s) for s in self.segments]


@dataclass
class StreamEvent:
    """``delta``: text safe to show now. The last event carries the ``completion``."""

    delta: str
    segment: Segment | None = None
    completion: Completion | None = None


@dataclass
class _Candidate:
    source: int
    text: str
    own_ids: np.ndarray  # [m] the proposer's ids for ``text`` (+ its stop id when final)
    final: bool
    at_common_boundary: bool


@dataclass
class _State:
    """One source's view of a request: its prompt rendering + the generated text, and the ids it continues."""

    text: str
    ids: np.ndarray  # [L] int32
    n_prompt: int
    ends_with_stop: bool = False  # ``ids`` end with this source's own stop id (it proposed the final segment)

    @property
    def completion_tokens(self) -> int:
        return max(0, len(self.ids) - self.n_prompt - int(self.ends_with_stop))


@dataclass
class _Request:
    prompt: Prompt
    params: DecodeParams
    seed: int
    states: list[_State]


def _step_seed(seed: int, step: int, source: int) -> int:
    # Independent, reproducible streams per (request, step, source); 63 bits fit torch and the proto's uint64.
    return int(np.random.SeedSequence([seed, step, source]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _first_true(mask: np.ndarray, default: int) -> int:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else default


class CoolFusionDecoder:
    """Cool-Fusion over ``sources`` (:class:`EnsembleSource`: in-process engines or gRPC teachers).

    Thread-safe: a request's state lives in the call, so a gateway may decode several requests at once.
    ``parallel``: call the sources from threads (default: when any source is remote; in-process engines on
    one CPU would only contend for its cores).
    """

    def __init__(
        self,
        sources: Sequence[EnsembleSource],
        rerank: str = "mean_perplexity",
        segment_max_tokens: int = 8,
        segment_min_chars: int = 1,
        parallel: bool | None = None,
        boundary: str = "word",
    ):
        if not sources:
            raise ValueError("Cool-Fusion needs at least one source (sources)")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique (sources[].name), got {names}")
        if rerank not in RERANKERS:
            raise ValueError(f"unknown rerank method {rerank!r} (decoding.rerank); choose one of {sorted(RERANKERS)}")
        if boundary not in ("word", "token"):
            raise ValueError(f"decoding.boundary must be 'word' or 'token', got {boundary!r}")
        if segment_max_tokens < 1:
            raise ValueError(f"decoding.segment_max_tokens must be >= 1, got {segment_max_tokens}")
        self.sources = list(sources)
        self.rerank = rerank
        self.segment_max_tokens = int(segment_max_tokens)
        self.segment_min_chars = int(segment_min_chars)
        self.boundary = boundary
        self.parallel = any(s.remote for s in sources) if parallel is None else bool(parallel)
        self._pool = ThreadPoolExecutor(len(sources), thread_name_prefix="cool-fusion") if self.parallel else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def _map(self, fn, n: int) -> list:
        if self._pool is None or n < 2:
            return [fn(i) for i in range(n)]
        return list(self._pool.map(fn, range(n)))

    # ------------------------------------------------------------------------------------------------------
    # Public API.
    # ------------------------------------------------------------------------------------------------------

    def generate(self, prompt: Prompt, params: DecodeParams) -> Completion:
        """Decode to the end; the completion holds the text and the per-segment trace."""
        completion = None
        for event in self.stream(prompt, params):
            completion = event.completion or completion
        return completion

    def stream(self, prompt: Prompt, params: DecodeParams) -> Iterator[StreamEvent]:
        """Decode segment by segment, yielding text as soon as no stop string can claim it."""
        params.validate()
        t0 = time.perf_counter()
        seed = params.seed if params.seed is not None else int(np.random.SeedSequence().entropy % (1 << 62))
        req = _Request(prompt, params, seed, self._initial_states(prompt))
        stops = tuple(s for s in params.stop if s)
        primary = req.states[0]
        text, emitted, finish, segments, count = "", 0, None, [], 0
        while finish is None:
            if count >= params.max_tokens:
                finish = "length"
                break
            # Room for a proposal and, when a final candidate is scored, its EOS.
            rooms = [s.max_length - len(st.ids) - 1 for s, st in zip(self.sources, req.states)]
            if min(rooms) < 1:
                finish = "length"
                break
            candidates = self._propose(req, len(segments), rooms)
            picked = self._rerank(req, candidates, len(segments)) if candidates else None
            if picked is None:
                finish = "length"
                break
            segment, winner, encodings = picked
            before_text, before_count, before_ids = text, count, primary.ids
            proposers = self._advance(req, candidates, winner, encodings)
            text += winner.text
            count = primary.completion_tokens
            if winner.final:
                finish = "stop"
            if count > params.max_tokens:
                keep = max(0, params.max_tokens - before_count)
                own = proposers.get(0)
                text = before_text + self._first_tokens(req, winner, keep, own, before_ids, encodings[0], before_text)
                count, finish = params.max_tokens, "length"
            hit = find_stop(text, stops, len(before_text))
            if hit is not None:
                text, finish = text[:hit], "stop"
                count = self._canonical_count(req, text)
            segment.text = text[len(before_text) :]
            segments.append(segment)
            safe = len(text) if finish is not None else len(text) - stop_holdback(text, stops)
            delta, emitted = text[emitted:safe], max(emitted, safe)
            if finish is None or delta:
                yield StreamEvent(delta=delta, segment=segment)
        completion = Completion(
            text=text,
            finish_reason=finish,
            prompt_tokens=primary.n_prompt,
            completion_tokens=count,
            token_source=self.sources[0].name,
            mode="cool-fusion",
            segments=segments,
            seconds=time.perf_counter() - t0,
        )
        yield StreamEvent(delta=text[emitted:], completion=completion)

    # ------------------------------------------------------------------------------------------------------
    # One step.
    # ------------------------------------------------------------------------------------------------------

    def _initial_states(self, prompt: Prompt) -> list[_State]:
        if len(prompt.texts) != len(self.sources):
            raise ValueError(f"prompt has {len(prompt.texts)} renderings for {len(self.sources)} sources")
        states = []
        for source, text in zip(self.sources, prompt.texts):
            (enc,) = source.encode([text], prompt.add_special_tokens)
            if enc.ids.size == 0:
                raise ValueError(
                    f"the prompt is empty in source {source.name!r}'s tokenization; give a non-empty prompt"
                )
            if enc.ids.size >= source.max_length:
                raise ValueError(
                    f"the prompt has {enc.ids.size} tokens of source {source.name!r}, not less than its max_length "
                    f"{source.max_length}; shorten the prompt"
                )
            states.append(_State(text=text, ids=enc.ids, n_prompt=int(enc.ids.size)))
        return states

    def _propose(self, req: _Request, step: int, rooms: list[int]) -> list[_Candidate]:
        """Each source continues its own context; each continuation is cut at its first common boundary."""
        params, states = req.params, req.states

        def generate(i: int):
            source = self.sources[i]
            return source.teacher.generate(
                states[i].ids,
                max_new_tokens=min(self.segment_max_tokens, rooms[i]),
                temperature=params.temperature,
                top_p=params.top_p,
                stop_token_ids=source.stop_token_ids,
                seed=_step_seed(req.seed, step, i),
            )

        raw = []  # (source, body ids [M], stop id [0 or 1], text, char ends [M])
        for i, g in enumerate(self._map(generate, len(self.sources))):
            source, state = self.sources[i], states[i]
            ids = np.asarray(g.token_ids, dtype=np.int32)  # [N]
            stopped = bool(ids.size) and int(ids[-1]) in source.stop_token_ids
            body, stop_id = (ids[:-1], ids[-1:]) if stopped else (ids, ids[:0])  # [M], [0 or 1]
            text = source.decode_continuation(state.ids, body)
            if not stopped:
                text = text.rstrip("\ufffd")  # a character cut between byte tokens at the window's end
            raw.append((i, body, stop_id, text, source.prefix_char_ends(state.ids, body, text)))

        # Every source's tokenization of (its text so far + each continuation): one batched call per source.
        add = req.prompt.add_special_tokens
        encs = self._map(lambda j: self.sources[j].encode([states[j].text + r[3] for r in raw], add), len(states))
        candidates = []
        for c, (i, body, stop_id, text, ends) in enumerate(raw):
            n, stopped = len(text), stop_id.size > 0
            masks = [token_boundary_mask(encs[j][c].offsets, len(states[j].text), n) for j in range(len(states))]
            masks.append(own_token_mask(ends, n))
            if self.boundary == "word":
                masks.append(word_boundary_mask(text))
            cut = first_boundary(common_boundary_mask(np.stack(masks)), self.segment_min_chars, include_end=stopped)
            at_boundary = cut is not None
            if cut is None:
                clean = ends[ends > 0]
                if stopped:
                    cut = n
                elif clean.size:
                    cut = int(clean.max())  # no common boundary in the window: the longest clean prefix
                else:
                    continue  # nothing this source generated decodes to text
            final = stopped and cut == n
            # Own tokens up to the cut (the first prefix that decodes to it; all of them for a final candidate).
            m = (_first_true(ends == cut, default=len(body) - 1) + 1) if cut > 0 else 0
            own = np.concatenate([body[:m], stop_id]) if final else body[:m]
            candidates.append(_Candidate(i, text[:cut], own.astype(np.int32), final, at_boundary or final))
        return candidates

    def _rerank(self, req: _Request, candidates: list[_Candidate], step: int):
        """Every source scores every distinct candidate in its own tokens; the rerank rule picks one.

        Returns ``(segment, winner, encodings)`` — ``encodings[j]``: source j's tokenization of its text +
        the winner — or ``None`` when no candidate fits every source's ``max_length``.
        """
        states, add = req.states, req.prompt.add_special_tokens
        keys: dict[tuple[str, bool], int] = {}
        unique: list[_Candidate] = []
        for c in candidates:
            if (c.text, c.final) not in keys:
                keys[(c.text, c.final)] = len(unique)
                unique.append(c)

        def score(j: int):
            source, state = self.sources[j], states[j]
            encs = source.encode([state.text + c.text for c in unique], add)
            sums = np.full(len(unique), -np.inf)  # [C]
            counts = np.ones(len(unique), dtype=np.int64)  # [C]
            seqs, firsts, which = [], [], []
            for u, (c, enc) in enumerate(zip(unique, encs)):
                seq = np.concatenate([enc.ids, [_eos_of(source)]]).astype(np.int32) if c.final else enc.ids
                if len(seq) > source.max_length:
                    continue  # cannot be scored by this source: the candidate is out
                # The candidate's tokens are those ending after the shared prefix (which ends on a common boundary).
                firsts.append(_first_true(enc.offsets[:, 1] > len(state.text), default=enc.ids.size))
                seqs.append(seq)
                which.append(u)
            for u, rows in zip(which, _candidate_logprobs(source.teacher, seqs, firsts)):
                sums[u], counts[u] = rows.sum(), rows.size
            return sums, counts, encs

        results = self._map(score, len(self.sources))
        sums = np.stack([r[0] for r in results])  # [S, C]
        counts = np.stack([r[1] for r in results])  # [S, C]
        nbytes = np.array([len(c.text.encode("utf-8")) for c in unique])  # [C]
        ok = np.flatnonzero(np.isfinite(sums).all(axis=0))  # [C'] candidates every source could score
        if ok.size == 0:
            return None
        best, ok_scores = rerank(self.rerank, sums[:, ok], counts[:, ok], nbytes[ok])
        scores = np.full(len(unique), -np.inf)
        scores[ok] = ok_scores
        win = int(ok[best])
        winner = unique[win]
        names = [s.name for s in self.sources]

        def proposed(u: _Candidate) -> list[str]:
            return [names[c.source] for c in candidates if (c.text, c.final) == (u.text, u.final)]

        segment = Segment(
            step=step,
            text=winner.text,
            winner=names[winner.source],
            proposers=proposed(winner),
            final=winner.final,
            at_common_boundary=winner.at_common_boundary,
            candidates=[
                {
                    "sources": proposed(u),
                    "text": u.text,
                    "final": u.final,
                    "score": float(scores[i]),
                    "logprob_per_token": {names[j]: float(sums[j, i] / counts[j, i]) for j in range(len(names))},
                }
                for i, u in enumerate(unique)
            ],
        )
        return segment, winner, [r[2][win] for r in results]

    def _advance(self, req: _Request, candidates, winner: _Candidate, encodings: list[Encoded]) -> dict:
        """Append the winner for every source: its proposers keep their own ids, the others re-tokenize."""
        own = {c.source: c for c in candidates if (c.text, c.final) == (winner.text, winner.final)}
        for j, state in enumerate(req.states):
            if j in own:
                state.ids = np.concatenate([state.ids, own[j].own_ids]).astype(np.int32)
                state.ends_with_stop = own[j].final
            else:
                state.ids, state.ends_with_stop = encodings[j].ids, False
            state.text += winner.text
        return own

    # ------------------------------------------------------------------------------------------------------
    # Token counts in the primary source (max_tokens, usage).
    # ------------------------------------------------------------------------------------------------------

    def _first_tokens(self, req, winner, keep, own, before_ids, encoding: Encoded, before_text: str) -> str:
        """The text of the winning segment's first ``keep`` primary tokens."""
        primary = self.sources[0]
        if own is not None:  # the primary proposed it: its own ids are the truth
            text = primary.decode_continuation(before_ids, own.own_ids[:keep])
            if winner.text.startswith(text):
                return text
        start = len(req.prompt.texts[0]) + len(before_text)
        cut = cut_at_token(encoding.offsets, start, keep)
        return winner.text if cut is None else winner.text[:cut]

    def _canonical_count(self, req: _Request, text: str) -> int:
        if not text:
            return 0
        (enc,) = self.sources[0].encode([req.prompt.texts[0] + text], req.prompt.add_special_tokens)
        return int((enc.offsets[:, 1] > len(req.prompt.texts[0])).sum())


def _candidate_logprobs(teacher, seqs: list[np.ndarray], firsts: list[int]) -> list[np.ndarray]:
    """Per sequence, the logprobs (float64) of its tokens from ``max(first, 1)`` on: the candidate's tokens
    (token 0 has no prediction). An in-process hf engine scores only those tails on its prefix KV cache
    (``score_tails``); any other teacher scores the whole sequences (``score_ids``)."""
    if not seqs:
        return []
    starts = [max(k, 1) for k in firsts]
    if hasattr(teacher, "score_tails"):
        return [np.asarray(r, dtype=np.float64) for r in teacher.score_tails(seqs, starts)]
    return [  # row t predicts token t + 1
        np.asarray(s.gold_logprobs, dtype=np.float64)[start - 1 :]
        for s, start in zip(teacher.score_ids(seqs, top_k=1), starts)
    ]


def _eos_of(source: EnsembleSource) -> int:
    eos = source.tokenizer.eos_token_id
    return int(eos) if isinstance(eos, int) else int(source.stop_token_ids[0])


# ----------------------------------------------------------------------------------------------------------
# The plain single-model mode, for comparison.
# ----------------------------------------------------------------------------------------------------------


def stream_single(
    source: EnsembleSource, prompt_text: str, add_special_tokens: bool, params: DecodeParams
) -> Iterator[StreamEvent]:
    """One source alone: one ``generate`` call, same stop rules and token accounting as the ensemble."""
    params.validate()
    t0 = time.perf_counter()
    (enc,) = source.encode([prompt_text], add_special_tokens)
    if enc.ids.size == 0:
        raise ValueError(f"the prompt is empty in source {source.name!r}'s tokenization; give a non-empty prompt")
    room = source.max_length - enc.ids.size
    if room < 1:
        raise ValueError(
            f"the prompt has {enc.ids.size} tokens of source {source.name!r}, not less than its max_length "
            f"{source.max_length}; shorten the prompt"
        )
    ids = np.zeros(0, dtype=np.int32)
    if params.max_tokens > 0:
        seed = params.seed if params.seed is not None else int(np.random.SeedSequence().entropy % (1 << 62))
        g = source.teacher.generate(
            enc.ids,
            max_new_tokens=min(params.max_tokens, room),
            temperature=params.temperature,
            top_p=params.top_p,
            stop_token_ids=source.stop_token_ids,
            seed=_step_seed(seed, 0, 0),
        )
        ids = np.asarray(g.token_ids, dtype=np.int32)  # [N]
    stopped = bool(ids.size) and int(ids[-1]) in source.stop_token_ids
    body = ids[:-1] if stopped else ids  # [M]
    text = source.decode_continuation(enc.ids, body)
    count = int(body.size)
    finish = "stop" if stopped else "length"
    hit = find_stop(text, tuple(s for s in params.stop if s))
    if hit is not None:
        text, finish = text[:hit], "stop"
        (full,) = source.encode([prompt_text + text], add_special_tokens)
        count = int((full.offsets[:, 1] > len(prompt_text)).sum()) if text else 0
    completion = Completion(
        text=text,
        finish_reason=finish,
        prompt_tokens=int(enc.ids.size),
        completion_tokens=count,
        token_source=source.name,
        mode="single",
        seconds=time.perf_counter() - t0,
    )
    yield StreamEvent(delta=text, completion=completion)


def generate_single(
    source: EnsembleSource, prompt_text: str, add_special_tokens: bool, params: DecodeParams
) -> Completion:
    (event,) = list(stream_single(source, prompt_text, add_special_tokens, params))
    return event.completion
