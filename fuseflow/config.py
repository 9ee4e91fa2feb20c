"""Typed run configs: YAML in, validated at load (pydantic, as mergekit's ``config.py``), with
``key=value`` command-line overrides (as torchtune's ``config/_parse.py``). Errors name the field.

Every default lives here and is written out in ``examples/``; ``fuseflow config CONFIG`` prints the
resolved config.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fuseflow.corpus import CorpusConfig


class ConfigError(ValueError):
    """A config that does not validate; the message lists each offending field."""


class RunFailed(RuntimeError):
    """A run that ended but must not count as a success (e.g. too many samples dead-lettered); the message
    says what to look at. The CLI exits 1 with it."""


class _Strict(BaseModel):
    # A typo in a key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Strict):
    model: str = Field(description="short name (smollm2-135m, gemma3-270m), HF model dir, or .gguf file")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] | None = Field(
        None,
        description="transformers attention kernel (default: transformers' choice, SDPA); flash_attention_2 or "
        "flex_attention make packed rows truly variable-length",
    )


class SourceConfig(ModelConfig):
    name: str | None = Field(None, description="teacher name in logs and on the wire; default: model")
    engine: Literal["hf", "vllm"] = "hf"
    batch_tokens: int = Field(8192, gt=0, description="padded tokens per scoring forward")
    max_length: int | None = Field(None, gt=1, description="longest text in this teacher's tokens")
    head_chunk_tokens: int = Field(1024, gt=0, description="tokens per lm_head chunk (bounds [chunk, V])")
    engine_options: dict[str, Any] = Field(
        default_factory=dict,
        description="extra engine keyword arguments, checked against the engine's options model "
        "(hf: pack, head_method, compile, …; vllm: tensor_parallel_size, …)",
    )

    @property
    def key(self) -> str:
        return self.name or self.model

    @field_validator("engine_options")
    @classmethod
    def _typed_engine_options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return check_source_engine_options(info, v)

    def engine_kwargs(self, device: str | None = None) -> dict[str, Any]:
        """Keyword arguments of this source's engine (:func:`fuseflow.score.engine.engine_from_source`): the
        fields above, then ``engine_options``, which win; ``device`` goes to the hf engine only (vllm places
        the model itself)."""
        kw: dict[str, Any] = {
            "name": self.key, "dtype": self.dtype, "max_batch_tokens": self.batch_tokens,
            "head_chunk_tokens": self.head_chunk_tokens,
        }
        if self.max_length:
            kw["max_length"] = self.max_length
        if self.attn_implementation:
            kw["attn_implementation"] = self.attn_implementation
        if self.engine == "hf" and device:
            kw["device"] = device
        return {**kw, **self.engine_options}

    @model_validator(mode="after")
    def _attn_for_hf(self) -> "SourceConfig":
        if self.attn_implementation and self.engine != "hf":
            raise ValueError(
                f"attn_implementation applies to the hf engine; the {self.engine} engine picks its own kernels"
            )
        return self


def check_source_engine_options(info: ValidationInfo, options: dict[str, Any]) -> dict[str, Any]:
    """A source's ``engine_options`` against its engine's options model (``engine`` is validated first, being
    declared first); pydantic nests the model's errors under the field: ``sources[i].engine_options.<name>``."""
    if "engine" not in info.data or not options:
        return options
    from fuseflow.score.engine import check_engine_options

    return check_engine_options(info.data["engine"], options)


class AlignConfig(_Strict):
    vocab_map: Literal["exact", "mined", "first-token", "stats"] = Field(
        "first-token", description="teacher token → target token: exact | mined (FuseLLM's MinED) | first-token (the "
        "target's own first token of the teacher token's text) | stats (FuseChat; first-token where unseen)")
    sequence: Literal["offsets", "mined-dp"] = "offsets"
    chain_rule: bool = Field(
        True, description="target positions inside a longer teacher token get the teacher's conditional by the "
        "chain rule over strings (needs character offsets on both sides); false: the gold token (FuseLLM)")
    score_top_k: int = Field(
        64, gt=0, le=1024, description="candidates a teacher scores per position before they are projected onto "
        "the target (the rows are cut to fusion.top_k after): more of them agree with the text inside its tokens "
        "(bench/align.py: coverage 84.5 % at 10, 91.2 % at 64); capped by the engine's max_top_k (vLLM: 20)")
    stats_documents: int = Field(200, gt=0, description="documents counted for the 'stats' vocab map")


