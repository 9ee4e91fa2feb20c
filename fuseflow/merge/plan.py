"""Plan a merge before touching any weight: which tensors, read from which shard files, written to which
output shard, and every compatibility check that can fail.

Everything here reads ``config.json`` and safetensors headers only, so a plan for a 70B merge takes well
under a second and fails early, naming the model directory and tensor at fault.

Tied embeddings: the output follows the base's ``tie_word_embeddings``. A tied output gets no ``lm_head``
tensor (a duplicate in any input is ignored); an untied output merges ``lm_head`` and, for an input model
that ties its head, reads that model's input embedding in its place. An untied input merged into a tied
base is an error: its separate head could not be represented.

Vocabulary sizes: embedding rows must match unless ``vocab_mismatch="merge_common"``: then the output keeps
the base's rows (its tokenizer is the base's), the rows every model has are merged, and the base's rows
beyond the smallest model's vocabulary are copied from the base.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .safetensors_io import INDEX_NAME, ST_DTYPES, TensorRef, nbytes, read_header

log = logging.getLogger(__name__)

VocabMismatch = Literal["error", "merge_common"]

# (input embedding, output embedding) tensor names of the architectures that tie them.
EMBEDDING_PAIRS = (
    ("model.embed_tokens.weight", "lm_head.weight"),
    ("transformer.wte.weight", "lm_head.weight"),
    ("model.decoder.embed_tokens.weight", "lm_head.weight"),
    ("gpt_neox.embed_in.weight", "embed_out.weight"),
)
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class MergeCheckError(ValueError):
    """The models cannot be merged as configured; the message names the model directory and tensor."""


@dataclass(frozen=True)
class TensorMeta:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class ModelInfo:
    """What a model directory holds, from ``config.json`` and the safetensors headers."""

    path: Path
    config: dict
    tensors: dict[str, TensorMeta]

    @property
    def tied(self) -> bool:
        # transformers' PretrainedConfig defaults to tied when the field is absent.
        return bool(self.config.get("tie_word_embeddings", True))


@dataclass(frozen=True)
class TensorTask:
    """One output tensor. ``sources`` has one entry per merged model (config order); empty means the
    tensor is copied from the base (non-float buffers). ``rows`` limits the merge to the first rows.
    ``params``: this tensor's own method parameters (mergekit configs: filters and per-layer gradients),
    else the config's. ``base_input``: whether the method gets the base tensor (a mergekit ``linear``,
    ``passthrough`` or base-less ``nuslerp`` gets None; ``base`` then only gives the layout)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    base: TensorRef
    sources: tuple[TensorRef, ...]
    rows: int | None
    shard: int
    params: dict | None = field(default=None, compare=False)
    base_input: bool = True


