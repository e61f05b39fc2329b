"""Typed registries of parts: one namespace per kind, filled by the register hooks."""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from flowkit.errors import PluginError, UnknownPartError
from flowkit.kinds import KINDS
from flowkit.params import NoParams

NAME_RE = re.compile(r"[a-z][a-z0-9_]*\Z")


@dataclass(frozen=True)
class Part:
    """One registered part: its factory, its Params class, and who registered it."""

    kind: str
    name: str
    factory: Callable[..., Any]
    params: type
    summary: str
    plugin: str
    distribution: str
    version: str


class RegisterFn(Protocol):
    def __call__(
        self, name: str, factory: Callable[..., Any], *, params: type = ..., summary: str | None = ...
    ) -> None: ...


class Registry:
    """The parts of one kind, by name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._parts: dict[str, Part] = {}

    def add(self, part: Part) -> None:
        if not NAME_RE.match(part.name):
            raise PluginError(
                f'Plugin "{part.plugin}" registers {self.kind} "{part.name}", which is not a valid '
                "name: use lower-case letters, digits and underscores, starting with a letter."
            )
        if not (dataclasses.is_dataclass(part.params) and isinstance(part.params, type)):
            raise PluginError(
                f'Plugin "{part.plugin}" registers {self.kind} "{part.name}" with params='
                f"{part.params!r}, which is not a dataclass type."
            )
        required = KINDS[self.kind].assembly_params if self.kind in KINDS else ()
        declared = {f.name for f in dataclasses.fields(part.params)}
        missing = [name for name in required if name not in declared]
        if missing:
            raise PluginError(
                f'Plugin "{part.plugin}" registers {self.kind} "{part.name}" whose params '
                f"{part.params.__name__} lack {', '.join(missing)}. Every {self.kind} must declare "
                f"{', '.join(required)}: models set them copy by copy when they assemble steps "
                f"(docs/plugin-hooks.md, the {self.kind} contract)."
            )
        old = self._parts.get(part.name)
        if old is not None:
            raise PluginError(
                f'{self.kind} "{part.name}" is registered twice: by plugin "{old.plugin}" '
                f'(package {old.distribution} {old.version}) and by plugin "{part.plugin}" '
                f"(package {part.distribution} {part.version}). Uninstall or disable one of them "
                "(FLOWKIT_DISABLE_PLUGINS)."
            )
        self._parts[part.name] = part

    def get(self, name: str) -> Part:
        try:
            return self._parts[name]
        except KeyError:
            names = sorted(self._parts)
            close = difflib.get_close_matches(name, names, n=1)
            raise UnknownPartError(self.kind, name, names, close[0] if close else None) from None

    def __contains__(self, name: object) -> bool:
        return name in self._parts

    def __iter__(self) -> Iterator[Part]:
        return iter(sorted(self._parts.values(), key=lambda p: p.name))

    def names(self) -> list[str]:
        return sorted(self._parts)


class Registries:
    """All registries, one per kind, as filled by a plugin manager."""

    def __init__(self, kinds: list[str]) -> None:
        self._by_kind = {kind: Registry(kind) for kind in kinds}

    def __getitem__(self, kind: str) -> Registry:
        try:
            return self._by_kind[kind]
        except KeyError:
            raise UnknownPartError(
                "kind of part", kind, sorted(self._by_kind),
                (difflib.get_close_matches(kind, list(self._by_kind), n=1) or [None])[0],
            ) from None

    def kinds(self) -> list[str]:
        return list(self._by_kind)

    def part(self, kind: str, name: str) -> Part:
        return self[kind].get(name)

    def all_parts(self) -> Iterator[Part]:
        for registry in self._by_kind.values():
            yield from registry


def make_register(registry: Registry, plugin: str, distribution: str, version: str) -> RegisterFn:
    """The ``register`` callable handed to one plugin's hook for one kind."""

    def register(
        name: str, factory: Callable[..., Any], *, params: type = NoParams, summary: str | None = None
    ) -> None:
        doc = summary or (factory.__doc__ or "").strip().splitlines()[0:1]
        registry.add(
            Part(
                kind=registry.kind,
                name=name,
                factory=factory,
                params=params,
                summary=doc if isinstance(doc, str) else (doc[0] if doc else ""),
                plugin=plugin,
                distribution=distribution,
                version=version,
            )
        )

    return register
