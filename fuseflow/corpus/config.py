"""The ``corpus:`` section of a run config (pydantic, validated at load): one source, or a weighted mix."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator


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
