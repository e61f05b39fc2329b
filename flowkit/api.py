"""The Python API: build one registered part by name."""

from __future__ import annotations

from typing import Any

from flowkit.build import Builder
from flowkit.kinds import KINDS
from flowkit.params import PartRef
from flowkit.plugins import Plugins, make_plugins
from flowkit.recipes.schema import validate_part

_default: Plugins | None = None


def default_plugins() -> Plugins:
    """The entry-point plugins, loaded once per process for the Python API."""
    global _default
    if _default is None:
        _default = make_plugins()
    return _default


def build(kind: str, name: str, *, plugins: Plugins | None = None, **kwargs: Any) -> Any:
    """Builds part ``kind:name``: ``build("coupling", "affine", in_shape=(4, 8, 8))``.

    Keyword arguments the kind's factory takes (``flowkit.kinds.KINDS[kind].shape_kwargs``) go
    to the factory; ``context_shape`` defaults to ``None``. Every other one is a parameter of the part, validated as a recipe table would be (nested parts as dicts:
    ``net={"use": "glow_cnn", "hidden": 32}``).
    """
    plugins = plugins or default_plugins()
    shape_kwargs = KINDS[kind].shape_kwargs if kind in KINDS else ()
    shape = {k: kwargs.pop(k) for k in shape_kwargs if k in kwargs}
    if "context_shape" in shape_kwargs:
        shape.setdefault("context_shape", None)
    ref = validate_part(plugins.registries, kind, {"use": name, **kwargs}, path=f"{kind}:{name}")
    return Builder(plugins.registries)(ref, **shape)


def ref(kind: str, name: str, *, plugins: Plugins | None = None, **params: Any) -> PartRef:
    """A validated `PartRef`, for composing parts in Python."""
    plugins = plugins or default_plugins()
    return validate_part(plugins.registries, kind, {"use": name, **params}, path=f"{kind}:{name}")
