"""Turning a validated `PartRef` into a part: the ``build`` callable handed to factories."""

from __future__ import annotations

from typing import Any

from flowkit.params import PartRef
from flowkit.recipes.schema import validate_params
from flowkit.registry import Registries


class Builder:
    """Resolves nested parts: ``build(ref, **shape_kwargs)`` calls the registered factory.

    Factories receive ``build`` itself, so composite parts (a Glow step and its coupling)
    build their children by reference and never import another plugin.
    """

    def __init__(self, registries: Registries) -> None:
        self.registries = registries

    def __call__(self, ref: PartRef, **shape_kwargs: Any) -> Any:
        part = self.registries.part(ref.kind, ref.use)
        params = ref.params if ref.params is not None else self.default_params(ref.kind, ref.use)
        return part.factory(params, build=self, **shape_kwargs)

    def default_params(self, kind: str, name: str) -> Any:
        return validate_params(self.registries, kind, name, {}, path=f"{kind}:{name}")
