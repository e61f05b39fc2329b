"""Turning a validated `PartRef` into a part: the ``build`` callable handed to factories."""

from __future__ import annotations

import dataclasses
from typing import Any

from flowkit.errors import RecipeError
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

    def with_params(self, ref: PartRef, optional: tuple[str, ...] = (), *, who: str = "this part",
                    **changes: Any) -> PartRef:
        """``ref`` with some params replaced (defaults filled in first); names in ``optional``
        are skipped when the part has no such parameter, others are an error naming ``who``."""
        params = ref.params if ref.params is not None else self.default_params(ref.kind, ref.use)
        names = {f.name for f in dataclasses.fields(params)}
        missing = [k for k in changes if k not in names and k not in optional]
        if missing:
            raise RecipeError(
                f'{ref.kind} "{ref.use}" has no parameter {", ".join(missing)}, which {who} sets on every '
                f"step; choose a {ref.kind} that has it."
            )
        kept = {k: v for k, v in changes.items() if k in names}
        return PartRef(ref.kind, ref.use, dataclasses.replace(params, **kept))

    def default_params(self, kind: str, name: str) -> Any:
        return validate_params(self.registries, kind, name, {}, path=f"{kind}:{name}")
