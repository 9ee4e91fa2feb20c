"""``ENSEMBLE.yaml``: the sources of a Cool-Fusion ensemble, how it decodes, how it is served and evaluated.

Validated at load (pydantic; errors name the field), ``key=value`` overrides as every fuseflow config
(``decoding.rerank=mean_logprob``, ``sources.0.address=teacher-0:50051``). Every default is written out in
``examples/ensemble.yaml``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from fuseflow.config import ConfigError, check_source_engine_options, load_config

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class SourceSpec(_Strict):
    """One source: a served teacher (``address``) or a model loaded in this process (``model``)."""

    name: str = Field(description="the source's name in traces, metrics and as a single-model id on /v1/models")
    address: str | None = Field(None, description="host:port of a `fuseflow teacher serve` (gRPC)")
    model: str | None = Field(None, description="in-process: short name, HF model dir or .gguf file")
    engine: Literal["hf", "vllm"] = Field("hf", description="in-process engine kind")
    engine_options: dict[str, Any] = Field(
        default_factory=dict, description="engine keyword arguments (device, dtype, …)"
    )
    tokenizer: str | None = Field(
        None,
        description="remote sources: local copy of the teacher's tokenizer (model reference); "
        "default: the path its Info reports",
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template (inline, or a path to a .jinja file) for a tokenizer that lacks one",
    )
    token_file: str | None = Field(
        None, description="file holding the teacher's bearer token; default: env FUSEFLOW_TEACHER_TOKEN"
    )
    tls_ca: str | None = Field(None, description="PEM CA certificate of the teacher (turns TLS on)")
    timeout_s: float = Field(300.0, gt=0, description="deadline of each call to the teacher")
    connect_timeout_s: float = Field(60.0, gt=0, description="how long to wait for the teacher at start-up")

    @field_validator("engine_options")
    @classmethod
    def _typed_engine_options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return check_source_engine_options(info, v)

    def engine_kwargs(self, device: str | None = None) -> dict[str, Any]:
        """In-process engine's keyword arguments (:func:`fuseflow.score.engine.engine_from_source`)."""
        return {"name": self.name, **({"device": device} if device and self.engine == "hf" else {}),
                **self.engine_options}

    @model_validator(mode="after")
    def _one_location(self) -> "SourceSpec":
        if (self.address is None) == (self.model is None):
            raise ValueError(
                f"source {self.name!r}: give exactly one of `address` (served teacher) or `model` (in-process)"
            )
        return self


class DecodingConfig(_Strict):
    rerank: str = Field("mean_perplexity", description="a name in fuseflow.ensemble.rerank.RERANKERS")
    segment_max_tokens: int = Field(8, ge=1, le=256, description="tokens each source generates per proposal")
    segment_min_chars: int = Field(1, ge=1, description="shortest segment, in characters")
    boundary: Literal["word", "token"] = Field(
        "word", description="segments end at common token boundaries outside words (word) or at any (token)"
    )
    default_max_tokens: int = Field(64, ge=0, description="max_tokens when a request gives none")
    max_tokens_limit: int = Field(2048, ge=1, description="largest max_tokens a request may ask for")
    parallel: bool | None = Field(None, description="call sources from threads; default: when any is remote")

    @field_validator("rerank")
    @classmethod
    def _known(cls, v: str) -> str:
        from fuseflow.ensemble.rerank import RERANKERS

        RERANKERS.lookup(v)
        return v


class ServerConfig(_Strict):
    """``fuseflow serve-ensemble``: the gateway's HTTP server (each field is also a flag: ``--max-n 4``)."""

    host: str = Field("127.0.0.1", description="address to bind (127.0.0.1: this machine only; 0.0.0.0 exposes "
                      "the gateway and needs an API key)")
    api_key_file: str | None = Field(
        None, description="file holding the API key clients send as 'Authorization: Bearer <key>' on /v1/* "
        "(default: env FUSEFLOW_GATEWAY_API_KEY; never the key itself on a command line)",
    )
    allow_unauthenticated: bool = Field(
        False, description="serve /v1/* without an API key on a non-loopback host (default: refuse to start)",
    )
    port: int = Field(8000, ge=0, le=65535, description="HTTP port")
    max_concurrent: int = Field(4, ge=1, description="requests decoded at once; more wait in line")
    queue_timeout_s: float = Field(60.0, gt=0, description="how long a request waits for a slot before a 503")
    max_n: int = Field(8, ge=1, description="largest `n` (choices per request)")