class FusionConfig(_Strict):
    function: str = Field("min_ce", description="a name in fuseflow.fuse.fusion.FUSIONS")
    top_k: int = Field(10, gt=0, le=256)
    temperature: float = Field(1.0, gt=0)
    lam: float = Field(0.9, ge=0, le=1, description="weight of the CLM loss; 1 - lam weighs the fusion KL")
    kl: Literal["renormalised", "tail"] = Field(
        "renormalised",
        description="renormalised: teacher rows renormalised over their top-k, KL on those k ids (FuseLLM's "
        "released trainer); tail: the teachers' mass outside their top-k kept as one more outcome of the KL "
        "(fuseflow.fuse.loss.sparse_kl; docs/quality.md)",
    )
    criterion: Literal["aligned", "text"] = Field(
        "aligned",
        description="what min_ce / avg_ce rank teachers by: aligned: mean CE over the teacher's aligned positions "
        "(FuseLLM); text: the teacher's nll of the whole sample text per target position (docs/quality.md)",
    )
    student_candidate: bool = Field(
        False,
        description="the student, as it is at each step, is one more fusion candidate, ranked by its own CE (by the "
        "same criterion); its row is the text itself (the gold token, as FuseLLM's rows where a teacher is not "
        "aligned), so where no teacher beats the student the loss is plain CLM there (at temperature 1) and a "
        "teacher pulls the student only where it knows better (issue 22)",
    )

    @field_validator("function")
    @classmethod
    def _known_fusion(cls, v: str) -> str:
        from fuseflow.fuse.fusion import FUSIONS

        FUSIONS.lookup(v)
        return v

    @model_validator(mode="after")
    def _criterion_fits_function(self) -> "FusionConfig":
        from fuseflow.fuse.fusion import SAMPLE_CE_FUSIONS

        if self.criterion == "text" and self.function not in SAMPLE_CE_FUSIONS:
            raise ValueError(f"criterion 'text' ranks teachers per sample: function must be one of "
                             f"{list(SAMPLE_CE_FUSIONS)}, got {self.function!r}")
        return self


