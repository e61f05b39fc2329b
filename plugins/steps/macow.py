"""``step:macow``: one step of MaCow, masked convolutional flows in four directions, then a Glow step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flowkit import PartRef, Sequential, Transform, hookimpl, param, part_field
from flowkit_plugins.steps._masked_conv import DIRECTIONS, MaskedConvFlow

Shape = tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class MaCowParams:
    units: int = param(2, "MaCow units per step, each: actnorm, MCF up, MCF down, actnorm, MCF left, MCF right")
    kernel: tuple[int, ...] = param(
        (2, 3), "masked kernel (k, l): k rows (columns) of context before the pixel, l wide and odd; paper: 2x3"
    )
    hidden: int = param(0, "hidden channels of each masked convolution (0: the reference's 4C up to 96 channels, else min(2C, 512))")
    directions: tuple[str, ...] = param(
        DIRECTIONS, "order of the masked-conv flows in a unit; an actnorm precedes every two of them"
    )
    weight_norm: bool = param(
        False, "the masked convolutions weight-normalised and initialised from data, the 1x1 output layer to zero "
        "(the reference's ShiftedConv2d and Conv2dWeightNorm, macow/flows/conv.py MCFBlock); false: plain "
        "convolutions, the output layer zero")
    glow: PartRef = part_field("step", "glow", "the Glow step (actnorm, 1x1 conv, coupling) that ends the MaCow step")

    def __post_init__(self) -> None:
        if self.units < 1:
            raise ValueError(f"units = {self.units} must be >= 1.")
        if len(self.kernel) != 2 or self.kernel[0] < 1 or self.kernel[1] < 1 or self.kernel[1] % 2 == 0:
            raise ValueError(
                f"kernel = {list(self.kernel)} must be [k, l] with k >= 1 rows of context and an odd width l."
            )
        if self.hidden < 0:
            raise ValueError(f"hidden = {self.hidden} is negative; use 0 for the reference's default width.")
        if not self.directions:
            raise ValueError("directions is empty; name at least one of up, down, left, right.")
        unknown = [d for d in self.directions if d not in DIRECTIONS]
        if unknown:
            raise ValueError(
                f"directions {unknown} are not allowed; allowed: {', '.join(DIRECTIONS)}."
            )


class MaCowStep(Sequential):
    r"""A MaCow step: ``units`` MaCow units, then a Glow step (actnorm, 1x1 conv, coupling).

    A MaCow unit is ``actnorm -> MCF(up) -> MCF(down) -> actnorm -> MCF(left) -> MCF(right)``
    (the layout of the reference code's ``MaCowUnit``), where each MCF is a masked
    convolutional flow (`MaskedConvFlow`): an affine map whose shift and scale at a pixel come
    from a ``k x l`` convolution over the ``k`` rows (or columns) before it only. Each MCF
    has a triangular Jacobian, so the step's log-det is exact:

    .. math::

        \log|\det J| = \sum_\text{actnorm} HW \sum_c \log s_c
            + \sum_\text{MCF} \sum \log \text{sigmoid}(\cdot + 2)
            + \log|\det J_\text{glow}|.

    The inverse runs the parts backwards; each MCF is solved row by row (column by column for
    left/right), so sampling costs ``O(H + W)`` sequential net evaluations per unit.

    The Glow step is built by reference (``glow`` param, default ``step:glow``), so its
    coupling and channel mixing are chosen in the recipe. A context is handed to every part.

    References:
        Ma, Kong, Zhang & Hovy, "MaCow: Masked Convolutional Generative Flow", NeurIPS 2019;
        reference code github.com/XuezheMax/macow (``MaCowUnit``, ``MaCowStep``,
        ``MaskedConvFlow``).

    Example:
        >>> import flowkit
        >>> step = flowkit.build("step", "macow", in_shape=(4, 8, 8), units=1)
    """

    def __init__(
        self, params: MaCowParams, *, in_shape: Shape, context_shape: Shape | None = None, build: Any
    ) -> None:
        in_shape = tuple(int(s) for s in in_shape)
        shapes = {"in_shape": in_shape, "context_shape": context_shape}
        kernel = (int(params.kernel[0]), int(params.kernel[1]))
        parts: list[Transform] = []
        for _ in range(params.units):
            for index, direction in enumerate(params.directions):
                if index % 2 == 0:
                    parts.append(build(PartRef("transform", "actnorm"), **shapes))
                parts.append(
                    MaskedConvFlow(in_shape, direction=direction, kernel=kernel, hidden=params.hidden,
                                   context_shape=context_shape, weight_norm=params.weight_norm)
                )
        parts.append(build(params.glow, **shapes))
        super().__init__(parts, context_shape=context_shape)
        self.in_shape = in_shape


@hookimpl
def flowkit_register_steps(register: Any) -> None:
    register("macow", MaCowStep, params=MaCowParams,
             summary="MaCow step: masked convolutional flows (up, down, left, right) with actnorm, then a Glow step")
