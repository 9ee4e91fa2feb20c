"""mergekit's YAML, read as it is: ``fuseflow merge mergekit.yml output=DIR`` runs the same merge.

A config is mergekit's when it has a ``merge_method`` field (fuseflow's own has ``method``). Each mergekit
field maps onto fuseflow as follows (docs/merge.md has the table); what has no fuseflow equivalent is an
error naming the field, never silently dropped:

- ``models:`` (with per-model ``parameters:``) is one slice of every model's full layer range, plus the
  ``base_model`` when it is not listed, as mergekit's ``MergePlanner.normalize_config`` does;
- ``slices:`` with ``sources: [{model, layer_range}]`` stack layer ranges (frankenmerges): output layer i
  of a slice reads layer ``layer_range[0] + i`` of each source; the embedding comes from the first slice's
  sources, the final norm and head from the last slice's, and ``num_hidden_layers`` of the output is the
  number of layers written;
- parameters are resolved per tensor with mergekit's rules (``mergekit.config.evaluate_setting`` and
  ``parameter_resolver``): a source's own parameters, then the slice's, then the top level; a value may
  be a list of ``{filter, value}`` (first filter that is a substring of the tensor name wins) and a list
  of numbers is a gradient, interpolated at ``t = i / (L − 1)`` for layer i of an L-layer slice and read
  at ``t = 0`` for the embedding, norm and head;
- mergekit's defaults apply: ``weight`` is required where mergekit requires it, ``density`` defaults to
  1.0 (no trimming), ``rescale`` / ``normalize`` / ``lambda`` per method as mergekit's registry;
- ``dtype``: mergekit computes in it; fuseflow always computes in float32 and writes ``out_dtype`` (or
  ``dtype``) — so a float16/bfloat16 mergekit merge rounds where this one does not.

Fields fuseflow adds to a mergekit file (as ``key=value`` overrides or in the file): ``output``
(required: mergekit takes it on the command line), ``overwrite``, ``shard_size``, ``threads``, ``seed``
(random methods: dare, della; mergekit's ``--random-seed``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from .config import parse_size, validate_parameters
from .plan import (
    FLOAT_DTYPES,
    MergeCheckError,
    MergePlan,
    ModelInfo,
    TensorTask,
    _check_architecture,
    _source,
    assign_shards,
    embedding_pair,
)

# ----------------------------------------------------------------------------------------------------------
# The config, with mergekit's field names and shapes (mergekit/config.py).
# ----------------------------------------------------------------------------------------------------------

Scalar = Union[float, int, bool, str]


class ConditionalParameter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: Union[Scalar, list[Scalar]]
    filter: str | None = None


ParameterSetting = Union[Scalar, list[Union[Scalar, ConditionalParameter]], ConditionalParameter]
Parameters = dict[str, ParameterSetting]


class InputModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: Parameters | None = None


class InputSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None


class OutputSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[InputSlice] = Field(min_length=1)
    base_model: str | None = None
    residual_weight: float | None = None
    parameters: Parameters | None = None


class MergekitConfig(BaseModel):
    """A mergekit merge config (``mergekit-yaml`` format) plus fuseflow's run fields."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, Any] | None = None
    base_model: str | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: dict[str, Any] | None = None
    chat_template: str | None = None
    # fuseflow's additions
    output: str | None = None
    overwrite: bool = False
    shard_size: Annotated[int, BeforeValidator(parse_size), Field(gt=0)] = 5 * 10**9
    threads: int | None = Field(default=1, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "MergekitConfig":
        if self.merge_method not in METHODS:
            unsupported = UNSUPPORTED.get(self.merge_method)
            raise ValueError(
                f"merge_method: {self.merge_method!r} "
                + (f"is not supported by fuseflow ({unsupported})" if unsupported else "is not a mergekit method")
                + f"; supported: {', '.join(sorted(METHODS))}"
            )
        if self.modules:
            raise ValueError("modules: multi-module (vision-language) configs are not supported; use models: or slices:")
        if bool(self.models) == bool(self.slices):
            raise ValueError("models / slices: give exactly one of them (as mergekit)")
        if self.tokenizer is not None:
            raise ValueError("tokenizer: vocabulary surgery is not supported; the output takes the base's tokenizer")
        if self.chat_template is not None:
            raise ValueError("chat_template: not supported; the output keeps the base's chat template")
        if self.tokenizer_source not in (None, "base") and self.tokenizer_source != self.layout_model:
            raise ValueError(
                f"tokenizer_source: {self.tokenizer_source!r} is not supported (only base, or the base model "
                "itself): the output takes the base's tokenizer and mergekit would permute embeddings for another"
            )
        for name in (self.dtype, self.out_dtype):
            if name is not None and name not in DTYPES:
                raise ValueError(f"dtype: {name!r} is not one of {', '.join(DTYPES)}")
        for i, s in enumerate(self.slices or []):
            if s.residual_weight is not None:
                raise ValueError(f"slices[{i}].residual_weight: not supported")
            if s.base_model is not None and s.base_model != self.base_model:
                raise ValueError(f"slices[{i}].base_model: a per-slice base is not supported; set base_model at the top")
        return self

    @property
    def layout_model(self) -> str:
        """The model whose config, tokenizer and tensor layout the output takes (mergekit: the base model,
        else the first model)."""
        if self.base_model:
            return self.base_model
        return self.models[0].model if self.models else self.slices[0].sources[0].model

    @property
    def out_torch_dtype(self) -> torch.dtype | None:
        name = self.out_dtype or self.dtype
        return DTYPES[name] if name else None


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------
# Methods: mergekit's name → fuseflow's method and parameters, with mergekit's defaults (its registry).
# ----------------------------------------------------------------------------------------------------------

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """A mergekit parameter: its fuseflow name, mergekit's default and a conversion."""

    name: str | None  # None: accepted and ignored (see ``why``)
    default: Any = None
    convert: Callable[[Any], Any] = lambda v: v
    why: str = ""


def _rescale(v: Any) -> str:
    return "l1" if v else "none"


INT8 = Param(None, False, why="a mergekit memory option; fuseflow never materialises the masks in the merge dtype")


def _gta(fuseflow: str, *, normalize: bool, rescale: bool, fixed: dict, sparse: dict[str, Param]) -> "MethodMap":
    shared = {
        "int8_mask": INT8,
        "normalize": Param("normalize", normalize),
        "lambda": Param("scaling", 1.0),
    }
    if "rescale" in sparse:
        shared["rescale"] = Param("rescale", rescale, _rescale)
    else:  # no sparsification: mergekit accepts and ignores them
        shared["rescale"] = Param(None, rescale, why="no sparsification, so nothing to rescale")
    per_model = {"weight": Param("weights", REQUIRED)}
    per_model["density"] = sparse.get("density", Param(None, 1.0, why="no sparsification"))
    per_model.update({k: v for k, v in sparse.items() if k not in ("density", "rescale")})
    return MethodMap(fuseflow, "required", shared, per_model, fixed)


@dataclass(frozen=True)
class MethodMap:
    fuseflow: str
    base: Literal["required", "optional", "input", "none"]
    shared: dict[str, Param] = field(default_factory=dict)
    per_model: dict[str, Param] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[int, int | None] = (1, None)  # (min, max) models besides the base


DENSITY = Param("density", 1.0)
RESCALE = Param("rescale", None)
METHODS: dict[str, MethodMap] = {
    "linear": MethodMap("linear", "input", {"normalize": Param("normalize", True)}, {"weight": Param("weights", REQUIRED)}),
    "task_arithmetic": _gta("task_arithmetic", normalize=False, rescale=False, fixed={}, sparse={}),
    "ties": _gta("ties", normalize=True, rescale=False, fixed={}, sparse={"density": DENSITY, "rescale": RESCALE}),
    "dare_ties": _gta("dare", normalize=False, rescale=True, fixed={"consensus": True},
                      sparse={"density": DENSITY, "rescale": RESCALE}),
    "dare_linear": _gta("dare", normalize=False, rescale=True, fixed={"consensus": False},
                        sparse={"density": DENSITY, "rescale": RESCALE}),
    "breadcrumbs": _gta("breadcrumbs", normalize=False, rescale=False, fixed={"consensus": False},
                        sparse={"density": DENSITY, "rescale": RESCALE, "gamma": Param("gamma", 0.01)}),
    "breadcrumbs_ties": _gta("breadcrumbs", normalize=False, rescale=False, fixed={"consensus": True},
                             sparse={"density": DENSITY, "rescale": RESCALE, "gamma": Param("gamma", 0.01)}),
    "della": _gta("della", normalize=True, rescale=True, fixed={"consensus": True},
                  sparse={"density": DENSITY, "rescale": RESCALE, "epsilon": Param("epsilon", 0.15)}),
    "della_linear": _gta("della", normalize=False, rescale=True, fixed={"consensus": False},
                         sparse={"density": DENSITY, "rescale": RESCALE, "epsilon": Param("epsilon", 0.15)}),
    # mergekit's sce falls back to equal weights below Σ mean(Δ²) = 1e-6 (fuseflow's sce docstring).
    "sce": MethodMap("sce", "required", {"int8_mask": INT8, "select_topk": Param("select_topk", 1.0)}, {},
                     {"uniform_below": 1e-6}),
    "slerp": MethodMap("slerp", "required", {"t": Param("t", REQUIRED)}, {}, inputs=(1, 1)),
    "nuslerp": MethodMap("nuslerp", "optional",
                         {"nuslerp_row_wise": Param("row_wise", False), "nuslerp_flatten": Param("flatten", True)},
                         {"weight": Param("weights", REQUIRED)}, inputs=(2, 2)),
    "multislerp": MethodMap("multislerp", "optional",
                            {"normalize_weights": Param("normalize_weights", True), "eps": Param("eps", 1e-8)},
                            {"weight": Param("weights", REQUIRED)}),
    "model_stock": MethodMap("model_stock", "required", {"filter_wise": Param("filter_wise", False)}, {}, inputs=(2, None)),
    "passthrough": MethodMap("passthrough", "none", {}, {"scale": Param("scale", None)}, inputs=(1, 1)),
}
UNSUPPORTED = {
    "karcher": "no fuseflow implementation yet",
    "arcee_fusion": "no fuseflow implementation yet",
    "nearswap": "no fuseflow implementation yet",
    "ram": "no fuseflow implementation yet",
    "ramplus_tl": "no fuseflow implementation yet",
}


# ----------------------------------------------------------------------------------------------------------
# Parameter resolution: mergekit's evaluate_setting, per tensor.
# ----------------------------------------------------------------------------------------------------------


def evaluate_setting(tensor: str, setting: Any, t: float) -> Any:
    """A parameter's value for ``tensor`` at gradient position ``t`` (mergekit's ``evaluate_setting``):
    a scalar as is; a list of numbers interpolated linearly at ``t``; a list of other scalars indexed at
    ``int(t·(n−1))``; a list of ``{filter, value}`` the first whose filter is absent, ``*`` or a substring
    of the tensor name; None when no filter matches."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(not isinstance(e, ConditionalParameter) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if not isinstance(cond, ConditionalParameter):
            cond = ConditionalParameter(value=cond)
        if cond.filter is None or cond.filter == "*" or cond.filter in tensor:
            return evaluate_setting(tensor, cond.value, t)
    return None


def resolve(name: str, scopes: list[tuple[str, Parameters | None]], tensor: str, t: float) -> tuple[Any, str | None]:
    """The first non-None value of ``name`` over ``scopes`` (highest precedence first) and where it was."""
    for where, params in scopes:
        if params and name in params:
            value = evaluate_setting(tensor, params[name], t)
            if value is not None:
                return value, where
    return None, None


# ----------------------------------------------------------------------------------------------------------
# Planning.
# ----------------------------------------------------------------------------------------------------------

LAYER = re.compile(r"^(.*?\.(?:layers|h|blocks)\.)(\d+)\.(.+)$")


@dataclass(frozen=True)
class Source:
    model: str
    info: ModelInfo
    first_layer: int
    parameters: Parameters | None
    where: str  # the config path of this source, for errors


def _layers(info: ModelInfo) -> int:
    n = info.config.get("num_hidden_layers")
    if isinstance(n, int):
        return n
    idx = {int(m.group(2)) for m in map(LAYER.match, info.tensors) if m}
    return max(idx) + 1 if idx else 0


def _slices(cfg: MergekitConfig, infos: dict[str, ModelInfo]) -> list[tuple[list[Source], int, Parameters | None, str]]:
    """``[(sources, n_layers, slice parameters, where)]`` with ``models:`` normalised to one slice."""
    if cfg.models:
        names = [m.model for m in cfg.models]
        srcs = [Source(m.model, infos[m.model], 0, m.parameters, f"models[{i}]") for i, m in enumerate(cfg.models)]
        if cfg.base_model and cfg.base_model not in names:
            srcs.append(Source(cfg.base_model, infos[cfg.base_model], 0, None, "base_model"))
        counts = {_layers(s.info) for s in srcs}
        if len(counts) != 1:
            raise MergeCheckError(
                "models: the models have different numbers of layers ("
                + ", ".join(f"{s.model}: {_layers(s.info)}" for s in srcs)
                + "); use slices: with layer_range"
            )
        return [(srcs, counts.pop(), None, "models")]
    out = []
    for i, s in enumerate(cfg.slices):
        srcs, lengths = [], set()
        for j, src in enumerate(s.sources):
            where = f"slices[{i}].sources[{j}]"
            lo, hi = src.layer_range
            n = _layers(infos[src.model])
            if not 0 <= lo < hi <= n:
                raise MergeCheckError(f"{where}.layer_range: [{lo}, {hi}] is not within the {n} layers of {src.model}")
            lengths.add(hi - lo)
            srcs.append(Source(src.model, infos[src.model], lo, src.parameters, where))
        if len(lengths) != 1:
            raise MergeCheckError(f"slices[{i}].sources: every source of a slice must span as many layers")
        names = [x.model for x in srcs]
        if cfg.base_model and cfg.base_model not in names and METHODS[cfg.merge_method].base == "required":
            raise MergeCheckError(f"slices[{i}].sources: the base_model {cfg.base_model} must be one of the sources")
        out.append((srcs, lengths.pop(), s.parameters, f"slices[{i}]"))
    return out


def _task_params(
    cfg: MergekitConfig, mm: MethodMap, tensor_out: str, inputs: list[tuple[Source, str]],
    slice_params: Parameters | None, t: float,
) -> dict[str, Any]:
    """fuseflow parameters of one output tensor; ``inputs`` are the method's models (not the base) with
    the name of the tensor each reads."""
    params: dict[str, Any] = dict(mm.fixed)
    shared_scopes = [("slice", slice_params), ("parameters", cfg.parameters)]
    for mk_name, p in mm.shared.items():
        value, _ = resolve(mk_name, shared_scopes, tensor_out, t)
        if value is None:
            if p.default is REQUIRED:
                raise MergeCheckError(f"parameters.{mk_name}: required by {cfg.merge_method} (for {tensor_out})")
            value = p.default
        if p.name is not None and value is not None:
            params[p.name] = p.convert(value)
    for mk_name, p in mm.per_model.items():
        values = []
        for src, tensor_in in inputs:
            value, _ = resolve(mk_name, [(src.where, src.parameters), *shared_scopes], tensor_in, t)
            if value is None:
                if p.default is REQUIRED:
                    raise MergeCheckError(
                        f"{src.where}.parameters.{mk_name}: required by {cfg.merge_method} (for {tensor_in})"
                    )
                value = p.default
            values.append(value)
        if p.name is None:
            continue
        if mk_name == "scale":  # passthrough: one model
            params["scale"] = values[0]
        elif p.name == "weights" or len(set(map(repr, values))) > 1:
            params[p.name] = [float(v) for v in values]
        else:
            params[p.name] = values[0]
    if mm.fuseflow in ("dare", "della"):
        params["seed"] = cfg.seed
    return params


def _known_params(cfg: MergekitConfig, mm: MethodMap) -> None:
    """Every parameter name in the file is one the method takes (mergekit ignores unknown ones; a typo
    would silently fall back to a default, so this names it)."""
    allowed = set(mm.shared) | set(mm.per_model)
    scopes: list[tuple[str, Parameters | None]] = [("parameters", cfg.parameters)]
    scopes += [(f"models[{i}].parameters", m.parameters) for i, m in enumerate(cfg.models or [])]
    for i, s in enumerate(cfg.slices or []):
        scopes.append((f"slices[{i}].parameters", s.parameters))
        scopes += [(f"slices[{i}].sources[{j}].parameters", src.parameters) for j, src in enumerate(s.sources)]
    for where, params in scopes:
        for name in params or {}:
            if name not in allowed:
                raise MergeCheckError(
                    f"{where}.{name}: {cfg.merge_method} takes no parameter {name!r} "
                    f"(it takes: {', '.join(sorted(allowed)) or 'none'})"
                )


def build_mergekit_plan(cfg: MergekitConfig, resolve_model: Callable[[str, str], Path]) -> tuple[MergePlan, dict]:
    """Check the models and plan every output tensor of a mergekit config, each with its own parameters.

    ``resolve_model(ref, field)`` turns a model reference into a directory. Returns the plan and the
    ``config.json`` updates of the output (``num_hidden_layers`` and ``layer_types`` when the layer
    stack changes)."""
    from .plan import inspect_model

    mm = METHODS[cfg.merge_method]
    _known_params(cfg, mm)
    refs: dict[str, str] = {}
    if cfg.base_model:
        refs[cfg.base_model] = "base_model"
    for i, m in enumerate(cfg.models or []):
        refs.setdefault(m.model, f"models[{i}].model")
    for i, s in enumerate(cfg.slices or []):
        for j, src in enumerate(s.sources):
            refs.setdefault(src.model, f"slices[{i}].sources[{j}].model")
    infos = {ref: inspect_model(resolve_model(ref, where)) for ref, where in refs.items()}
    layout = infos[cfg.layout_model]
    for info in infos.values():
        _check_architecture(layout, info)
    if mm.base == "required" and not cfg.base_model:
        raise MergeCheckError(f"base_model: {cfg.merge_method} needs a base model")

    slices = _slices(cfg, infos)
    pair = embedding_pair(set(layout.tensors))
    emb, head = pair if pair else (None, None)
    tied_out = layout.tied
    layer_suffixes: list[str] = []
    prefix = None
    other: list[str] = []
    for name in layout.tensors:
        m = LAYER.match(name)
        if m:
            prefix = m.group(1)
            if m.group(2) == "0":
                layer_suffixes.append(m.group(3))
        elif not (name == head and tied_out):
            other.append(name)
    if head is not None and not tied_out and head not in other:
        raise MergeCheckError(f"{layout.path}: tie_word_embeddings is false but the weights have no {head}")
    layer_suffixes.sort()

    def task_for(out_name: str, in_names: list[str], srcs: list[Source], slice_params, t: float, where: str):
        meta = layout.tensors.get(out_name) or layout.tensors[in_names[0]]
        refs_ = []
        for src, in_name in zip(srcs, in_names):
            if head is not None and tied_out and not src.info.tied and in_name == head:
                raise MergeCheckError(f"{src.info.path}: has its own {head} but the output ties it to {emb}")
            if in_name not in src.info.tensors and not (in_name == head and emb in src.info.tensors):
                raise MergeCheckError(f"{where}: {src.info.path} has no tensor {in_name}")
            ref = _source(src.info, in_name, head, emb)
            shape = src.info.tensors[ref.name].shape
            if shape != meta.shape:
                raise MergeCheckError(
                    f"{where}: tensor {in_name} of {src.info.path} has shape {list(shape)}, "
                    f"{out_name} of {layout.path} has {list(meta.shape)}"
                )
            refs_.append(ref)
        if meta.dtype not in FLOAT_DTYPES:  # buffers: copied from the first source
            return TensorTask(out_name, meta.shape, meta.dtype, refs_[0], (), None, 0)
        if mm.base == "none" or mm.base == "input" or (mm.base == "optional" and not cfg.base_model):
            inputs = list(zip(srcs, refs_))
            base_ref, base_input = refs_[0], False
        else:
            bi = next(i for i, s in enumerate(srcs) if s.model == cfg.base_model)
            base_ref, base_input = refs_[bi], True
            inputs = [(s, r) for i, (s, r) in enumerate(zip(srcs, refs_)) if i != bi]
        lo, hi = mm.inputs
        if len(inputs) < lo or (hi is not None and len(inputs) > hi):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            raise MergeCheckError(
                f"{where}: {cfg.merge_method} takes {want} model(s) besides the base, got {len(inputs)}"
            )
        params = _task_params(cfg, mm, out_name, [(s, r.name) for s, r in inputs], slice_params, t)
        try:
            params = validate_parameters(mm.fuseflow, params, len(inputs))
        except ValueError as e:
            raise MergeCheckError(f"{where} ({out_name}): {e}") from None
        out_dtype = cfg.out_torch_dtype or meta.dtype
        return TensorTask(out_name, meta.shape, out_dtype, base_ref, tuple(r for _, r in inputs), None, 0,
                          params=params, base_input=base_input)

    tasks: list[TensorTask] = []
    first_srcs, _, first_params, first_where = slices[0]
    last_srcs, _, last_params, last_where = slices[-1]
    pre = [n for n in other if "embed" in n]
    post = [n for n in other if n not in pre]
    for name in pre:
        tasks.append(task_for(name, [name] * len(first_srcs), first_srcs, first_params, 0.0, first_where))
    out_layer = 0
    layer_types = layout.config.get("layer_types")
    out_types = []
    for srcs, n_layers, slice_params, where in slices:
        for i in range(n_layers):
            t = i / (n_layers - 1) if n_layers > 1 else 1.0
            for suffix in layer_suffixes:
                out_name = f"{prefix}{out_layer}.{suffix}"
                in_names = [f"{prefix}{s.first_layer + i}.{suffix}" for s in srcs]
                tasks.append(task_for(out_name, in_names, srcs, slice_params, t, f"{where}, layer {i}"))
            if isinstance(layer_types, list):
                types = srcs[0].info.config.get("layer_types") or layer_types
                out_types.append(types[srcs[0].first_layer + i])
            out_layer += 1
    for name in post:
        tasks.append(task_for(name, [name] * len(last_srcs), last_srcs, last_params, 0.0, last_where))

    tasks, files = assign_shards(tasks, cfg.shard_size)
    config_updates: dict[str, Any] = {}
    if out_layer != _layers(layout):
        config_updates["num_hidden_layers"] = out_layer
        if isinstance(layer_types, list):
            config_updates["layer_types"] = out_types
    notes = (f"mergekit {cfg.merge_method} as fuseflow {mm.fuseflow}; {out_layer} layers",)
    plan = MergePlan(layout, tuple(infos[r] for r in refs if infos[r] is not layout), tuple(tasks), files,
                     tied_out, notes)
    return plan, config_updates

