"""Typed registries of parts: one namespace per kind, filled by the register hooks."""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from flowkit.errors import FlowkitError, PluginError, UnknownPartError
from flowkit.kinds import KINDS
from flowkit.params import RECIPE_TYPES, NoParams, params_field_problems

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
    #: The forms of context its factory takes as ``context_shape`` (`flowkit.contracts.context`):
    #: ``"spatial"``, ``"vector"``; none for a part that takes no context.
    contexts: tuple[str, ...] = ()

    def accepts(self, form: str) -> bool:
        return form in self.contexts


#: Every form of context there is (`flowkit.contracts.context`).
CONTEXT_FORMS = ("spatial", "vector")


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that was not loaded: its module failed to import, or one of its hooks raised
    (a part it registers refused included). ``flowkit plugins`` lists it; every other plugin
    loads as usual.

    Args:
        name: the plugin name (the entry-point name, or the ``-p`` module).
        package: its distribution, `flowkit.plugins.LOCAL` for a ``-p`` module.
        version: the distribution's version.
        stage: ``"import"``, or the hook that raised (``flowkit_register_couplings``).
        error: the exception, on one line (``ImportError: No module named 'nflows2'``).
        parts: ``kind:name`` of every part it registered, or tried to, before it failed.
        detail: the formatted traceback, shown with ``--traceback`` or ``FLOWKIT_DEBUG=1``.
    """

    name: str
    package: str
    version: str
    stage: str
    error: str
    parts: tuple[str, ...] = ()
    detail: str = ""

    @property
    def label(self) -> str:
        return f'plugin "{self.name}" (package {self.package} {self.version})'.replace(" )", ")")

    @property
    def reason(self) -> str:
        """What failed, as a clause: "failed to import (ImportError: ...)"."""
        if self.stage == "import":
            return f"failed to import ({self.error})"
        if self.error.startswith(f"{PluginError.__name__}: "):  # flowkit refused what the hook registered
            return f"was refused in {self.stage} ({self.error.partition(': ')[2].rstrip('.')})"
        return f"raised in {self.stage} ({self.error})"


class UnavailablePartError(UnknownPartError):
    """A part name that a broken plugin registers, or that two plugins register."""

    def __init__(self, kind: str, name: str, message: str) -> None:
        self.kind, self.name, self.available, self.suggestion = kind, name, [], None
        FlowkitError.__init__(self, message)


class RegisterFn(Protocol):
    def __call__(
        self, name: str, factory: Callable[..., Any], *, params: type = ..., summary: str | None = ...,
        contexts: tuple[str, ...] | None = ...,
    ) -> None: ...


class Registry:
    """The parts of one kind, by name."""

    def __init__(self, kind: str, broken: list[BrokenPlugin] | None = None) -> None:
        self.kind = kind
        self._parts: dict[str, Part] = {}
        # Names that must not resolve although a plugin may have registered them: the parts of
        # broken plugins and names registered twice, each with the sentence that says why.
        self._unavailable: dict[str, str] = {}
        # The broken plugins of the whole manager (shared by every kind), named on a miss.
        self._broken = broken if broken is not None else []

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
        problems = params_field_problems(part.params, KINDS)
        if problems:
            raise PluginError(
                f'Plugin "{part.plugin}" registers {self.kind} "{part.name}" whose params '
                f"{part.params.__name__} no recipe could set: {'; '.join(problems)}. Params fields may be "
                f"{RECIPE_TYPES}."
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
        unknown = [form for form in part.contexts if form not in CONTEXT_FORMS]
        needed = [form for form in (KINDS[self.kind].contexts if self.kind in KINDS else ()) if form not in part.contexts]
        if unknown or needed:
            raise PluginError(
                f'Plugin "{part.plugin}" registers {self.kind} "{part.name}" with contexts = {list(part.contexts)}: '
                + (f"{', '.join(unknown)} is not a form of context (forms: {', '.join(CONTEXT_FORMS)})" if unknown else
                   f"every {self.kind} must take {', '.join(needed)} contexts (the {self.kind} contract, "
                   "flowkit.contracts.context)") + "."
            )
        old = self._parts.get(part.name)
        if old is not None:
            message = (
                f'{self.kind} "{part.name}" is registered twice: by plugin "{old.plugin}" '
                f'(package {old.distribution} {old.version}) and by plugin "{part.plugin}" '
                f"(package {part.distribution} {part.version}). Uninstall or disable one of them "
                "(FLOWKIT_DISABLE_PLUGINS)."
            )
            # Neither wins: a recipe naming it would otherwise run whichever loaded first.
            self._unavailable[part.name] = f'"{part.name}" cannot be used: {message}'
            raise PluginError(message)
        self._parts[part.name] = part

    def withdraw(self, plugin: str, names: list[str], why: str) -> None:
        """Removes every part of ``plugin`` (a broken plugin); ``names`` and those parts then
        fail to resolve with ``why``."""
        own = [n for n, p in self._parts.items() if p.plugin == plugin]
        for name in own:
            del self._parts[name]
        for name in own + names:  # a name it registered twice keeps its "registered twice" sentence
            self._unavailable.setdefault(name, f'"{name}" is the {self.kind} of {why}')

    def get(self, name: str) -> Part:
        if name in self._unavailable:
            raise UnavailablePartError(self.kind, name, self._unavailable[name])
        try:
            return self._parts[name]
        except KeyError:
            names = self.names()
            close = difflib.get_close_matches(name, names, n=1)
            error = UnknownPartError(self.kind, name, names, close[0] if close else None)
            # A plugin that failed before registering anything may be the one that provides it.
            silent = [b for b in self._broken if not b.parts]
            if silent:
                error.args = (f"{error} Not loaded, and perhaps providing it: "
                              + "; ".join(f"{b.label}, which {b.reason}" for b in silent)
                              + ". `flowkit plugins` lists broken plugins.",)
            raise error from None

    def __contains__(self, name: object) -> bool:
        return name in self._parts and name not in self._unavailable

    def __iter__(self) -> Iterator[Part]:
        """The parts that resolve (a name registered twice does not), sorted by name."""
        return iter([self._parts[name] for name in self.names()])

    def names(self) -> list[str]:
        return sorted(name for name in self._parts if name not in self._unavailable)


class Registries:
    """All registries, one per kind, as filled by a plugin manager."""

    def __init__(self, kinds: list[str], broken: list[BrokenPlugin] | None = None) -> None:
        self.broken = broken if broken is not None else []
        self._by_kind = {kind: Registry(kind, self.broken) for kind in kinds}

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

    def withdraw(self, broken: BrokenPlugin) -> None:
        """Removes the parts of a broken plugin from every kind; looking them up names the
        plugin and its failure."""
        tried: dict[str, list[str]] = {}
        for entry in broken.parts:
            kind, _, name = entry.partition(":")
            tried.setdefault(kind, []).append(name)
        why = f"{broken.label}, which {broken.reason}; fix or uninstall it (`flowkit plugins` lists it)."
        for kind, registry in self._by_kind.items():
            registry.withdraw(broken.name, tried.get(kind, []), why)


def make_register(
    registry: Registry, plugin: str, distribution: str, version: str, tried: list[str] | None = None
) -> RegisterFn:
    """The ``register`` callable handed to one plugin's hook for one kind. ``tried`` collects
    ``kind:name`` of every call, so a plugin that fails midway can be withdrawn whole."""

    def register(
        name: str, factory: Callable[..., Any], *, params: type = NoParams, summary: str | None = None,
        contexts: tuple[str, ...] | None = None,
    ) -> None:
        if tried is not None:
            tried.append(f"{registry.kind}:{name}")
        if contexts is None:  # what every part of the kind takes (a model: none unless it says so)
            contexts = KINDS[registry.kind].contexts if registry.kind in KINDS else ()
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
                contexts=tuple(contexts),
            )
        )

    return register
