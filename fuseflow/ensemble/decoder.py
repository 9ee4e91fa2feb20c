"""Cool-Fusion decoding (Liu et al., "Cool-Fusion: Fuse Large Language Models without Training",
arXiv 2407.19807): training-free fusion of LLMs with different tokenizers, at the level of text.

One step, as the paper does it (issue 16):

1. every source continues the shared text on its own (its own tokens, its own prompt rendering) UNTIL its
   text ends on a word boundary that every source's tokenizer shares (:mod:`fuseflow.ensemble.boundaries`):
   the check runs after each generated token, inside the generation (the engine's ``stop_when``; its KV
   cache is kept in the engine's prefix cache), and the proposal is the text up to that boundary;
2. if every source proposed the same text there is nothing to choose and nothing is scored; otherwise every
   source scores every distinct candidate — the log-likelihood of the candidate's tokens after its context,
   in its own tokenization — all candidates in one batched forward on its prefix cache
   (``score_continuations``), and a rerank rule combines the scores (:mod:`fuseflow.ensemble.rerank`; the
   paper's is the lowest perplexity averaged over sources);
3. the winning segment is appended to the text of every source, and decoding goes on.

Choices made here where the paper leaves room:

- Boundaries (``boundary``): ``word`` (default) requires a common token boundary that is not between two
  word characters; ``token`` accepts any common token boundary (for text without spaces). Under both, a
  position right after whitespace is no boundary: whitespace joins the next word. A boundary is only
  known once the next character is (one token of look-ahead): that token is not thrown away but kept as
  the source's *carry*, the start of its next proposal if its candidate wins.
- The max-segment guard: past ``segment_max_tokens`` tokens without a word boundary, any common token
  boundary not right after whitespace is accepted (never a cut inside any source's token); past
  ``4 × segment_max_tokens`` the longest clean prefix is proposed (``Segment.at_common_boundary`` is then
  false).
- A teacher without ``stop_when`` (a served teacher, vLLM) proposes in windows of ``segment_max_tokens``
  tokens, checked after each window; the tokens past the cut are its carry as well.
- A proposer scores its own candidate with the logprobs it generated it with (the same numbers a scoring
  forward gives, temperature 1); it keeps its own token ids when it wins, the other sources append their
  own tokenization of the segment. With a single source this makes decoding the source's own generation.
- Credit: every source that proposed the winning text is credited (``Segment.proposers``);
  ``Segment.winner`` is the first of them, ``Segment.contested`` says whether candidates were compared.
- Generation ends when a segment ends with a source's EOS / end-of-turn token (an empty candidate that is
  only the EOS competes like any other), at a stop string (OpenAI semantics: not returned), or at
  ``max_tokens``. ``max_tokens`` and ``usage`` count tokens of the FIRST source's tokenizer (the primary).
- Sampling (``temperature > 0``) applies to the sources' proposals, each seeded from (seed, step, source,
  call); the rerank choice itself is always the argmax.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from fuseflow.ensemble.boundaries import (
    common_boundary_mask,
    cut_at_token,
    first_boundary,
    own_token_mask,
    space_boundary_mask,
    token_boundary_mask,
    word_boundary_mask,
)
from fuseflow.ensemble.rerank import RERANKERS, rerank
from fuseflow.ensemble.sources import EnsembleSource, Prompt
from fuseflow.ensemble.stops import find_stop, stop_holdback

log = logging.getLogger(__name__)

# Context ids decoded in front of a proposal (as EnsembleSource.decode_continuation), so that a leading
# SentencePiece space is kept.
_DECODE_TAIL = 8
# The last-resort cut: a proposal longer than this many times segment_max_tokens is cut at its longest clean
# prefix even without a common boundary.
_HARD_CAP_FACTOR = 4
# The single-model path of a teacher without ``stop_when`` generates in pieces of this many tokens.
_SINGLE_CHUNK_TOKENS = 16


@dataclass(frozen=True)
class DecodeParams:
    """Per-request sampling parameters (the OpenAI request's fields)."""

    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Not an OpenAI field: a function of the text generated so far giving the index where it ends (as a stop
    # string's start does: the text is cut there) or None. It must be stable: once it gives an index, a longer
    # text gives the same. eval-ensemble ends an answer with it as soon as the answer is decided.
    stop_at: Callable[[str], int | None] | None = None

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
    proposers: list[str]  # every source that proposed exactly this text (each is credited)
    final: bool  # the segment ended with an EOS / end-of-turn token
    at_common_boundary: bool
    contested: bool = False  # distinct candidates were scored and compared (else all proposed the same text)
    # {"sources", "text", "final", "score", "logprob_per_token"} (+ "logprob_sum", "token_count", "bytes" per
    # source when contested)
    candidates: list[dict] = field(default_factory=list)


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
    own_logprobs: np.ndarray  # [m] the proposer's logprobs of ``own_ids``, from its generation
    final: bool
    at_common_boundary: bool
    carry: np.ndarray  # [c] the proposer's ids generated past the cut: its next proposal starts with them
    carry_logprobs: np.ndarray  # [c]

    @property
    def key(self) -> tuple[str, bool]:
        return self.text, self.final


@dataclass
class _State:
    """One source's view of a request: its prompt rendering + the generated text, and the ids it continues."""

    text: str
    ids: np.ndarray  # [L] int32
    n_prompt: int
    ends_with_stop: bool = False  # ``ids`` end with this source's own stop id (it proposed the final segment)
    carry: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))  # [c] continue ``ids``
    carry_logprobs: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))  # [c]

    @property
    def completion_tokens(self) -> int:
        return max(0, len(self.ids) - self.n_prompt - int(self.ends_with_stop))