class TrainConfig(_Strict):
    """FuseLLM paper defaults (arXiv 2401.10491 §4.1): AdamW β=(0.9, 0.95), wd 0.1, clip 1.0, cosine,
    warmup 0.008, one epoch."""

    max_length: int = Field(512, gt=8, description="target tokens per training sample")
    micro_batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-5, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    warmup_ratio: float = Field(0.008, ge=0, lt=1)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False
    pack: bool = Field(
        True,
        description="pack a micro-batch's samples into rows with restarted position ids instead of padding them",
    )
    compile: bool = Field(
        False, description="torch.compile the target's decoder trunk (fused kernels; the first steps pay the compile)"
    )
    loss_chunk_tokens: int = Field(1024, gt=0, description="tokens per chunk of the chunked lm_head loss")
    loss_impl: Literal["fused", "chunked"] = Field(
        "fused",
        description="fused: gradients of each loss chunk computed in the forward (3 head matmuls per chunk); "
        "chunked: recomputed under checkpointing (4)",
    )
    rejected_results: Literal["redispatch", "dead_letter"] = Field(
        "redispatch",
        description="a teacher's answer the trainer rejects (undecodable, NaN, ids outside the vocabulary, wrong "
        "length): ask that teacher again once, then dead-letter (redispatch), or dead-letter at once",
    )
    max_dead_letter_fraction: float = Field(
        0.1, ge=0, le=1, description="a run that dead-letters more than this fraction of its samples fails (exit 1)"
    )
    checkpoint_every: int = Field(100, gt=0, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(1, gt=0)

    def samples_per_step(self, world: int = 1) -> int:
        """Samples in one optimizer step on ``world`` ranks: micro-batch × gradient accumulation × ranks."""
        return self.micro_batch_size * self.grad_accum * world

    def total_steps(self, n_samples: int, world: int = 1) -> int:
        """Optimizer steps of a run over ``n_samples`` on ``world`` ranks: ``epochs`` passes, cut to ``max_steps``
        when set."""
        steps = math.ceil(n_samples * self.epochs / self.samples_per_step(world))
        return min(steps, self.max_steps) if self.max_steps else steps

    def required_window(self, world: int) -> int:
        """Samples in flight that a checkpoint interval needs: samples are acked only at a checkpoint, so the
        dispatch window must hold every sample trained since the last one plus a micro-batch per rank, or the
        dispatcher waits on acks that wait on samples."""
        return (self.checkpoint_every * self.grad_accum + 1) * self.micro_batch_size * world

    def default_window(self, world: int) -> int:
        """Samples in flight by default (``online.window`` unset, and every in-process run): twice what a
        checkpoint interval needs, at least 256."""
        return max(256, 2 * self.required_window(world))

    @model_validator(mode="after")
    def _zero3_needs_fused_loss(self) -> "TrainConfig":
        if self.zero_stage == 3 and self.loss_impl == "chunked":
            raise ValueError(
                "zero_stage 3 needs loss_impl: fused — the chunked loss recomputes the lm_head in the backward, "
                "after ZeRO-3 has released the gathered head weight"
            )
        return self


class EvalConfig(_Strict):
    max_length: int = Field(512, gt=8)
    batch_tokens: int = Field(8192, gt=0)
    max_chars_per_document: int | None = Field(
        None, gt=0, description="evaluate only the first N characters of each held-out document"
    )
    before: bool = Field(True, description="evaluate sources and the target before training")


class ServeConfig(_Strict):
    """``fuseflow teacher serve``: how a source is served over gRPC and bounded (issue 15's request limits).
    Each field is also a flag of the command (``--max-texts 128`` = ``serve.max_texts=128``)."""

    host: str = Field("0.0.0.0", description="address to bind (gRPC and metrics)")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: any free port)")
    metrics_port: int = Field(9400, ge=0, le=65535, description="Prometheus /metrics port (0: any free port)")
    tls_cert: Path | None = Field(None, description="PEM server certificate (chain); with tls_key turns TLS on")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    token_file: Path | None = Field(
        None, description="file holding the bearer token clients must send (default: env FUSEFLOW_TEACHER_TOKEN; "
        "neither: no auth)"
    )
    worker: bool = Field(
        False, description="also be a worker of the run: take samples from its Redis stream (online.redis), write "
        "aligned distributions back (needs a run config)"
    )
    max_texts: int = Field(256, gt=0, description="sequences per request")
    max_tokens: int = Field(16384, gt=0, description="tokens per request")
    max_text_bytes: int | None = Field(
        None, gt=0, description="UTF-8 bytes of texts per request, refused before tokenizing (default 16 per token of "
        "max_tokens: 256 KiB); the gRPC receive limit follows from this, max_tokens and max_texts"
    )
    max_concurrent_rpcs: int = Field(
        32, gt=0, description="TeacherService calls served at once; more are answered RESOURCE_EXHAUSTED (health "
        "checks are not counted)"
    )
    max_tokenizing: int = Field(
        2, gt=0, description="texts requests tokenized at once; tokenizing holds ~250 bytes of memory per text byte"
    )
    max_top_k: int = Field(64, gt=0, description="largest top_k")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a request waits to share a batch")
    grace_s: float = Field(30.0, ge=0, description="shutdown grace period for in-flight requests")

    def engine_defaults(self) -> dict[str, Any]:
        """What a served engine gets unless its source says otherwise (``fuseflow.score.engine.
        source_engine_kwargs``): the largest top-k the server accepts. ``fuseflow fuse`` builds its in-process
        teachers with the same, so they score as the served ones do."""
        return {"max_top_k": self.max_top_k}

    @model_validator(mode="after")
    def _tls_pair(self) -> "ServeConfig":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both serve.tls_cert and serve.tls_key (--tls-cert and --tls-key)")
        return self


class OnlineConfig(_Strict):
    """A run over Redis: ``fuseflow train`` (rank 0 dispatches, every rank trains) and the teachers' workers
    (``fuseflow teacher serve --redis``). Each field is also a flag of those commands (``--window 512`` =
    ``online.window=512``)."""

    redis: str | None = Field(
        None, description="Redis URL, redis://[:PASSWORD@]HOST:PORT/DB (default: env FUSEFLOW_REDIS_URL, which keeps "
        "the password off command lines and out of this file)"
    )
    run: str | None = Field(
        None, description="run name: the Redis keys' tag, shared by the trainer and the teachers (default: env "
        "FUSEFLOW_RUN, else the name of run_dir)"
    )
    window: int | None = Field(
        None, gt=0, description="samples in flight at most (default: twice what a checkpoint interval needs, at "
        "least 256)"
    )
    max_deliveries: int = Field(
        5, ge=1, description="a teacher dead-letters a sample taken over from dead replicas more than this many "
        "times: a poison sample that kills the process"
    )
    reclaim_idle_s: float = Field(
        30.0, ge=1.0, description="a teacher replica takes over another's samples once idle this long (a dead "
        "replica's), or 4 times the slowest recent batch it scored itself if longer; set it above the slowest batch "
        "your hardware can take, or an idle replica takes over a slow batch"
    )
    metrics_host: str = Field("0.0.0.0", description="address of the trainer's metrics port")
    metrics_port: int = Field(9401, ge=0, le=65535, description="the trainer's Prometheus /metrics port on rank 0 (0: off)")

    @field_validator("redis")
    @classmethod
    def _is_url(cls, v: str | None) -> str | None:
        if v is not None and "://" not in v:  # e.g. a bare --redis that took the next word, a key=value
            raise ValueError(f"not a Redis URL (redis://[:PASSWORD@]HOST:PORT/DB): {v!r}")
        return v

    def redis_url(self) -> str | None:
        """``redis``, else env ``FUSEFLOW_REDIS_URL``; None when neither is set."""
        import os

        return self.redis or os.environ.get("FUSEFLOW_REDIS_URL") or None


