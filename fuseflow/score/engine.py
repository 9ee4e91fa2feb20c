"""The scoring engine interface every teacher backend implements, and the registry that builds one by name.

The engine knows nothing of gRPC or Redis (as vLLM's ``LLMEngine`` knows nothing of its HTTP and gRPC
entrypoints): the gRPC server, the Redis worker and the in-process pipeline all call the same methods.

Scoring follows the conventions of :mod:`fuseflow.sparse`: position ``t`` predicts token ``t + 1``; a
text of ``L`` tokens (special tokens included) gets ``L - 1`` rows of top-k ids and logprobs plus the
logprob of the actual next token. The teacher temperature divides the logits before the log-softmax
(FuseLLM / Hinton et al. distillation temperature).

Validation lives here, once, so every backend rejects the same inputs with the same messages; a backend
implements :meth:`Engine._score` (validated ids in, top-k arrays out) and :meth:`Engine.generate`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from fuseflow.registry import Registry

from fuseflow.sparse import Generated, ScoreError, ScoredText  # records shared with clients; re-exported here


class NextTokenScores(NamedTuple):
    """A backend's raw answer for one sequence of ``L`` tokens."""

    topk_ids: np.ndarray  # [L-1, k] int32, row t predicts token t+1
    topk_logprobs: np.ndarray  # [L-1, k] float32, descending
    gold_logprobs: np.ndarray  # [L-1] float32




