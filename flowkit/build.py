"""Turning a validated `PartRef` into a part: the ``build`` callable handed to factories."""

from __future__ import annotations

from typing import Any

from flowkit.errors import ShapeError
from flowkit.nn.guidance import Guidance, GuidedNet, GuidedPrior
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

    With ``guidance`` (a class-conditional build, `flowkit.models.conditional`), every net and
    every prior it builds is wrapped (`flowkit.nn.guidance.GuidedNet`, ``GuidedPrior``), so
    guided sampling mixes each one's conditional and unconditional outputs without code of its
    own in any part.
    """

    def __init__(self, registries: Registries, *, guidance: Guidance | None = None) -> None:
        self.registries = registries
        self.guidance = guidance
        self.built: list[tuple[str, Any]] = []

    def __call__(self, ref: PartRef, **shape_kwargs: Any) -> Any:
        part = self.registries.part(ref.kind, ref.use)
        params = ref.params if ref.params is not None else self.default_params(ref.kind, ref.use)
        if "context_shape" in shape_kwargs and not part.contexts:
            # A part that declares no context (most models) is built without the keyword; asking
            # it for a context is refused by name, never discovered by the factory's TypeError.
            if shape_kwargs.pop("context_shape") is not None:
                raise ShapeError(f'{ref.kind} "{ref.use}"{_at(ref)} takes no context; {self._takers(ref.kind, "vector")}')
        context_shape = shape_kwargs.get("context_shape")
        if context_shape is not None:
            form = "vector" if len(tuple(context_shape)) == 1 else "spatial"
            if not part.accepts(form):
                raise ShapeError(f'{ref.kind} "{ref.use}"{_at(ref)} takes no {form} context (it takes '
                                 f'{", ".join(part.contexts)}); {self._takers(ref.kind, form)}')
        if ref.path:
            self.built.append((ref.path, params))
        made = part.factory(params, build=self, **shape_kwargs)
        if self.guidance is not None and ref.kind == "net":
            return GuidedNet(made, self.guidance)
        if self.guidance is not None and ref.kind == "prior":
            return GuidedPrior(made, self.guidance)
        return made

    def accepts(self, ref: PartRef, form: str) -> bool:
        """Whether the part ``ref`` names takes a context of ``form`` (``"vector"``, ``"spatial"``),
        as its registration declares (`flowkit.registry.Part.contexts`): ask before building."""
        return self.registries.part(ref.kind, ref.use).accepts(form)

    def _takers(self, kind: str, form: str) -> str:
        names = [p.name for p in self.registries[kind] if p.accepts(form)]
        return f"{kind}s that take a {form} context: {', '.join(names) or 'none'}."

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


def _at(ref: PartRef) -> str:
    return f" (at {ref.path})" if ref.path else ""
