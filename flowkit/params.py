"""Typed parameters of parts.

Each part declares ``@dataclass(frozen=True, kw_only=True) class Params`` whose fields have
TOML-representable types: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``,
``tuple[int, ...]`` / ``tuple[float, ...]`` / ``tuple[str, ...]``, or a nested part
(`PartRef`, declared with `part_field`). A field without a default is required.
Every field carries a one-line ``metadata={"doc": ...}``; `param` and `part_field` set it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PartRef:
    """A nested part chosen in a recipe: ``{ use = "affine", ... }``.

    ``params`` is the validated Params instance of that part, or ``None`` for its defaults
    (a Params default cannot build the nested Params, since the registry is not known yet).
    """

    kind: str
    use: str
    params: Any = None

    def to_toml(self) -> dict[str, Any]:
        table: dict[str, Any] = {"use": self.use}
        if self.params is not None:
            table.update(params_to_toml(self.params))
        return table


def param(default: Any = dataclasses.MISSING, doc: str = "", **kwargs: Any) -> Any:
    """A documented Params field: ``width: int = param(64, "hidden channels")``."""
    metadata = {"doc": doc, **kwargs.pop("metadata", {})}
    if isinstance(default, (list, dict, set)):
        raise TypeError("Params defaults must be immutable; use a tuple.")
    return field(default=default, metadata=metadata, **kwargs)


def part_field(kind: str, default: str | None, doc: str = "") -> Any:
    """A nested part of ``kind``; ``default`` is the registered name used when omitted."""
    metadata = {"doc": doc, "kind": kind}
    if default is None:
        return field(metadata=metadata)
    return field(default_factory=lambda: PartRef(kind, default), metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class NoParams:
    """For parts without parameters."""


def params_to_toml(params: Any) -> dict[str, Any]:
    """A Params instance as the TOML table that would produce it (defaults included)."""
    table: dict[str, Any] = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if isinstance(value, PartRef):
            table[f.name] = value.to_toml()
        elif isinstance(value, tuple):
            table[f.name] = list(value)
        else:
            table[f.name] = value
    return table


def override_nested(ref: PartRef, kind: str, key: str, value: Any, defaults: Any) -> PartRef:
    """``ref`` with parameter ``key`` set to ``value`` in every nested part of ``kind``.

    Models use it to vary one setting per level or per step (a net's width per Wavelet Flow
    level, a coupling's parity per step) without knowing how deep the part sits. Parts of
    ``kind`` that have no such parameter are left alone. ``defaults(kind, name)`` returns the
    default Params of a part (`flowkit.build.Builder.default_params`).
    """
    params = ref.params if ref.params is not None else defaults(ref.kind, ref.use)
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(params):
        child = getattr(params, f.name)
        if isinstance(child, PartRef):
            changes[f.name] = override_nested(child, kind, key, value, defaults)
        elif ref.kind == kind and f.name == key:
            changes[f.name] = value
    return PartRef(ref.kind, ref.use, dataclasses.replace(params, **changes))