class EvalConfig(_Strict):
    task: str = Field("arithmetic", description="a name in fuseflow.ensemble.tasks.TASKS")
    num_problems: int = Field(20, ge=1, description="problems (next-word: per language)")
    languages: list[str] = Field(
        default_factory=lambda: ["en", "de", "fr", "es"],
        description="next-word: en (the built-in corpus) and manpages:LANG codes, each reported on its own",
    )
    context_chars: int = Field(600, ge=50, description="next-word: characters of passage before the word")
    split: Literal["test", "dev"] = Field(
        "test", description="next-word: 'test' (reported) or 'dev' (for tuning): alternate held-out documents"
    )
    held_out_documents: int | None = Field(
        None, ge=2, description="next-word: hold out this many documents per language (a run config's "
        "corpus.held_out_documents: text its fine-tuned models never read) instead of a fifth of them",
    )
    corpora: dict[str, str] = Field(
        default_factory=dict, description="next-word: language → corpus source (a JSONL file …) instead of the "
        "language's own (en: builtin, others: manpages:LANG)",
    )
    shots: int = Field(4, ge=0, description="solved examples in front of each problem")
    seed: int = 0
    max_tokens: int = Field(16, ge=1, description="tokens generated per answer")
    heldout_chars: int = Field(4000, ge=0, description="held-out text for bits per byte (0: skip)")
    heldout_chunk_chars: int = Field(1000, ge=50, description="held-out text is scored in pieces of this size")
    out: str | None = Field(None, description="JSON results file")

    @model_validator(mode="after")
    def _corpora_of_languages(self) -> "EvalConfig":
        extra = sorted(set(self.corpora) - set(self.languages))
        if extra:
            raise ValueError(f"corpora: {extra} are not in eval.languages {self.languages}")
        return self

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        from fuseflow.ensemble.tasks import TASKS

        TASKS.lookup(v)  # at load, not after the models are loaded
        return v


class EnsembleConfig(_Strict):
    name: str = Field("cool-fusion", description="the model id of the fused ensemble on /v1/models")
    sources: list[SourceSpec] = Field(min_length=1)
    decoding: DecodingConfig = Field(default_factory=DecodingConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _unique(self) -> "EnsembleConfig":
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"sources: names must be unique, repeated: {dupes}")
        if self.name in names:
            raise ValueError(
                f"name {self.name!r} is also a source name; the ensemble's id must differ from its sources'"
            )
        return self


def load_ensemble_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> EnsembleConfig:
    return load_config(EnsembleConfig, path, overrides)


# ----------------------------------------------------------------------------------------------------------
# Building the sources.
# ----------------------------------------------------------------------------------------------------------


def build_source(spec: SourceSpec, index: int):
    """An :class:`~fuseflow.ensemble.sources.EnsembleSource` for ``spec`` (``sources[index]`` in the config)."""
    source = _build_source(spec, index)
    if spec.chat_template is not None:
        template = spec.chat_template
        if "{" not in template:  # not a template: a file holding one
            try:
                template = Path(template).read_text()
            except OSError as e:
                source.close()
                raise ConfigError(f"sources[{index}] ({spec.name!r}).chat_template: cannot read {template}: {e.strerror}")
        source.tokenizer.chat_template = template
    return source


def _build_source(spec: SourceSpec, index: int):
    from fuseflow.ensemble.sources import EnsembleSource

    where = f"sources[{index}] ({spec.name!r})"
    if spec.model is not None:
        from fuseflow.score.engine import engine_from_source

        engine = engine_from_source(spec)
        return EnsembleSource.from_engine(engine, name=spec.name)

    from fuseflow.models import load_tokenizer
    from fuseflow.wire.client import TeacherClient

    token = None
    if spec.token_file is not None:
        try:
            token = Path(spec.token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"{where}.token_file: cannot read {spec.token_file}: {e.strerror}") from None
    client = TeacherClient(spec.address, token=token, tls_ca=spec.tls_ca, timeout_s=spec.timeout_s)
    try:
        client.wait_ready(spec.connect_timeout_s)
        info = client.info()
    except Exception as e:
        client.close()
        raise ConfigError(f"{where}.address: {e}") from None
    ref = spec.tokenizer or info.tokenizer
    try:
        tokenizer = load_tokenizer(ref)
    except Exception as e:
        client.close()
        raise ConfigError(
            f"{where}.tokenizer: cannot load the tokenizer {ref!r} locally ({e}); set sources[{index}].tokenizer to a "
            "local copy of the teacher's tokenizer (its model reference)"
        ) from None
    if len(tokenizer) > info.vocab_size:
        client.close()
        raise ConfigError(
            f"{where}.tokenizer: {ref!r} has {len(tokenizer)} tokens but the teacher's model has {info.vocab_size} "
            "logits; it is not the teacher's tokenizer"
        )
    log.info("source %s: teacher %s at %s (%s), tokenizer %s", spec.name, info.model, spec.address, info.engine, ref)
    return EnsembleSource.from_client(client, tokenizer, name=spec.name)


def build_sources(cfg: EnsembleConfig) -> list:
    sources = []
    try:
        for i, spec in enumerate(cfg.sources):
            sources.append(build_source(spec, i))
    except BaseException:
        for s in sources:
            s.close()
        raise
    return sources


def build_decoder(cfg: EnsembleConfig, sources):
    from fuseflow.ensemble.decoder import CoolFusionDecoder

    d = cfg.decoding
    return CoolFusionDecoder(sources, d.rerank, d.segment_max_tokens, d.segment_min_chars, d.parallel, d.boundary)
