"""Typed run configs: YAML in, validated at load (pydantic, as mergekit's ``config.py``), with
``key=value`` command-line overrides (as torchtune's ``config/_parse.py``). Errors name the field.

Every default lives here and is written out in ``examples/``; ``fuseflow config show CONFIG`` prints the
resolved config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

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
    vocab_map: Literal["exact", "mined", "stats"] = "mined"
    sequence: Literal["offsets", "mined-dp"] = "offsets"
    stats_documents: int = Field(200, gt=0, description="documents counted for the 'stats' vocab map")


class FusionConfig(_Strict):
    function: str = Field("min_ce", description="a name in fuseflow.fuse.fusion.FUSIONS")
    top_k: int = Field(10, gt=0, le=256)
    temperature: float = Field(1.0, gt=0)
    lam: float = Field(0.9, ge=0, le=1, description="weight of the CLM loss; 1 - lam weighs the fusion KL")

    @field_validator("function")
    @classmethod
    def _known_fusion(cls, v: str) -> str:
        from fuseflow.fuse.fusion import FUSIONS

        FUSIONS.lookup(v)
        return v


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


class FuseConfig(_Strict):
    """``fuseflow fuse CONFIG``: knowledge fusion of ``sources`` into ``target`` (FuseLLM)."""

    run_dir: Path = Path("runs/fuse")
    seed: int = 0
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

    @model_validator(mode="after")
    def _unique_sources(self) -> "FuseConfig":
        keys = [s.key for s in self.sources]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise ValueError(f"sources: names must be unique, {sorted(dup)} repeated (set sources[i].name)")
        return self

    def run_name(self, given: str | None = None) -> str:
        """The run's name, which tags its Redis keys and is shared by every process of the run: ``given``
        (``--run``), else env ``FUSEFLOW_RUN``, else the name of ``run_dir`` (resolved, so ``.`` names the
        folder). One definition for the trainer, the teachers and the stack (issue 13)."""
        import os

        return given or os.environ.get("FUSEFLOW_RUN") or self.run_dir.resolve().name


C = TypeVar("C", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.lr=3e-5`` → (["train", "lr"], 3e-5); the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=3e-5)")
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:  # YAML 1.1 reads "3e-5" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each ``key.sub=value`` on ``data`` in place; a numeric part indexes a list (``sources.0.model=x``)."""
    for item in overrides:
        path, value = parse_override(item)
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


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} invalid field(s)"]
    for e in err.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")  # sources[0].model
        # A whole-config check (a model validator) has no location: its message names the fields itself.
        lines.append(f"  {loc}: {validation_message(e)}" if loc else f"  {validation_message(e)}")
    return "\n".join(lines)


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
    """Read YAML ``path`` (or start empty), apply ``overrides``, validate as ``cls``."""
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
    data = apply_overrides(data, overrides or [])
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