class FuseConfig(_Strict):
    """``fuseflow fuse CONFIG``: knowledge fusion of ``sources`` into ``target`` (FuseLLM)."""

    run_dir: Path = Path("runs/fuse")
    seed: int = Field(0, description="drives every random choice of the run (issue 25): which documents are held out "
                      "(corpus.seed, unless set), the initialisation of anything new and dropout. Samples are "
                      "trained in the corpus's own order, the same for every seed (streamed, resumable)")
    device: str = "cpu"
    target: ModelConfig
    sources: list[SourceConfig] = Field(min_length=1)
    corpus: CorpusConfig = CorpusConfig()
    align: AlignConfig = AlignConfig()
    fusion: FusionConfig = FusionConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    baseline: Literal["none", "clm"] = Field("clm", description="also train a CLM-only copy on the same tokens")
    pairwise: bool = Field(False, description="FuseChat: one fused copy of the target per source")
    serve: ServeConfig = ServeConfig()
    online: OnlineConfig = OnlineConfig()

    @model_validator(mode="after")
    def _corpus_seed(self) -> "FuseConfig":
        if "seed" not in self.corpus.model_fields_set:
            self.corpus = self.corpus.model_copy(update={"seed": self.seed})
        return self

    @model_validator(mode="after")
    def _unique_sources(self) -> "FuseConfig":
        keys = [s.key for s in self.sources]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise ValueError(f"sources: names must be unique, {sorted(dup)} repeated (set sources[i].name)")
        if self.align.score_top_k < self.fusion.top_k:
            raise ValueError(f"align.score_top_k ({self.align.score_top_k}) must be at least fusion.top_k "
                             f"({self.fusion.top_k}): the projected rows are cut to fusion.top_k")
        return self

    def run_name(self, given: str | None = None) -> str:
        """The run's name, which tags its Redis keys and is shared by every process of the run: ``given``, else
        ``online.run`` (``--run``), else env ``FUSEFLOW_RUN``, else the name of ``run_dir`` (resolved, so ``.``
        names the folder). One definition for the trainer, the teachers and the stack (issue 13)."""
        import os

        return given or self.online.run or os.environ.get("FUSEFLOW_RUN") or self.run_dir.resolve().name


class FinetuneConfig(FuseConfig):
    """``fuseflow finetune CONFIG``: the recipe with no teachers — CLM-fine-tune ``target`` on the corpus and write
    an HF directory (``run_dir/finetuned/model``): how a domain expert for fusion is made (issue 22). The run
    config of ``fuseflow fuse``; its ``sources``, ``align``, ``fusion``, ``baseline`` and ``pairwise`` are not used
    (``sources`` may be left out)."""

    sources: list[SourceConfig] = Field(default_factory=list, description="not used by finetune (may be left out)")


C = TypeVar("C", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.lr=3e-5`` → (["train", "lr"], 3e-5); the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=3e-5)")
    value = yaml.safe_load(raw)
    if isinstance(value, str) and raw.strip()[:1] not in ("'", '"'):  # a quoted value stays a string
        try:  # YAML 1.1 reads "3e-5" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: Iterable[str | tuple[str, Any]]) -> dict:
    """Set each override on ``data`` in place: ``"key.sub=value"`` (the value parsed as YAML) or
    ``("key.sub", value)`` (a flag's value, taken as given: pydantic converts it as the field's type says); a
    numeric part indexes a list (``sources.0.model=x``). The one way command lines change a config."""
    for item in overrides:
        if isinstance(item, str):
            path, value = parse_override(item)
        else:
            path, value = item[0].split("."), item[1]
            item = f"{item[0]}={value}"
        node: Any = data
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, list):
                index = int(part) if part.lstrip("-").isdigit() else None
                if index is None or not -len(node) <= index < len(node):
                    where = ".".join(path[:i])
                    raise ConfigError(f"override {item!r}: {where} has {len(node)} items; {part!r} is not an index")
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"override {item!r}: {'.'.join(path[:i])} is not a section")
    return data


