"""The ``fuseflow merge`` config: one pydantic model, validated at load, every error naming its field.

It is read by :func:`fuseflow.config.load_config`, as every fuseflow config: YAML, ``key=value`` overrides,
:class:`fuseflow.config.ConfigError` naming each offending field.

A method's ``parameters`` are checked against the keyword-only arguments of its registered function
(names, types, defaults): the function's signature is the single statement of what a method accepts.
"""

from __future__ import annotations

import functools
import inspect
import re
import typing
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from fuseflow.config import validation_message

from .methods import MERGE_METHODS, MergeMethod, get_method

_SIZE_UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
}


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as ``"5GB"``, ``"500MB"`` or ``"2GiB"`` (as HF ``max_shard_size``)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 5GB or 500MB, got {value!r}")
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 5GB, 500MB or 2GiB, got {value!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def method_parameters(method: MergeMethod) -> dict[str, tuple[Any, Any]]:
    """``{name: (type, default)}`` of a method's parameters (``...`` for a required one), from its signature."""
    hints = typing.get_type_hints(method.fn, include_extras=True)
    out = {}
    for name, p in inspect.signature(method.fn).parameters.items():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            out[name] = (hints[name], ... if p.default is inspect.Parameter.empty else p.default)
    return out


def _is_per_model(tp: Any) -> bool:
    return any(typing.get_origin(a) is list for a in (tp, *typing.get_args(tp)))


@functools.lru_cache(maxsize=None)
def _parameters_model(method_name: str) -> tuple[type[BaseModel], dict[str, tuple[Any, Any]]]:
    # Built once per method: a mergekit config validates the parameters of every tensor.
    spec = method_parameters(get_method(method_name))
    model = create_model(  # type: ignore[call-overload]
        f"{method_name}_parameters", __config__=ConfigDict(extra="forbid"), **spec
    )
    return model, spec


def validate_parameters(method_name: str, params: dict[str, Any], n_models: int) -> dict[str, Any]:
    """``params`` checked against the method's signature, defaults filled in. A per-model parameter
    (``weights``; ``density`` where a method takes one value or one per model) must have one value per
    model when it is a list."""
    model, spec = _parameters_model(method_name)
    try:
        values = model.model_validate(params).model_dump()
    except ValidationError as e:
        allowed = ", ".join(spec) or "none"
        raise ValueError(
            "; ".join(f"parameters.{'.'.join(map(str, err['loc']))}: {validation_message(err)}" for err in e.errors())
            + f" (method {method_name!r} takes: {allowed})"
        ) from None
    for name, (tp, _) in spec.items():
        if _is_per_model(tp) and isinstance(values[name], list) and len(values[name]) != n_models:
            raise ValueError(f"parameters.{name}: {len(values[name])} values for {n_models} models (one per model)")
    return values


class MergeConfig(BaseModel):
    """See examples/merge.yaml for every field with its default."""

    model_config = ConfigDict(extra="forbid")

    method: str
    base: str
    models: list[str] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    output: str
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    shard_size: Annotated[int, BeforeValidator(parse_size), Field(gt=0)] = 5 * 10**9
    vocab_mismatch: Literal["error", "merge_common"] = "error"
    overwrite: bool = False
    threads: int | None = Field(default=1, ge=1)

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        if name not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {name!r}; choose one of {', '.join(sorted(MERGE_METHODS))}")
        return name

    @model_validator(mode="after")
    def _check_parameters(self) -> "MergeConfig":
        self.parameters = validate_parameters(self.method, self.parameters, len(self.models))
        return self