@dataclass
class _Request:
    prompt: Prompt
    params: DecodeParams
    seed: int
    states: list[_State]


def _step_seed(seed: int, step: int, source: int, call: int = 0) -> int:
    # Independent, reproducible streams per (request, step, source, call); 63 bits fit torch and the proto's uint64.
    return int(np.random.SeedSequence([seed, step, source, call]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def supports_stop_when(teacher) -> bool:
    """Whether ``teacher.generate`` takes a ``stop_when`` callback (the in-process ``hf`` engine does)."""
    try:
        return "stop_when" in inspect.signature(teacher.generate).parameters
    except (TypeError, ValueError):
        return False


class _Proposal:
    """One source's proposal in one step, growing token by token: its ids past the context, their text, and
    where it may be cut. ``cut`` is called after each token (from inside the generation when the teacher
    takes ``stop_when``), so it does cheap checks first and tokenizes with every source only when the
    generator's own tokens and the text allow a boundary."""

    def __init__(self, decoder: "CoolFusionDecoder", req: _Request, i: int):
        self.decoder, self.req, self.i = decoder, req, i
        self.source = decoder.sources[i]
        self.stops = set(self.source.stop_token_ids)
        self.tail = [int(x) for x in req.states[i].ids[-_DECODE_TAIL:]]
        self.base = self.source.decode_batch([self.tail])[0]
        self.body: list[int] = []  # generated ids, the stop id excluded
        self.stop_id: list[int] = []  # [0 or 1]
        self.pieces: list[str] = []  # pieces[m]: text of body[: m + 1]
        self.logprobs: list[float] = []  # one per id of body + stop_id, as they came
        self._memo: tuple | None = None  # (len(body), stopped, last) → cut: the callback and the loop ask twice

    @property
    def ids(self) -> list[int]:
        return self.body + self.stop_id

    @property
    def stopped(self) -> bool:
        return bool(self.stop_id)

    def extend(self, ids: Sequence[int]) -> None:
        for t in (int(x) for x in ids):
            if self.stopped:
                raise RuntimeError(f"source {self.source.name!r} generated past its stop token")
            if t in self.stops:
                self.stop_id.append(t)
                continue
            self.body.append(t)
            (text,) = self.source.decode_batch([self.tail + self.body])
            self.pieces.append(text[len(self.base) :] if text.startswith(self.base) else text)

    def text(self) -> str:
        if not self.pieces:
            return ""
        # A character cut between byte tokens decodes to U+FFFD until its last byte comes.
        return self.pieces[-1] if self.stopped else self.pieces[-1].rstrip("\ufffd")

    def char_ends(self, text: str) -> np.ndarray:
        """[M]: the length of each ``body[: m + 1]``'s text when it is a clean prefix of ``text``, else -1."""
        return np.array(
            [len(p) if p and not p.endswith("\ufffd") and text.startswith(p) else -1 for p in self.pieces],
            dtype=np.int64,
        )

    def cut(self, last: bool) -> tuple[int, bool] | None:
        """``(position, at_common_boundary)`` where the proposal may end, or ``None`` to keep generating.
        ``last``: no more tokens will come (then the end, or the longest clean prefix, is taken)."""
        key = (len(self.body), self.stopped, last)
        if self._memo is None or self._memo[0] != key:
            self._memo = (key, self._cut(last))
        return self._memo[1]

    def _cut(self, last: bool) -> tuple[int, bool] | None:
        d = self.decoder
        text = self.text()
        n = len(text)
        ends = self.char_ends(text)
        # Whitespace joins the next word under every rule, the guard's included (a lone " " before SmolLM2's
        # split digits is a common token boundary): only the last-resort cut below may end on whitespace.
        own = own_token_mask(ends, n) & space_boundary_mask(text)  # [n + 1]
        strict = own & word_boundary_mask(text) if d.boundary == "word" else own
        # The max-segment guard: past segment_max_tokens, any common token boundary (never inside a token).
        guard = len(self.body) >= d.segment_max_tokens
        include_end = self.stopped
        lo = max(1, d.segment_min_chars)
        hi = n + 1 if include_end else n  # without look-ahead the end is no evidence of a boundary
        allowed = own if guard else strict
        if allowed[lo:hi].any():
            states, add = self.req.states, self.req.prompt.add_special_tokens
            masks = []
            for j, source in enumerate(d.sources):
                (enc,) = source.encode([states[j].text + text], add)
                masks.append(token_boundary_mask(enc.offsets, len(states[j].text), n))
            common = common_boundary_mask(np.stack(masks))  # [n + 1]
            for rules in (strict, own) if guard else (strict,):
                p = first_boundary(common & rules, lo, include_end=include_end)
                if p is not None:
                    return p, True
        if not last:
            return None
        if self.stopped:
            return n, True  # the source ended: the end of its text is the end of the completion
        clean = ends[ends > 0]
        return (int(clean.max()), False) if clean.size else None

    def candidate(self, position: int, at_boundary: bool) -> _Candidate:
        text = self.text()
        final = self.stopped and position == len(text)
        ends = self.char_ends(text)
        hits = np.flatnonzero(ends == position)
        m = int(hits[0]) + 1 if position > 0 and hits.size else (len(self.body) if final else 0)
        ids = np.asarray(self.ids, dtype=np.int32)  # [M (+ 1)]
        lps = np.asarray(self.logprobs, dtype=np.float32)  # [M (+ 1)] (NaN where a teacher gave none)
        if final:  # own ids: all of the body and the stop id; nothing carries over
            own, own_lp, carry, carry_lp = ids, lps, ids[:0], lps[:0]
        else:
            own, own_lp, carry, carry_lp = ids[:m], lps[:m], ids[m:], lps[m:]
        return _Candidate(self.i, text[:position], own.astype(np.int32), own_lp.astype(np.float32), final,
                          at_boundary or final, carry.astype(np.int32), carry_lp.astype(np.float32))


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
        RERANKERS.lookup(rerank)
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
        self._stop_when = [supports_stop_when(s.teacher) for s in self.sources]
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
            segment, winner, tokens = picked
            before_text, before_count, before_ids = text, count, primary.ids
            self._advance(req, candidates, winner, tokens)
            text += winner.text
            count = primary.completion_tokens
            if winner.final:
                finish = "stop"
            if count > params.max_tokens:
                keep = max(0, params.max_tokens - before_count)
                text = before_text + self._first_tokens(req, winner, keep, before_ids, before_text)
                count, finish = params.max_tokens, "length"
            hit = _first_stop(text, stops, params.stop_at, len(before_text))
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
        """Each source continues its own context until its text ends on a common boundary."""
        return [c for c in self._map(lambda i: self._propose_one(req, step, i, rooms[i]), len(self.sources)) if c]

    def _propose_one(self, req: _Request, step: int, i: int, room: int) -> _Candidate | None:
        source, state, params = self.sources[i], req.states[i], req.params
        proposal = _Proposal(self, req, i)
        proposal.extend(state.carry)  # what it generated past the last cut, if it won that step
        proposal.logprobs.extend(state.carry_logprobs.tolist())
        limit = min(_HARD_CAP_FACTOR * self.segment_max_tokens, room + 1)  # room + 1: room kept for a scored EOS
        cut, call = proposal.cut(last=False), 0
        while cut is None:
            budget = limit - len(proposal.ids)
            if proposal.stopped or budget <= 0:
                cut = proposal.cut(last=True)
                break
            seen = len(proposal.ids)
            kw = {}
            if self._stop_when[i]:

                def stop_when(new_ids: np.ndarray, seen=seen) -> bool:
                    proposal.extend(new_ids[len(proposal.ids) - seen :])
                    return proposal.cut(last=False) is not None

                kw["stop_when"] = stop_when
            else:
                budget = min(budget, self.segment_max_tokens)  # a window, checked after it comes back
            g = source.teacher.generate(
                np.concatenate([state.ids, np.asarray(proposal.ids, dtype=np.int32)]),
                max_new_tokens=budget,
                temperature=params.temperature,
                top_p=params.top_p,
                stop_token_ids=source.stop_token_ids,
                seed=_step_seed(req.seed, step, i, call),
                **kw,
            )
            new = np.asarray(g.token_ids, dtype=np.int32)  # [N]
            proposal.extend(new[len(proposal.ids) - seen :])  # what stop_when did not see (a stop token)
            lps = np.asarray(g.logprobs, dtype=np.float32)
            proposal.logprobs.extend(lps.tolist() if lps.size == new.size else [float("nan")] * new.size)
            call += 1
            if new.size == 0:
                cut = proposal.cut(last=True)
                break
            cut = proposal.cut(last=False)
        if cut is None:
            return None  # nothing this source generated decodes to text
        return proposal.candidate(*cut)

    def _tokens(self, req: _Request, j: int, candidates: list[_Candidate]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Source ``j``'s ``(context, tokens)`` for each candidate: its tokenization of its text + the candidate,
        split where the candidate starts; the context is its own ids when the split is clean there (the usual
        case: the candidate starts on a common boundary), else the tokenization's own prefix. A final
        candidate's tokens end with the source's EOS."""
        source, state = self.sources[j], req.states[j]
        encs = source.encode([state.text + c.text for c in candidates], req.prompt.add_special_tokens)
        out = []
        for c, enc in zip(candidates, encs):
            after = np.flatnonzero(enc.offsets[:, 1] > len(state.text))  # tokens ending inside the candidate
            first = int(after[0]) if after.size else enc.ids.size
            clean = first == enc.ids.size or enc.offsets[first, 0] >= len(state.text)
            context = state.ids if clean else enc.ids[:first]
            tokens = enc.ids[first:]
            if c.final:
                tokens = np.append(tokens, _eos_of(source))
            out.append((context, tokens.astype(np.int32)))
        return out

    def _rerank(self, req: _Request, candidates: list[_Candidate], step: int):
        """Every source scores every distinct candidate in its own tokens; the rerank rule picks one.

        Returns ``(segment, winner, tokens)`` — ``tokens[j]``: source j's ``(context, tokens)`` of the winner,
        ``None`` where j proposed it — or ``None`` when no candidate fits every source's ``max_length``.
        """
        names = [s.name for s in self.sources]
        unique: list[_Candidate] = []
        for c in candidates:
            if c.key not in {u.key for u in unique}:
                unique.append(c)
        proposers = {u.key: [c.source for c in candidates if c.key == u.key] for u in unique}

        def own(j: int, u: _Candidate) -> _Candidate | None:
            return next((c for c in candidates if c.source == j and c.key == u.key), None)

        if len(unique) == 1:  # every source proposed the same text (or only one proposed): nothing to score
            (winner,) = unique
            tokens = [None if own(j, winner) else self._tokens(req, j, [winner])[0] for j in range(len(self.sources))]
            if any(t is not None and len(t[0]) + len(t[1]) > self.sources[j].max_length for j, t in enumerate(tokens)):
                return None
            segment = Segment(step, winner.text, names[winner.source], [names[k] for k in proposers[winner.key]],
                              winner.final, winner.at_common_boundary, contested=False,
                              candidates=[{"sources": [names[k] for k in proposers[winner.key]], "text": winner.text,
                                           "final": winner.final, "score": None, "logprob_per_token": {}}])
            return segment, winner, tokens

        def score(j: int):
            source = self.sources[j]
            toks = self._tokens(req, j, unique)
            sums = np.full(len(unique), -np.inf)  # [C]
            counts = np.ones(len(unique), dtype=np.int64)  # [C]
            todo = []
            for u, cand in enumerate(unique):
                mine = own(j, cand)
                if mine is not None and np.isfinite(mine.own_logprobs).all() and mine.own_logprobs.size == mine.own_ids.size:
                    # The proposer's own tokens, scored when it generated them.
                    sums[u], counts[u] = float(mine.own_logprobs.astype(np.float64).sum()), max(mine.own_ids.size, 1)
                    continue
                context, tokens = toks[u]
                if len(context) + len(tokens) > source.max_length or tokens.size == 0:
                    continue  # cannot be scored by this source: the candidate is out
                todo.append(u)
            for u, rows in zip(todo, _continuation_logprobs(source.teacher, [toks[u] for u in todo])):
                sums[u], counts[u] = rows.sum(), rows.size
            return sums, counts, toks

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
        segment = Segment(
            step=step,
            text=winner.text,
            winner=names[winner.source],
            proposers=[names[k] for k in proposers[winner.key]],
            final=winner.final,
            at_common_boundary=winner.at_common_boundary,
            contested=True,
            candidates=[
                {
                    "sources": [names[k] for k in proposers[u.key]],
                    "text": u.text,
                    "final": u.final,
                    "score": float(scores[i]),
                    "logprob_per_token": {names[j]: float(sums[j, i] / counts[j, i]) for j in range(len(names))},
                    # What any rerank rule needs, so a trace can be reranked again (eval-ensemble's replay).
                    "logprob_sum": {names[j]: float(sums[j, i]) for j in range(len(names))},
                    "token_count": {names[j]: int(counts[j, i]) for j in range(len(names))},
                    "bytes": int(nbytes[i]),
                }
                for i, u in enumerate(unique)
            ],
        )
        tokens = [None if own(j, winner) else r[2][win] for j, r in enumerate(results)]
        return segment, winner, tokens

    def _advance(self, req: _Request, candidates, winner: _Candidate, tokens: list) -> None:
        """Append the winner for every source: its proposers keep their own ids and carry on with the tokens
        they generated past the cut; the others append their own tokenization of it."""
        own = {c.source: c for c in candidates if c.key == winner.key}
        for j, state in enumerate(req.states):
            if j in own:
                c = own[j]
                state.ids = np.concatenate([state.ids, c.own_ids]).astype(np.int32)
                state.carry, state.carry_logprobs = c.carry, c.carry_logprobs
                state.ends_with_stop = c.final
            else:
                context, toks = tokens[j]
                body = toks[:-1] if winner.final else toks  # its EOS was only scored
                state.ids = np.concatenate([context, body]).astype(np.int32)
                state.carry = state.carry[:0]
                state.carry_logprobs = state.carry_logprobs[:0]
                state.ends_with_stop = False
            state.text += winner.text

    # ------------------------------------------------------------------------------------------------------
    # Token counts in the primary source (max_tokens, usage).
    # ------------------------------------------------------------------------------------------------------

    def _first_tokens(self, req, winner, keep, before_ids, before_text: str) -> str:
        """The text of the winning segment's first ``keep`` primary tokens."""
        primary = self.sources[0]
        ids = req.states[0].ids  # after the step: before_ids + the winner's primary tokens, when the split was clean
        if len(ids) > len(before_ids) and np.array_equal(ids[: len(before_ids)], before_ids):
            text = primary.decode_continuation(before_ids, ids[len(before_ids) :][:keep])
            if winner.text.startswith(text):
                return text
        (enc,) = primary.encode([req.prompt.texts[0] + before_text + winner.text], req.prompt.add_special_tokens)
        cut = cut_at_token(enc.offsets, len(req.prompt.texts[0]) + len(before_text), keep)
        return winner.text if cut is None else winner.text[:cut]

    def _canonical_count(self, req: _Request, text: str) -> int:
        if not text:
            return 0
        (enc,) = self.sources[0].encode([req.prompt.texts[0] + text], req.prompt.add_special_tokens)
        return int((enc.offsets[:, 1] > len(req.prompt.texts[0])).sum())


def _first_stop(text: str, stops: Sequence[str], stop_at, search_from: int = 0) -> int | None:
    """Where ``text`` ends: the earliest stop string (:func:`find_stop`) or ``stop_at``'s index, or ``None``."""
    hits = [h for h in (find_stop(text, stops, search_from), stop_at(text) if stop_at else None) if h is not None]
    return min(hits) if hits else None


def _continuation_logprobs(teacher, items: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """Per ``(context, tokens)``, the logprobs (float64) of ``tokens`` after ``context``. An in-process hf
    engine scores all candidates that share a context in one batched forward on its prefix KV cache
    (``score_continuations``); a served one scores the tails on its prefix cache (``score_tails``, one call);
    any other teacher scores the whole sequences in one ``score_ids`` call."""
    if not items:
        return []
    out: list[np.ndarray | None] = [None] * len(items)
    if hasattr(teacher, "score_continuations"):
        groups: dict[bytes, list[int]] = {}
        for k, (context, _) in enumerate(items):
            groups.setdefault(np.asarray(context, dtype=np.int32).tobytes(), []).append(k)
        for ks in groups.values():
            rows = teacher.score_continuations(items[ks[0]][0], [items[k][1] for k in ks])
            for k, r in zip(ks, rows):
                out[k] = np.asarray(r, dtype=np.float64)
        return out  # type: ignore[return-value]
    seqs = [np.concatenate([c, t]).astype(np.int32) for c, t in items]
    if hasattr(teacher, "score_tails"):  # a served hf teacher: the tails on its prefix cache (ScoreTails RPC)
        rows = teacher.score_tails(seqs, [len(c) for c, _ in items])
        return [np.asarray(r, dtype=np.float64) for r in rows]
    for k, ((context, _), s) in enumerate(zip(items, teacher.score_ids(seqs, top_k=1))):
        out[k] = np.asarray(s.gold_logprobs, dtype=np.float64)[len(context) - 1 :]  # row t predicts token t + 1
    return out  # type: ignore[return-value]


def _eos_of(source: EnsembleSource) -> int:
    eos = source.tokenizer.eos_token_id
    return int(eos) if isinstance(eos, int) else int(source.stop_token_ids[0])


# ----------------------------------------------------------------------------------------------------------
# The plain single-model mode, for comparison.
# ----------------------------------------------------------------------------------------------------------


def stream_single(
    source: EnsembleSource, prompt_text: str, add_special_tokens: bool, params: DecodeParams
) -> Iterator[StreamEvent]:
    """One source alone, streamed token by token, with the ensemble's stop rules and token accounting.

    Stop strings end the generation where they appear (issue 16), not after ``max_tokens``: an engine that
    takes ``stop_when`` checks them after every token inside one ``generate`` call, run in a worker thread
    that hands each token over; any other teacher generates pieces of ``_SINGLE_CHUNK_TOKENS`` tokens,
    checked between pieces.
    """
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
    stops = tuple(s for s in params.stop if s)
    stop_ids = set(source.stop_token_ids)
    seed = params.seed if params.seed is not None else int(np.random.SeedSequence().entropy % (1 << 62))
    budget = min(params.max_tokens, room)

    def text_of(ids: np.ndarray) -> tuple[str, bool]:
        stopped = bool(ids.size) and int(ids[-1]) in stop_ids
        return source.decode_continuation(enc.ids, ids[:-1] if stopped else ids), stopped

    ids = np.zeros(0, dtype=np.int32)
    shown = ""  # the text streamed so far
    for ids in _single_tokens(source, enc.ids, budget, params, seed,
                              lambda t: _first_stop(text_of(t)[0], stops, params.stop_at) is not None):
        text, stopped = text_of(ids)
        if _first_stop(text, stops, params.stop_at) is not None or stopped:
            break
        safe = len(text.rstrip("\ufffd"))
        safe -= stop_holdback(text[:safe], stops)
        if safe > len(shown) and text.startswith(shown):
            yield StreamEvent(delta=text[len(shown) : safe])
            shown = text[:safe]
    text, stopped = text_of(ids)
    body = ids[:-1] if stopped else ids  # [M]
    count = int(body.size)
    finish = "stop" if stopped else "length"
    hit = _first_stop(text, stops, params.stop_at)
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
    yield StreamEvent(delta=text[len(shown) :] if text.startswith(shown) else "", completion=completion)


def _single_tokens(
    source: EnsembleSource, prompt: np.ndarray, budget: int, params: DecodeParams, seed: int,
    stop: Callable[[np.ndarray], bool],
) -> Iterator[np.ndarray]:
    """The ids generated so far, after each token (or each piece), until the source stops, ``stop`` says so
    or ``budget`` is spent. Leaving the iterator early ends the generation at the next token."""
    if budget <= 0:
        return
    kw = dict(temperature=params.temperature, top_p=params.top_p, stop_token_ids=source.stop_token_ids)
    stop_ids = set(source.stop_token_ids)
    if not supports_stop_when(source.teacher):
        ids = np.zeros(0, dtype=np.int32)
        call = 0
        while ids.size < budget:
            g = source.teacher.generate(np.concatenate([prompt, ids]), max_new_tokens=min(_SINGLE_CHUNK_TOKENS, budget - ids.size),
                                        seed=_step_seed(seed, 0, 0, call), **kw)
            new = np.asarray(g.token_ids, dtype=np.int32)
            ids = np.concatenate([ids, new])
            call += 1
            yield ids
            if new.size == 0 or int(ids[-1]) in stop_ids or stop(ids):
                return
        return

    tokens: queue.Queue = queue.Queue()
    cancelled = threading.Event()
    done = object()

    def stop_when(ids: np.ndarray) -> bool:
        tokens.put(np.array(ids, dtype=np.int32))
        return cancelled.is_set() or stop(ids)

    def produce() -> None:
        try:
            g = source.teacher.generate(prompt, max_new_tokens=budget, seed=_step_seed(seed, 0, 0), stop_when=stop_when, **kw)
            tokens.put((done, np.asarray(g.token_ids, dtype=np.int32)))
        except BaseException as e:  # handed to the consumer, raised there
            tokens.put((done, e))

    worker = threading.Thread(target=produce, name=f"single-{source.name}", daemon=True)
    worker.start()
    try:
        while True:
            item = tokens.get()
            if isinstance(item, tuple) and item[0] is done:
                if isinstance(item[1], BaseException):
                    raise item[1]
                yield item[1]  # the whole generation, its stop token included
                return
            yield item
    finally:
        cancelled.set()
        worker.join()


def generate_single(
    source: EnsembleSource, prompt_text: str, add_special_tokens: bool, params: DecodeParams
) -> Completion:
    completion = None
    for event in stream_single(source, prompt_text, add_special_tokens, params):
        completion = event.completion or completion
    return completion
