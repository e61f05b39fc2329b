"""Turning a validated `PartRef` into a part: the ``build`` callable handed to factories."""

from __future__ import annotations

from typing import Any

from flowkit.params import PartRef, declared_copies, make_copy
from flowkit.recipes.schema import validate_params
from flowkit.registry import Registries


class Builder:
    """Resolves nested parts: ``build(ref, **shape_kwargs)`` calls the registered factory.

    Factories receive ``build`` itself, so composite parts (a Glow step and its coupling)
    build their children by reference and never import another plugin:

    - ``build(ref, **shape)``: the part ``ref`` names, with its Params;
    - ``build.copies(params, field)``: the copies of a nested part that ``params`` declares
      (`flowkit.params.AssemblesCopies`), each with its derived values, as the recipe loader
      checked and recorded them;
    - ``build.ref(kind, name, **values)``: a part the factory chooses itself (Glow's 1x1
      convolution), validated like a recipe table.

    ``built`` records ``(path, params)`` of every part that came from the recipe, in build
    order, so a test can compare what was built with the resolved recipe.
    """

    def __init__(self, registries: Registries) -> None:
        self.registries = registries
        self.built: list[tuple[str, Any]] = []

    def __call__(self, ref: PartRef, **shape_kwargs: Any) -> Any:
        part = self.registries.part(ref.kind, ref.use)
        params = ref.params if ref.params is not None else self.default_params(ref.kind, ref.use)
        if ref.path:
            self.built.append((ref.path, params))
        return part.factory(params, build=self, **shape_kwargs)

    def copies(self, params: Any, field: str) -> list[PartRef]:
        copies = declared_copies(params)[field]
        template: PartRef = getattr(params, field)
        path = template.path or field
        return [make_copy(template, copies.derive, i, self.default_params, f"{path}[{i}]")
                for i in range(copies.count)]

    def ref(self, kind: str, name: str, **values: Any) -> PartRef:
        return PartRef(kind, name, validate_params(self.registries, kind, name, values, path=f"{kind}:{name}"))

    def default_params(self, kind: str, name: str) -> Any:
        return validate_params(self.registries, kind, name, {}, path=f"{kind}:{name}")
