"""The Transform contract (nflows' ``Transform``, with the direction and context made explicit).

Direction: ``forward`` maps **data to latent**, ``z = f(x)``, and returns
``(z, log|det ∂f/∂x|)``; ``inverse`` maps latent to data, ``x = f⁻¹(z)``, and returns
``(x, log|det ∂f⁻¹/∂z|)``, which is minus the forward value at the paired point. This is
nflows' convention; normflows uses the opposite one.

- ``logabsdet`` has shape ``(B,)`` and is accumulated in at least float32.
- Images are NCHW and transforms keep the shape.
- ``context`` is ``None`` or a tensor with leading dimension ``B``. A transform built with a
  context shape raises if called without context, and one built without raises if given one.
- Data-dependent initialisation is explicit: ``initialize(x, context)`` (actnorm).
- A transform whose inverse is solved position by position (``sequential_inverse``: TarFlow's
  autoregressive step, one call of its net per token) declares it: ``train.memory =
  "recompute"``, which runs every inverse in backward, refuses it (`use_recompute`), and its
  inverse honours the `InverseSolver` that `use_inverse_solver` sets (sampling options).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from nflows.transforms.base import Transform as _NflowsTransform
from torch import Tensor, nn

from flowkit.contracts.reversible import reversible_forward
from flowkit.errors import ShapeError

Shape = tuple[int, ...]


def logdet_dtype(x: Tensor) -> torch.dtype:
    """The dtype log-determinants are accumulated in: float32 at least, float64 if x is."""
    return torch.promote_types(x.dtype, torch.float32)


def zeros_logabsdet(x: Tensor) -> Tensor:
    return torch.zeros(x.shape[0], dtype=logdet_dtype(x), device=x.device)


@dataclass(frozen=True)
class InverseSolver:
    """How a transform with a ``sequential_inverse`` solves ``x = f⁻¹(z)``.

    - ``"sequential"``: position by position, each from the ones decoded before it (a key/value
      cache keeps their attention keys): exact, T - 1 calls of the net on one token each.
    - ``"jacobi"``: the fixed-point iteration ``x ← g(x; z)`` that updates every position at
      once from the previous iterate, one parallel call of the net per iteration, until no entry
      moves by more than ``tol`` or after ``max_iter`` iterations (0: T, the number of
      positions, after which the iterate is exact: position t is exact after t iterations).
      Song et al. 2021 ("Accelerating feedforward computation via parallel nonlinear equation
      solving"); Liu et al. 2025 (GS-Jacobi iteration for TarFlow sampling).
    """

    method: Literal["sequential", "jacobi"] = "sequential"
    tol: float = 1e-4
    max_iter: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("sequential", "jacobi"):
            raise ValueError(f'solver = "{self.method}" must be "sequential" or "jacobi".')
        if not self.tol >= 0 or self.max_iter < 0:
            raise ValueError(f"jacobi tol = {self.tol} and max_iter = {self.max_iter} must be >= 0.")


class Transform(_NflowsTransform):
    """Base class of flowkit transforms: see the module docstring for the contract.

    Subclasses set ``self.context_shape`` (``None`` when unconditional) and call
    `check_context` at the top of ``forward`` and ``inverse``.
    """

    context_shape: Shape | None = None
    #: The inverse is solved position by position (module docstring): recompute refuses it.
    sequential_inverse: ClassVar[bool] = False
    #: How such an inverse is solved (`use_inverse_solver` sets it); other transforms ignore it.
    solver: InverseSolver = InverseSolver()

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def initialize(self, x: Tensor, context: Tensor | None = None) -> None:
        """Data-dependent initialisation from a batch; the default does nothing."""

    def check_context(self, x: Tensor, context: Tensor | None) -> None:
        if self.context_shape is None:
            if context is not None:
                raise ShapeError(
                    f"{type(self).__name__} was built without context but was given a context of "
                    f"shape {tuple(context.shape)}."
                )
            return
        if context is None:
            raise ShapeError(
                f"{type(self).__name__} was built with context of shape {self.context_shape} "
                "but was called without context."
            )
        if context.shape[0] != x.shape[0]:
            raise ShapeError(
                f"context has batch size {context.shape[0]} but the input has {x.shape[0]}."
            )


class Sequential(Transform):
    """Transforms applied in order (data to latent); log-determinants add up.

    ``initialize`` runs each child's initialisation on the output of the children before it,
    as Glow's data-dependent actnorm initialisation requires.

    With ``recompute = True`` (`use_recompute`, ``train.memory = "recompute"``) and grad
    enabled, ``forward`` stores no activations for backward: backward rebuilds each child's
    input from its output with the child's inverse and recomputes that child alone
    (`flowkit.contracts.reversible.reversible_forward`, whose docstring lists what the
    children must satisfy). The values and gradients are those of the plain path, to the
    round-off of the inverses. Nested Sequentials that only chain their children (Glow steps,
    MaCow's split flow) are unrolled into their children, so the memory is that of one
    child, however deep the nesting. Under ``torch.no_grad``, and in ``inverse``, nothing
    changes.
    """

    #: Rebuild activations in backward with the inverse instead of storing them (see above).
    recompute: bool = False

    def __init__(self, transforms: Iterable[Transform], context_shape: Shape | None = None) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(transforms)
        self.context_shape = context_shape

    def units(self) -> list[Transform]:
        """The children in order, nested Sequentials replaced by their own units.

        A subclass that overrides ``forward`` or ``inverse`` does more than chain its
        children, so it stays one unit.
        """
        found: list[Transform] = []
        for transform in self.transforms:
            chains = (isinstance(transform, Sequential) and type(transform).forward is Sequential.forward
                      and type(transform).inverse is Sequential.inverse)
            found += transform.units() if chains else [transform]
        return found

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.recompute and torch.is_grad_enabled():
            units = self.units()
            if units:
                return reversible_forward(units, x, context)
        total = zeros_logabsdet(x)
        for transform in self.transforms:
            x, logabsdet = transform(x, context)
            total = total + logabsdet
        return x, total

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = zeros_logabsdet(z)
        for transform in reversed(self.transforms):
            z, logabsdet = transform.inverse(z, context)
            total = total + logabsdet
        return z, total

    @torch.no_grad()
    def initialize(self, x: Tensor, context: Tensor | None = None) -> None:
        for transform in self.transforms:
            transform.initialize(x, context)
            x, _ = transform(x, context)


def sequential_inverses(*modules: nn.Module) -> list[str]:
    """The transforms inside ``modules`` that declare a ``sequential_inverse``, as
    ``"module path (ClassName)"`` (the first module's paths unprefixed, the others' ``[i].``)."""
    found = []
    for i, module in enumerate(modules):
        for name, child in module.named_modules():
            if isinstance(child, Transform) and child.sequential_inverse:
                found.append(f"{'' if i == 0 else f'[{i}].'}{name or '(root)'} ({type(child).__name__})")
    return found


def use_recompute(*modules: nn.Module, enabled: bool = True) -> None:
    """Sets the ``recompute`` switch of every `Sequential` inside ``modules`` (themselves included).

    ``train.memory = "recompute"`` applies it to the model and the dequantizer. Recomputation
    rebuilds each unit's input with its inverse in backward: a ``sequential_inverse`` would cost
    one call of its net per position there and amplify round-off along the sequence, so a module
    holding one is refused (a `ShapeError` naming it) rather than silently slow or wrong.
    """
    if enabled:
        found = sequential_inverses(*modules)
        if found:
            raise ShapeError(f"recomputation rebuilds each step's input with its inverse, and these steps invert "
                             f"position by position (one net call per token): {', '.join(found)}. Keep their "
                             "activations (memory = \"store\").")
    for module in modules:
        for child in module.modules():
            if isinstance(child, Sequential):
                child.recompute = enabled


@contextlib.contextmanager
def use_inverse_solver(solver: InverseSolver, *modules: nn.Module) -> Iterator[int]:
    """While inside, every transform with a ``sequential_inverse`` in ``modules`` solves its
    inverse with ``solver``; their previous solvers are put back afterwards. Yields how many
    such transforms there are (0: the solver changes nothing, the model inverts in closed form)."""
    touched = [child for module in modules for child in module.modules()
               if isinstance(child, Transform) and child.sequential_inverse]
    previous = [child.solver for child in touched]
    for child in touched:
        child.solver = solver
    try:
        yield len(touched)
    finally:
        for child, old in zip(touched, previous, strict=True):
            child.solver = old
