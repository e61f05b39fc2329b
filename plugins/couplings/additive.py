"""``coupling:additive``: volume-preserving additive coupling (NICE; Glow's additive variant)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from flowkit import PartRef, hookimpl, param, part_field
from flowkit.nn.coupling import MaskedCoupling
from flowkit.nn.masks import FACTOR_DOC, MaskKind, Shape, check_factor, check_parity


@dataclass(frozen=True, kw_only=True)
class AdditiveParams:
    mask: MaskKind = param("channel", "which entries condition: channel halves or a spatial checkerboard")
    parity: int = param(0, "which half is transformed (0 or 1); alternate it between steps")
    factor: int = param(0, FACTOR_DOC)
    net: PartRef = part_field("net", "glow_cnn", "conditioner predicting the shift from the other half")

    def __post_init__(self) -> None:
        check_parity(self.parity)
        check_factor(self.factor)


class AdditiveCoupling(MaskedCoupling):
    r"""Additive coupling: ``z_t = x_t + shift(x_c, context)``, ``z_c = x_c``.

    ``x_c`` and ``x_t`` are the conditioning and transformed parts chosen by the mask (see
    `flowkit.nn.masks`). The map is volume-preserving:

    .. math:: \log|\det \partial z / \partial x| = 0

    References:
        Dinh et al., "NICE: Non-linear Independent Components Estimation", 2014.

    Example:
        >>> import flowkit
        >>> t = flowkit.build("coupling", "additive", in_shape=(4, 8, 8))
    """

    params_per_entry = 1

    def __init__(
        self, params: AdditiveParams, *, in_shape: Shape, context_shape: Shape | None = None, build: Any
    ) -> None:
        super().__init__(in_shape, mask=params.mask, parity=params.parity, factor=params.factor, net=params.net,
                         context_shape=context_shape, build=build)

    def _transform(self, x_trans: Tensor, h: Tensor) -> tuple[Tensor, None]:
        return x_trans + h, None

    def _untransform(self, z_trans: Tensor, h: Tensor) -> tuple[Tensor, None]:
        return z_trans - h, None


@hookimpl
def flowkit_register_couplings(register: Any) -> None:
    register("additive", AdditiveCoupling, params=AdditiveParams,
             summary="volume-preserving additive coupling (NICE), channel or checkerboard mask")