@dataclass(frozen=True)
class MergePlan:
    base: ModelInfo
    models: tuple[ModelInfo, ...]
    tasks: tuple[TensorTask, ...]
    shard_files: tuple[str, ...]
    tie_word_embeddings: bool
    notes: tuple[str, ...] = field(default=())

    @property
    def total_size(self) -> int:
        return sum(nbytes(t.shape, t.dtype) for t in self.tasks)

    @property
    def largest_tensor_bytes(self) -> int:
        return max((nbytes(t.shape, t.dtype) for t in self.tasks), default=0)

    def summary(self) -> str:
        lines = [
            f"base {self.base.path} + {len(self.models)} models: {len(self.tasks)} tensors, "
            f"{self.total_size / 1e9:.3f} GB in {len(self.shard_files)} shard(s), "
            f"largest tensor {self.largest_tensor_bytes / 1e6:.1f} MB, "
            f"tie_word_embeddings={self.tie_word_embeddings}"
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Inspection.
# ----------------------------------------------------------------------------------------------------------


def inspect_model(path: str | Path) -> ModelInfo:
    """Read ``config.json`` and the safetensors headers of an HF model directory."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise MergeCheckError(f"{path}: no config.json; pass an HF model directory")
    config = json.loads(config_file.read_text())
    index = path / INDEX_NAME
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        raise MergeCheckError(
            f"{path}: no .safetensors weights"
            + (f" (found {', '.join(others)}: re-save with save_pretrained(..., safe_serialization=True))"
               if others else "")
        )
    tensors: dict[str, TensorMeta] = {}
    for name in files:
        file = path / name
        if not file.exists():
            raise MergeCheckError(f"{path}: {INDEX_NAME} lists {name}, which is missing")
        for tname, (shape, st_dtype) in read_header(file).items():
            if st_dtype not in ST_DTYPES:
                raise MergeCheckError(f"{path}: tensor {tname} has dtype {st_dtype}, which fuseflow merge cannot read")
            if tname in tensors:
                raise MergeCheckError(f"{path}: tensor {tname} appears in both {tensors[tname].file.name} and {name}")
            tensors[tname] = TensorMeta(file=file, shape=shape, dtype=ST_DTYPES[st_dtype])
    return ModelInfo(path=path, config=config, tensors=tensors)


def embedding_pair(names: set[str]) -> tuple[str, str] | None:
    """The (input, output) embedding names of this architecture, or None if not a known pair."""
    for emb, head in EMBEDDING_PAIRS:
        if emb in names:
            return emb, head
    return None


# ----------------------------------------------------------------------------------------------------------
# Checks and planning.
# ----------------------------------------------------------------------------------------------------------


def _check_architecture(base: ModelInfo, model: ModelInfo) -> None:
    for key in ("architectures", "model_type"):
        if model.config.get(key) != base.config.get(key):
            raise MergeCheckError(
                f"{model.path}: config.json {key} {model.config.get(key)!r} differs from the base "
                f"{base.path}'s {base.config.get(key)!r}; every model must be a fine-tuned copy of the base"
            )


def _names_of(model: ModelInfo, head: str | None, tied_out: bool) -> set[str]:
    """The tensor names a model contributes, with its head reconciled to the output's tying."""
    names = set(model.tensors)
    if head is not None and (tied_out or model.tied):
        names.discard(head)  # a tied model's saved lm_head is a duplicate of its embedding
    return names


def _source(model: ModelInfo, name: str, head: str | None, emb: str | None) -> TensorRef:
    if name == head and name not in model.tensors and emb is not None:
        return TensorRef(model.tensors[emb].file, emb)  # the model ties its head: its embedding is its head
    return TensorRef(model.tensors[name].file, name)


def _natural_key(name: str) -> tuple:
    """``layers.2`` before ``layers.10``: output shards follow the layer order."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _list(names: set[str], limit: int = 5) -> str:
    s = sorted(names)
    return ", ".join(s[:limit]) + (f" and {len(s) - limit} more" if len(s) > limit else "")


def build_plan(
    base: str | Path,
    models: list[str | Path],
    *,
    dtype: torch.dtype | None = None,
    shard_size: int = 5 * 10**9,
    vocab_mismatch: VocabMismatch = "error",
) -> MergePlan:
    """Check that ``models`` can be merged onto ``base`` and plan every output tensor.

    ``dtype``: output dtype of floating tensors (None keeps each base tensor's dtype). ``shard_size``:
    bytes per output shard (a tensor larger than that gets a shard of its own).
    """
    if not models:
        raise MergeCheckError("models: list at least one model to merge")
    if shard_size <= 0:
        raise MergeCheckError(f"shard_size: must be positive, got {shard_size}")
    base_info = inspect_model(base)
    infos = tuple(inspect_model(m) for m in models)
    for info in infos:
        _check_architecture(base_info, info)

    tied_out = base_info.tied
    pair = embedding_pair(set(base_info.tensors))
    emb, head = pair if pair else (None, None)
    notes: list[str] = []
    if head is not None and not tied_out and head not in base_info.tensors:
        raise MergeCheckError(f"{base_info.path}: tie_word_embeddings is false but the weights have no {head}")
    expected = _names_of(base_info, head, tied_out)
    if head is not None and not tied_out:
        expected.add(head)
    if head is not None and tied_out and head in base_info.tensors:
        notes.append(f"base ties its embeddings: its stored {head} is a duplicate and is not written")

    for info in infos:
        if head is not None and tied_out and not info.tied and head in info.tensors:
            raise MergeCheckError(
                f"{info.path}: has its own {head} (tie_word_embeddings: false) but the base {base_info.path} "
                "ties it to the input embedding, so the merged model could not hold it; use an untied base"
            )
        names = _names_of(info, head, tied_out)
        if head is not None and not tied_out:
            if head not in info.tensors:
                notes.append(f"{info.path} ties its embeddings: its {emb} is merged into {head}")
            names.add(head)
        missing, extra = expected - names, names - expected
        if missing or extra:
            raise MergeCheckError(
                f"{info.path}: tensor names differ from the base {base_info.path}"
                + (f"; missing: {_list(missing)}" if missing else "")
                + (f"; not in the base: {_list(extra)}" if extra else "")
            )

    vocab_tensors = {n for n in (emb, head) if n is not None}
    tasks: list[TensorTask] = []
    for name in sorted(expected, key=_natural_key):
        bmeta = base_info.tensors[name]  # every expected name is in the base (untied head checked above)
        base_ref = TensorRef(bmeta.file, name)
        out_dtype = dtype if (dtype is not None and bmeta.dtype in FLOAT_DTYPES) else bmeta.dtype
        rows = None
        sources: tuple[TensorRef, ...] = ()
        if bmeta.dtype in FLOAT_DTYPES:
            sources = tuple(_source(info, name, head, emb) for info in infos)
            for info, ref in zip(infos, sources):
                shape = info.tensors[ref.name].shape
                if shape == bmeta.shape:
                    continue
                if name in vocab_tensors and vocab_mismatch == "merge_common" and shape[1:] == bmeta.shape[1:]:
                    rows = min(rows if rows is not None else bmeta.shape[0], shape[0])
                    continue
                hint = " (a vocabulary size difference: set vocab_mismatch: merge_common to merge the common rows)" if (
                    name in vocab_tensors and shape[1:] == bmeta.shape[1:]) else ""
                raise MergeCheckError(
                    f"{info.path}: tensor {name} has shape {list(shape)}, the base {base_info.path} has "
                    f"{list(bmeta.shape)}{hint}"
                )
            if rows is not None:
                notes.append(f"{name}: merging the first {rows} of {bmeta.shape[0]} rows; the rest come from the base")
        tasks.append(TensorTask(name, bmeta.shape, out_dtype, base_ref, sources, rows, 0))

    planned, files = assign_shards(tasks, shard_size)
    for note in notes:
        log.info(note)
    return MergePlan(base_info, infos, planned, files, tied_out, tuple(notes))


def assign_shards(tasks: list[TensorTask], shard_size: int) -> tuple[tuple[TensorTask, ...], tuple[str, ...]]:
    """``tasks`` (in output order) with their shard index, filling shards up to ``shard_size`` bytes (a
    larger tensor gets a shard of its own), and the shard file names."""
    out, shard, filled = [], 0, 0
    for task in tasks:
        size = nbytes(task.shape, task.dtype)
        if filled and filled + size > shard_size:
            shard, filled = shard + 1, 0
        filled += size
        out.append(dataclasses.replace(task, shard=shard))
    n = shard + 1
    files = ("model.safetensors",) if n == 1 else tuple(f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n))
    return tuple(out), files
