"""Plugin loading: a new pluggy manager per call, nothing at import time.

Built-in parts and third-party parts load the same way, through the ``flowkit`` entry-point
group. ``FLOWKIT_LOAD_PLUGINS`` (comma-separated entry-point names) is an allow-list;
``FLOWKIT_DISABLE_PLUGINS`` blocks names.

A plugin that fails to import, whose hook raises, or that registers a part flowkit refuses
is *broken*: it is unloaded whole (every part it registered is withdrawn), recorded in
`Plugins.broken` with its package and the error, and every other plugin loads as usual. So a
broken plugin breaks only the recipes that use its parts, and they name it. ``-p`` modules
that cannot be imported, and hooks with misspelt names in them, are still errors: they were
asked for on this command line.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from flowkit import hookspecs
from flowkit.errors import PluginError
from flowkit.kinds import KINDS
from flowkit.registry import BrokenPlugin, Registries, make_register

LOCAL = "(not installed)"


def _names(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass
class Plugins:
    """A plugin manager, the package of each plugin, the broken ones, and the registries.

    ``broken`` holds the plugins that failed to import once the manager is made, and those
    whose hooks raised once `registries` has run the register hooks (and `add_commands`).
    """

    pm: pluggy.PluginManager
    packages: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: flowkit's own plugins that are not parts (the CLI's commands), registered before the entry points.
    builtin: tuple[object, ...] = ()
    broken: list[BrokenPlugin] = field(default_factory=list)
    _registries: Registries | None = field(default=None, repr=False)

    @property
    def registries(self) -> Registries:
        """Calls every register hook once (on first use) and caches the result."""
        if self._registries is None:
            self._registries = Registries(list(KINDS), self.broken)
            self._collect(self._registries)
        return self._registries

    def package(self, name: str) -> tuple[str, str]:
        """(distribution, version) of plugin ``name``; `LOCAL` for one that is not installed."""
        return self.packages.get(name, (LOCAL, ""))

    def distribution(self, plugin: object) -> tuple[str, str]:
        return self.package(self.pm.get_name(plugin) or "")

    def describe(self) -> list[dict[str, Any]]:
        """One record per plugin: name, package, version, hooks and parts; a broken plugin's
        record has no hooks or parts and an ``error``: where it failed and why."""
        parts_by_plugin: dict[str, list[str]] = {}
        for part in self.registries.all_parts():
            parts_by_plugin.setdefault(part.plugin, []).append(f"{part.kind}:{part.name}")
        rows = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            dist, version = self.package(name)
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            rows.append({"name": name, "package": dist, "version": version, "hooks": hooks,
                         "parts": parts_by_plugin.get(name, [])})
        for broken in self.broken:
            rows.append({"name": broken.name, "package": broken.package, "version": broken.version,
                         "hooks": [], "parts": [], "error": broken.reason})
        return sorted(rows, key=lambda row: row["name"])

    def add_commands(self, cli: Any) -> None:
        """Calls ``flowkit_add_commands`` plugin by plugin; a plugin that raises is broken and
        the commands it added are removed."""
        for impl in reversed(self.pm.hook.flowkit_add_commands.get_hookimpls()):
            before = dict(cli.commands)
            self._call(impl, "flowkit_add_commands", lambda impl=impl: impl.function(cli=cli), [])
            if impl.plugin_name in {b.name for b in self.broken}:
                for name in set(cli.commands) - set(before):
                    del cli.commands[name]
                cli.commands.update(before)

    def _collect(self, registries: Registries) -> None:
        for kind in KINDS.values():
            # Called implementation by implementation, so each part records its plugin.
            for impl in reversed(getattr(self.pm.hook, kind.hook).get_hookimpls()):
                dist, version = self.package(impl.plugin_name)
                tried: list[str] = []
                register = make_register(registries[kind.name], impl.plugin_name, dist, version, tried)
                self._call(impl, kind.hook, lambda impl=impl, register=register: impl.function(register=register),
                           tried)

    def _call(self, impl: Any, stage: str, call: Callable[[], object], tried: list[str]) -> None:
        if self.pm.get_plugin(impl.plugin_name) is None:  # broken by an earlier hook
            return
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - any failure of a plugin's own code breaks that plugin only
            earlier = [f"{p.kind}:{p.name}" for p in self._registries.all_parts()
                       if p.plugin == impl.plugin_name] if self._registries is not None else []
            self._break(impl.plugin_name, stage, exc, tuple(dict.fromkeys(earlier + tried)))

    def _break(self, name: str, stage: str, exc: BaseException, parts: tuple[str, ...] = ()) -> None:
        dist, version = self.package(name)
        broken = BrokenPlugin(name, dist, version, stage, _one_line(exc), parts,
                              "".join(traceback.format_exception(exc)))
        self.broken.append(broken)
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        if self._registries is not None:
            self._registries.withdraw(broken)


def _load_entry_points(
    plugins: Plugins, blocked: set[str], allowed: set[str] | None, distribution: str | None
) -> None:
    """Registers every ``flowkit`` entry point (or the ``allowed`` ones, or those of
    ``distribution``), each on its own: one that fails to import or to register is recorded as
    broken and the others still load."""
    pm = plugins.pm
    for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
        if ep.name in blocked or (allowed is not None and ep.name not in allowed):
            continue
        if distribution is not None and (ep.dist is None or ep.dist.metadata["name"] != distribution):
            continue
        if pm.get_plugin(ep.name) is not None or ep.name in plugins.packages:
            continue  # the same distribution twice on sys.path: pluggy keeps the first too
        plugins.packages[ep.name] = (ep.dist.metadata["name"], ep.dist.version) if ep.dist else (LOCAL, "")
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:  # noqa: BLE001 - ImportError, SyntaxError, a bad hookimpl signature, ...
            plugins._break(ep.name, "import", exc)
            continue
        unknown = [h.name for h in pm.get_hookcallers(module) or [] if not h.has_spec()]
        if unknown:
            plugins._break(ep.name, "import", PluginError(
                f"it implements {', '.join(unknown)}, which is not a flowkit hook (a misspelt name?)"))


def make_plugins(
    *, entry_points: bool = True, extra: Iterable[object | str] = (), environment: bool = True,
    distribution: str | None = None, builtin: Iterable[ModuleType] = (),
) -> Plugins:
    """A fresh plugin manager with the hookspecs, the entry points and ``extra`` plugins.

    ``builtin``: modules of flowkit itself that implement hooks without registering parts (the
    CLI's own commands, `flowkit.cli.commands`), registered first, under their module name and
    package flowkit, and never blocked: the environment's allow- and deny-lists choose among
    plugins, not whether ``flowkit run`` exists.
    ``extra`` holds modules, objects or importable module names (the CLI's ``-p``).
    ``environment=False`` ignores ``FLOWKIT_LOAD_PLUGINS`` and ``FLOWKIT_DISABLE_PLUGINS``;
    ``distribution`` loads only that package's entry points (``flowkit docs`` describes every
    built-in, whatever else is installed and whatever the shell says).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    plugins = Plugins(pm, builtin=tuple(builtin))
    for module in plugins.builtin:
        pm.register(module, name=module.__name__)
        plugins.packages[module.__name__] = (hookspecs.PROJECT, importlib.metadata.version(hookspecs.PROJECT))
    blocked = (_names("FLOWKIT_DISABLE_PLUGINS") or set()) if environment else set()
    for name in blocked:
        pm.set_blocked(name)
    if entry_points:
        _load_entry_points(plugins, blocked, _names("FLOWKIT_LOAD_PLUGINS") if environment else None, distribution)
    for plugin in extra:
        if isinstance(plugin, str):
            try:
                module = importlib.import_module(plugin)
            except ImportError as exc:
                raise PluginError(f'Plugin module "{plugin}" could not be imported: {exc}.') from exc
            if pm.is_registered(module):  # an installed entry point already loaded this very module
                continue
            pm.register(module, name=plugin)
        else:
            name = getattr(plugin, "__name__", None) or f"{type(plugin).__qualname__}-{id(plugin):x}"
            pm.register(plugin, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"A plugin implements an unknown hook: {exc}.") from exc
    return plugins
