"""What a recipe builds, without data or training: parameters per part, and an estimate of the
activation memory of a training step per image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flowkit.build import Builder
from flowkit.errors import FlowkitError, ShapeError
from flowkit.models.conditional import ClassConditioned
from flowkit.nn.guidance import Guidance
from flowkit.plugins import Plugins
from flowkit.recipes.load import Recipe
from flowkit.runs.session import build_model


@dataclass
class Inspection:
    shape: tuple[int, int, int]
    params: int
    parts: dict[str, int]  # module path -> parameters (model.* and dequantizer.*, two levels deep)
    activation_bytes_per_image: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "params": self.params, "parts": self.parts,
                "activation_bytes_per_image": self.activation_bytes_per_image}


def count_parameters(*modules: nn.Module) -> int:
    """The parameters of ``modules`` together (what summary.json and `flowkit inspect` report)."""
    return sum(p.numel() for m in modules for p in m.parameters())



def parts_of(module: nn.Module, prefix: str, depth: int = 2) -> dict[str, int]:
    """Parameters of the submodules ``depth`` levels down (fewer where a branch ends). A module
    with one child and no parameters of its own (a model wrapping its layout flow) is not a
    level of its own: the table shows what that child holds."""
    children = [(name, child) for name, child in module.named_children() if count_parameters(child)]
    if depth == 0 or not children:
        return {prefix: count_parameters(module)}
    own = count_parameters(module) - sum(count_parameters(c) for _, c in children)
    passes_through = len(list(module.children())) == 1 and not own
    out = {}
    for name, child in children:
        out.update(parts_of(child, f"{prefix}.{name}", depth if passes_through else depth - 1))
    if own:
        out[f"{prefix} (own)"] = own
    return out


def dataset_shape(recipe: Recipe, build: Builder) -> tuple[int, int, int]:
    return _dataset(recipe, build).shape


def _dataset(recipe: Recipe, build: Builder) -> Any:
    try:
        return build(recipe.data)
    except FlowkitError as exc:
        raise FlowkitError(f"{exc} Give the image shape with --shape C,H,W to inspect without the data.") from None


def _num_classes(recipe: Recipe, build: Builder) -> int:
    """K of a class-conditional recipe (data.labels): the model is built for K + 1 classes, so the
    dataset is read for its class count even with --shape."""
    if not getattr(recipe.data.params, "labels", False):
        return 0
    dataset = _dataset(recipe, build)
    if not dataset.has_labels:
        raise FlowkitError(f'{recipe.source}: data.labels = true, but dataset "{recipe.data.use}" has no labels.')
    return dataset.num_classes


def activation_bytes(model: nn.Module, dequantizer: nn.Module, shape: tuple[int, int, int], n_bits: int,
                     context: torch.Tensor | None = None) -> int:
    """Bytes of the outputs of every leaf module in one training forward pass of one image (what
    autograd keeps, roughly; a lower bound where modules keep more than their outputs), with
    ``context`` ``(1, ...)`` for a model built with one."""
    total = 0

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                total += tensor.numel() * tensor.element_size()

    leaves = [m for m in [*model.modules(), *dequantizer.modules()] if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        x = torch.randint(0, 2**n_bits, (1, *shape), dtype=torch.uint8)
        y, log_q = dequantizer(x, n_bits)
        (model.log_prob(y, **({} if context is None else {"context": context})) - log_q).sum()
    finally:
        for h in handles:
            h.remove()
    return total


def inspect(recipe: Recipe, plugins: Plugins, *, shape: tuple[int, int, int] | None = None,
            memory: bool = True) -> Inspection:
    build = Builder(plugins.registries)
    shape = shape or dataset_shape(recipe, build)
    num_classes = _num_classes(recipe, build)
    torch.manual_seed(recipe.train.seed)
    try:
        model = build_model(recipe, build, shape, num_classes, Guidance() if num_classes else None)
        dequantizer = build(recipe.dequantizer, in_shape=shape)
    except ShapeError as exc:
        raise FlowkitError(f"{recipe.source}: [model] does not fit images of shape {shape}: {exc}") from None
    parts = {**parts_of(model, "model"), **parts_of(dequantizer, "dequantizer")}
    parts = {k: v for k, v in parts.items() if v}
    # One image of "no class": the class-conditional model's own one-hot.
    conditioning = ClassConditioned(model, num_classes) if num_classes else None
    context = conditioning.one_hot(conditioning.labels_for(None, 1, torch.zeros(())), torch.zeros(())) if conditioning else None
    act = activation_bytes(model, dequantizer, shape, recipe.data.params.n_bits, context) if memory else None
    return Inspection(tuple(shape), count_parameters(model, dequantizer), parts, act)
