"""Plugin loading: a new pluggy manager per call, nothing at import time.

Built-in parts and third-party parts load the same way, through the ``flowkit`` entry-point
group. ``FLOWKIT_LOAD_PLUGINS`` (comma-separated entry-point names) is an allow-list;
``FLOWKIT_DISABLE_PLUGINS`` blocks names.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from flowkit import hookspecs
from flowkit.errors import PluginError
from flowkit.kinds import KINDS
from flowkit.registry import Registries, make_register

LOCAL = "(not installed)"


def _names(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


@dataclass
class Plugins:
    """A plugin manager and the registries its plugins filled."""

    pm: pluggy.PluginManager
    _registries: Registries | None = field(default=None, repr=False)

    @property
    def registries(self) -> Registries:
        """Calls every register hook once (on first use) and caches the result."""
        if self._registries is None:
            self._registries = _collect(self.pm)
        return self._registries

    def distribution(self, plugin: object) -> tuple[str, str]:
        for p, dist in self.pm.list_plugin_distinfo():
            if p is plugin:
                return dist.metadata["name"], dist.version
        return LOCAL, ""

    def describe(self) -> list[dict[str, Any]]:
        """One record per plugin: name, package, version, hooks and parts."""
        parts_by_plugin: dict[str, list[str]] = {}
        for part in self.registries.all_parts():
            parts_by_plugin.setdefault(part.plugin, []).append(f"{part.kind}:{part.name}")
        rows = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda item: item[0]):
            if plugin is None:
                continue
            dist, version = self.distribution(plugin)
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            rows.append(
                {"name": name, "package": dist, "version": version, "hooks": hooks,
                 "parts": parts_by_plugin.get(name, [])}
            )
        return rows


def make_plugins(*, entry_points: bool = True, extra: Iterable[object | str] = ()) -> Plugins:
    """A fresh plugin manager with the hookspecs, the entry points and ``extra`` plugins.

    ``extra`` holds modules, objects or importable module names (the CLI's ``-p``).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = _names("FLOWKIT_DISABLE_PLUGINS") or set()
    for name in blocked:
        pm.set_blocked(name)
    if entry_points:
        allowed = _names("FLOWKIT_LOAD_PLUGINS")
        if allowed is None:
            pm.load_setuptools_entrypoints(hookspecs.PROJECT)
        else:
            for name in sorted(allowed - blocked):
                pm.load_setuptools_entrypoints(hookspecs.PROJECT, name=name)
    for plugin in extra:
        if isinstance(plugin, str):
            try:
                module = importlib.import_module(plugin)
            except ImportError as exc:
                raise PluginError(f'Plugin module "{plugin}" could not be imported: {exc}.') from exc
            pm.register(module, name=plugin)
        else:
            name = getattr(plugin, "__name__", None) or f"{type(plugin).__qualname__}-{id(plugin):x}"
            pm.register(plugin, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"A plugin implements an unknown hook: {exc}.") from exc
    return Plugins(pm)


def _collect(pm: pluggy.PluginManager) -> Registries:
    registries = Registries(list(KINDS))
    dist_of = {id(p): (d.metadata["name"], d.version) for p, d in pm.list_plugin_distinfo()}
    for kind in KINDS.values():
        hook = getattr(pm.hook, kind.hook)
        # Called implementation by implementation, so each part records its plugin.
        for impl in reversed(hook.get_hookimpls()):
            dist, version = dist_of.get(id(impl.plugin), (LOCAL, ""))
            register = make_register(registries[kind.name], impl.plugin_name, dist, version)
            impl.function(register=register)
    return registries