class Engine(abc.ABC):
    """A teacher model that scores texts (top-k next-token logprobs) and samples continuations."""

    kind: ClassVar[str] = ""  # registry key, set by @register_engine
    Options: ClassVar[type["EngineOptions"] | None] = None  # typed keyword arguments, set by @register_engine

    name: str
    tokenizer: "transformers.PreTrainedTokenizerFast"  # noqa: F821
    max_length: int  # longest sequence (special tokens included) the engine accepts
    max_top_k: int | None  # largest k the engine accepts (None: the vocabulary size)

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of logits the model produces per position (may exceed ``len(tokenizer)``)."""

    # ------------------------------------------------------------------------------------------------------
    # Scoring.
    # ------------------------------------------------------------------------------------------------------

    def score_texts(self, texts: list[str], top_k: int, temperature: float = 1.0) -> list[ScoredText]:
        """Tokenize each text with the tokenizer's own special tokens (BOS where it adds one) and score it.

        Returns one :class:`ScoredText` per text, in request order, with offsets and token strings.
        """
        self._check_top_k(top_k)
        self._check_temperature(temperature)
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text:
                raise ScoreError(f"text {i} is empty" if isinstance(text, str) else f"text {i} is not a string", i)
        if not texts:
            return []
        enc = self.tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
        ids = [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]  # each [L_i]
        self._check_lengths(ids)
        scores = self._score(ids, top_k, temperature)
        return [
            ScoredText(
                token_ids=ids[i],
                offsets=np.asarray(enc["offset_mapping"][i], dtype=np.int32).reshape(-1, 2),  # [L_i, 2]
                tokens=enc.tokens(i),
                topk_ids=s.topk_ids,
                topk_logprobs=s.topk_logprobs,
                gold_logprobs=s.gold_logprobs,
            )
            for i, s in enumerate(scores)
        ]

    def score_ids(self, ids: list[np.ndarray], top_k: int, temperature: float = 1.0) -> list[ScoredText]:
        """Score sequences that are already token ids (special tokens as the caller placed them).

        Offsets are ``None`` (there is no text); token strings come from the tokenizer.
        """
        self._check_top_k(top_k)
        self._check_temperature(temperature)
        arrays = []
        for i, x in enumerate(ids):
            a = np.asarray(x)
            if a.ndim != 1 or a.size == 0:
                raise ScoreError(f"token ids {i} must be a non-empty 1-D array, got shape {a.shape}", i)
            if not np.issubdtype(a.dtype, np.integer):
                raise ScoreError(f"token ids {i} must be integers, got dtype {a.dtype}", i)
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise ScoreError(f"token ids {i} holds id {bad}, outside the vocabulary [0, {self.vocab_size})", i)
            arrays.append(a.astype(np.int32, copy=False))
        self._check_lengths(arrays)
        if not arrays:
            return []
        scores = self._score(arrays, top_k, temperature)
        return [
            ScoredText(
                token_ids=a,
                offsets=None,
                tokens=self.tokenizer.convert_ids_to_tokens(a.tolist()),
                topk_ids=s.topk_ids,
                topk_logprobs=s.topk_logprobs,
                gold_logprobs=s.gold_logprobs,
            )
            for a, s in zip(arrays, scores)
        ]

    @abc.abstractmethod
    def _score(self, ids: list[np.ndarray], top_k: int, temperature: float) -> list[NextTokenScores]:
        """Score validated sequences (each 1-D int32, non-empty, within ``max_length`` and the vocabulary).

        Must return one :class:`NextTokenScores` per sequence, in the order given.
        """

    # ------------------------------------------------------------------------------------------------------
    # Generation (Cool-Fusion).
    # ------------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def generate(
        self,
        prompt_ids: np.ndarray,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] = (),
        seed: int | None = None,
    ) -> Generated:
        """Continue ``prompt_ids`` by up to ``max_new_tokens`` tokens; greedy at ``temperature == 0``.

        Stops after the first token in ``stop_token_ids`` (included in the result). EOS is not implied:
        pass ``tokenizer.eos_token_id`` to stop on it.
        """

    def _check_generate_args(
        self, prompt_ids: np.ndarray, max_new_tokens: int, temperature: float, top_p: float
    ) -> np.ndarray:
        """Validate :meth:`generate` arguments; return the prompt as a 1-D int64 array."""
        prompt = np.asarray(prompt_ids)
        if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
            raise ScoreError(f"prompt_ids must be a non-empty 1-D integer array, got shape {prompt.shape}")
        if prompt.min() < 0 or prompt.max() >= self.vocab_size:
            raise ScoreError(f"prompt_ids holds ids outside the vocabulary [0, {self.vocab_size})")
        if max_new_tokens < 0:
            raise ScoreError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if prompt.size + max_new_tokens > self.max_length:
            raise ScoreError(
                f"prompt of {prompt.size} tokens + max_new_tokens {max_new_tokens} exceeds max_length "
                f"{self.max_length}; shorten the prompt or lower max_new_tokens"
            )
        if not temperature >= 0.0:
            raise ScoreError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ScoreError(f"top_p must be in (0, 1], got {top_p}")
        return prompt.astype(np.int64)

    # ------------------------------------------------------------------------------------------------------
    # Validation shared by every backend.
    # ------------------------------------------------------------------------------------------------------

    def _check_top_k(self, top_k: int) -> None:
        if not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ScoreError(f"top_k must be a positive integer, got {top_k!r}")
        if top_k > self.vocab_size:
            raise ScoreError(f"top_k {top_k} exceeds the vocabulary size {self.vocab_size} of {self.name}")
        if self.max_top_k is not None and top_k > self.max_top_k:
            raise ScoreError(f"top_k {top_k} exceeds the engine's max_top_k {self.max_top_k}; raise max_top_k")

    @staticmethod
    def _check_temperature(temperature: float) -> None:
        if not temperature > 0.0:
            raise ScoreError(f"temperature must be > 0 for scoring, got {temperature}")

    def _check_lengths(self, ids: list[np.ndarray]) -> None:
        for i, a in enumerate(ids):
            if len(a) > self.max_length:
                raise ScoreError(
                    f"text {i} has {len(a)} tokens, more than max_length {self.max_length} of {self.name}; "
                    "split the text or raise max_length",
                    i,
                )


# ----------------------------------------------------------------------------------------------------------
# Registry, typed options and the one factory.
# ----------------------------------------------------------------------------------------------------------


class EngineOptions(BaseModel):
    """An engine's keyword arguments as a typed model (declared next to its engine), so that a typo or a
    wrong type in a source's ``engine_options`` fails at config load, naming the field (issue 13). Defaults
    equal the engine constructor's (a test compares them); only the options a user set are passed on."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# Engines shipped with fuseflow are imported on first use, so that `vllm` is only imported when asked for.
