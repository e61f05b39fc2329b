"""``step:glow``: one step of Glow, actnorm -> invertible 1x1 convolution -> coupling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from flowkit import PartRef, Sequential, Transform, hookimpl, param, part_field
from flowkit.contracts.transform import zeros_logabsdet

Shape = tuple[int, ...]
Mixing = Literal["lu", "plain", "reverse", "none"]


@dataclass(frozen=True, kw_only=True)
class GlowStepParams:
    coupling: PartRef = part_field("coupling", "affine", "the coupling that ends the step")
    actnorm: bool = param(True, "start with actnorm (data-dependent initialisation)")
    invconv: Mixing = param(
        "lu", "channel mixing: 1x1 convolution (LU or plain), channel reversal (RealNVP) or none"
    )


class ChannelReverse(Transform):
    """Reverses the channel order (RealNVP's fixed permutation); volume-preserving."""

    def __init__(self, context_shape: Shape | None = None) -> None:
        super().__init__()
        self.context_shape = context_shape

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(x, context)
        return x.flip(1), zeros_logabsdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(z, context)
        return z.flip(1), zeros_logabsdet(z)


class GlowStep(Sequential):
    r"""A Glow step: ``actnorm -> invconv -> coupling``, each part optional but the coupling.

    The parts are built by reference (``transform:actnorm``, ``transform:invconv``, the
    recipe's coupling), so any registered coupling fits. The context goes to every part;
    only the coupling uses it.

    .. math:: \log|\det J| = \log|\det J_\text{actnorm}| + \log|\det J_\text{invconv}| + \log|\det J_\text{coupling}|

    References:
        Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.

    Example:
        >>> import flowkit
        >>> step = flowkit.build("step", "glow", in_shape=(4, 8, 8))
    """

    def __init__(
        self, params: GlowStepParams, *, in_shape: Shape, context_shape: Shape | None = None, build: Any
    ) -> None:
        shapes = {"in_shape": tuple(in_shape), "context_shape": context_shape}
        parts: list[Transform] = []
        if params.actnorm:
            parts.append(build(PartRef("transform", "actnorm"), **shapes))
        if params.invconv in ("lu", "plain"):
            parts.append(build(build.ref("transform", "invconv", lu=params.invconv == "lu"), **shapes))
        elif params.invconv == "reverse":
            parts.append(ChannelReverse(context_shape))
        parts.append(build(params.coupling, **shapes))
        super().__init__(parts, context_shape=context_shape)
        self.in_shape = tuple(in_shape)


@hookimpl
def flowkit_register_steps(register: Any) -> None:
    register("glow", GlowStep, params=GlowStepParams,
             summary="Glow step: actnorm, invertible 1x1 convolution, coupling")
