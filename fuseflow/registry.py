"""One small registry type for every family of interchangeable things (engines, fusion functions, vocab maps,
sequence aligners, …), as mergekit's ``@merge_method``: each entry is a function or class registered by a
decorator under the name the config uses, and an unknown name is an error that names the config field and
the choices (issue 13: one registry type instead of hand-written copies).

A ``Registry`` is a ``dict`` (``name in REG``, ``REG[name]``, ``sorted(REG)`` work as before); ``lookup``
is the checked access; its error starts with the config field (``method: unknown merge method …``). ``builtins`` maps names to the modules that register them, imported on first lookup,
so an optional dependency (vllm) is only imported when its entry is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """``name -> entry`` of one family; ``what`` names the family in errors, ``field`` the config field."""

    def __init__(self, what: str, field: str | None = None, builtins: Mapping[str, str] | None = None):
        super().__init__()
        self.what = what
        self.field = field
        self.builtins = dict(builtins or {})

    def register(self, name: str, entry: T | None = None) -> Callable[[T], T]:
        """Decorator (or, with ``entry``, a plain call) adding ``entry`` under ``name``; a name is taken once."""

        def add(obj: T) -> T:
            if name in self and self[name] is not obj:
                raise ValueError(f"{self.what} {name!r} is already registered (registered twice: by {_origin(self[name])}"
                                 f" and {_origin(obj)})")
            self[name] = obj
            return obj

        if entry is not None:
            return add(entry)
        return add

    def names(self) -> list[str]:
        """Every name, registered or built in (not yet imported)."""
        return sorted(set(self) | set(self.builtins))

    def lookup(self, name: str) -> T:
        """The entry ``name``, importing its built-in module first if needed; a ``ValueError`` naming the
        config field and the choices otherwise."""
        if name not in self and name in self.builtins:
            importlib.import_module(self.builtins[name])
        if name not in self:
            field = f"{self.field}: " if self.field else ""  # as the config loader names a field
            raise ValueError(f"{field}unknown {self.what} {name!r}; choose one of {', '.join(self.names())}")
        return self[name]


def _origin(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"