def validation_message(error: Any) -> str:
    """One pydantic error's message, in fuseflow's wording: a forbidden extra key is an ``unknown field (typo?)``,
    and pydantic's ``Value error, `` prefix on a validator's own message is dropped."""
    if error["type"] == "extra_forbidden":
        return "unknown field (typo?)"
    return error["msg"].removeprefix("Value error, ")


def format_validation_error(err: ValidationError, source: str, flags: Mapping[str, str] | None = None) -> str:
    """One line per invalid field, named as in the YAML (``sources[0].model``); ``flags``: field → the flag that
    set it, named too (``serve.port (--port)``)."""
    lines = [f"{source}: {err.error_count()} invalid field(s)"]
    for e in err.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")  # sources[0].model
        dotted = ".".join(str(p) for p in e["loc"])
        if flags and dotted in flags:
            loc = f"{loc} ({flags[dotted]})"
        message = validation_message(e).removeprefix(f"{dotted}: ")  # a registry names its field itself
        # A whole-config check (a model validator) has no location: its message names the fields itself.
        lines.append(f"  {loc}: {message}" if loc else f"  {message}")
    return "\n".join(lines)


def load_config(
    cls: type[C], path: str | Path | None, overrides: list[str] | None = None,
    flags: Mapping[str, tuple[str, Any]] | None = None,
) -> C:
    """Read YAML ``path`` (or start empty), apply ``flags`` (field → (flag, value): :func:`flag_values`) and then
    the ``key=value`` ``overrides``, validate as ``cls``."""
    data: dict = {}
    source = str(path) if path else "config"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of fields, got {type(data).__name__}")
    flags = dict(flags or {})
    data = apply_overrides(data, [*((key, value) for key, (_, value) in flags.items()), *(overrides or [])])
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, {k: flag for k, (flag, _) in flags.items()})) from None


# ----------------------------------------------------------------------------------------------------------
# Flags that alias config fields.
# ----------------------------------------------------------------------------------------------------------


class _FieldFlag(argparse.Action):
    """Records ``(the flag as typed, its raw value)`` under the dotted field name; :func:`flag_values` reads it."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, (option_string, True if self.nargs == 0 else values))


def config_parser(description: str, epilog: str, config_help: str, overrides_help: str, *,
                  config_metavar: str | None = None, overrides_metavar: str | None = None,
                  **kwargs) -> argparse.ArgumentParser:
    """The parser of a command that reads a config file and ``key=value`` overrides of it (:func:`load_config`):
    the two positional arguments every such command starts with, named alike; ``kwargs`` go to the parser."""
    parser = argparse.ArgumentParser(description=description, epilog=epilog, **kwargs)
    parser.add_argument("config", metavar=config_metavar, help=config_help)
    parser.add_argument("overrides", nargs="*", metavar=overrides_metavar, help=overrides_help)
    return parser


def add_field_flags(parser, section: type[BaseModel], prefix: str, names: Iterable[str] | None = None) -> None:
    """A flag per field of the config section at ``prefix`` (``--max-texts`` for ``serve.max_texts``), help from
    the field's description and default. A flag is an alias of the override ``prefix.field=value``: its value
    goes to the config loader as given (:func:`flag_values` → :func:`load_config`), so YAML, flags and
    overrides are checked by the same model and errors name the field (issue 13). A boolean field is a switch
    (``--worker``)."""
    for name in names or section.model_fields:
        field = section.model_fields[name]
        switch = field.annotation is bool
        default = "" if field.default is None else f"; default {field.default}"
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=f"{prefix}.{name}", action=_FieldFlag, default=None,
            nargs=0 if switch else None, metavar=None if switch else _metavar(field.annotation, name),
            help=f"{field.description or name} [{prefix}.{name}{default}]",
        )


def _metavar(annotation, name: str) -> str:
    kinds = set(get_args(annotation)) - {type(None)} or {annotation}
    return next((m for t, m in ((int, "N"), (float, "X"), (Path, "FILE")) if t in kinds), name.upper())


def flag_values(args: argparse.Namespace) -> dict[str, tuple[str, Any]]:
    """The field flags given on the command line (:func:`add_field_flags`): field → (flag, value)."""
    return {dest: v for dest, v in vars(args).items() if "." in dest and v is not None}


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