ENGINES: Registry[type[Engine]] = Registry(
    "engine kind", builtins={"hf": "fuseflow.score.hf_engine", "vllm": "fuseflow.score.vllm_engine"}
)


def register_engine(kind: str, options: type[EngineOptions] | None = None) -> Callable[[type[Engine]], type[Engine]]:
    """Class decorator: make ``cls`` available to :func:`create_engine` as ``kind``; ``options`` is its typed
    keyword arguments (None: unchecked, for engines defined in tests)."""

    def wrap(cls: type[Engine]) -> type[Engine]:
        ENGINES.register(kind, cls)
        cls.kind = kind
        cls.Options = options
        return cls

    return wrap


def engine_options_model(kind: str) -> type[EngineOptions] | None:
    return ENGINES.lookup(kind).Options


def check_engine_options(kind: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` validated against engine ``kind``'s options model: the options as given, coerced to their
    types (pydantic's ``ValidationError`` names each bad field; a config nests it under its source)."""
    model = engine_options_model(kind)
    if model is None or not options:
        return dict(options)
    return model.model_validate(dict(options)).model_dump(exclude_unset=True)


def create_engine(kind: str, model: str, **options) -> Engine:
    """Build the engine ``kind`` (``hf``, ``vllm``, …) for ``model`` (see :func:`fuseflow.models.resolve`).

    ``options`` are the engine's keyword arguments (device, dtype, max_length, batching limits, …), checked
    against its options model first.
    """
    cls = ENGINES.lookup(kind)
    try:
        options = check_engine_options(kind, options)
    except ValidationError as e:
        bad = "; ".join(
            f"{'.'.join(map(str, err['loc']))}: "
            + ("unknown option (typo?)" if err["type"] == "extra_forbidden" else err["msg"])
            for err in e.errors()
        )
        raise ValueError(f"{kind} engine option {bad}") from None
    return cls(model, **options)


def source_engine_kwargs(source, device: str | None = None, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments :func:`engine_from_source` builds ``source``'s engine with. One precedence, the most
    specific last (issue 25): ``defaults`` (what the caller serves with: ``serve.max_top_k``), then the source's
    own fields, then its ``engine_options``. A source that sets ``max_top_k`` in its ``engine_options`` (vLLM
    caps prompt logprobs at 20) keeps it wherever it is built."""
    return {**dict(defaults or {}), **source.engine_kwargs(device)}


def engine_from_source(source, device: str | None = None, defaults: Mapping[str, Any] | None = None) -> Engine:
    """The one construction of a configured source's engine: ``fuseflow fuse``'s in-process teachers,
    ``fuseflow teacher serve`` (with ``--config`` or ``--model``) and in-process Cool-Fusion sources all call it,
    with the precedence of :func:`source_engine_kwargs`. ``source`` gives ``engine``, ``model`` and
    ``engine_kwargs(device)``: a run config's ``SourceConfig``, an ensemble's ``SourceSpec`` or a model served
    on its own (:class:`ModelSource`)."""
    return create_engine(source.engine, source.model, **source_engine_kwargs(source, device, defaults))


class ModelSource(NamedTuple):
    """A model served on its own (``fuseflow teacher serve --model M``): no run config, so no source fields;
    ``options`` are its engine keyword arguments (``--dtype``), as a source's ``engine_options``."""

    model: str
    engine: str = "hf"
    options: Mapping[str, Any] = {}

    def engine_kwargs(self, device: str | None = None) -> dict[str, Any]:
        return {"name": self.model, **({"device": device} if device and self.engine == "hf" else {}), **self.options}
