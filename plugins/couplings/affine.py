"""``coupling:affine``: Glow's affine coupling, with RealNVP's scales as alternatives."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowkit import PartRef, hookimpl, param, part_field
from flowkit.nn.coupling import MaskedCoupling
from flowkit.nn.masks import FACTOR_DOC, MaskKind, Shape, check_factor, check_parity

ScaleFn = Literal["sigmoid", "exp_tanh", "scaled_tanh", "two_sigmoid"]
Order = Literal["shift_first", "scale_first"]


@dataclass(frozen=True, kw_only=True)
class AffineParams:
    mask: MaskKind = param("channel", "which entries condition: channel halves or a spatial checkerboard")
    parity: int = param(0, "which half is transformed (0 or 1); alternate it between steps")
    factor: int = param(0, FACTOR_DOC)
    scale_fn: ScaleFn = param(
        "sigmoid", "sigmoid: Glow's sigmoid(s + 2); exp_tanh: exp(clamp * tanh(s / clamp)), RealNVP-style; "
        "scaled_tanh: exp(a * tanh(s)) with a learned factor a, RealNVP's own; two_sigmoid: 2 sigmoid(s), Jet's "
        "(scale_factor = 2), the identity at s = 0"
    )
    clamp: float = param(2.0, "bound on |log scale| for scale_fn = exp_tanh")
    scale_init: float = param(
        1.0, "scale_fn = scaled_tanh: the learned factor a at the start (RealNVP: 0 in its checkerboard couplings, "
        "1 in its channel couplings)")
    mask_channel: bool = param(
        False, "spatial masks: hand the net the mask as one more channel of its spatial context (RealNVP's "
        "checkerboard coupling)")
    order: Order = param(
        "shift_first", "shift_first: Glow's (x + shift) * scale; scale_first: x * scale + shift (MaCow's NICE "
        "coupling, macow/flows/nice.py)")
    net: PartRef = part_field("net", "glow_cnn", "conditioner predicting (shift, scale) from the other half")

    def __post_init__(self) -> None:
        check_parity(self.parity)
        check_factor(self.factor)
        if not self.clamp > 0:
            raise ValueError(f"clamp = {self.clamp} must be > 0.")
        if not math.isfinite(self.scale_init):
            raise ValueError(f"scale_init = {self.scale_init} must be finite.")


class AffineCoupling(MaskedCoupling):
    r"""Affine coupling: ``z_t = (x_t + shift) * scale``, ``z_c = x_c`` (Glow's order: shift first;
    ``order = "scale_first"`` gives ``z_t = x_t * scale + shift``, MaCow's NICE coupling).

    The net maps ``(x_c, context)`` to ``2 * C_t`` channels, split into ``shift`` (first half)
    and ``s`` (second half). ``scale_fn = "sigmoid"`` gives Glow's ``scale = sigmoid(s + 2)``,
    in (0, 1), which is ``sigmoid(2) ≈ 0.88`` at initialisation (the net's last layer is zero);
    ``"exp_tanh"`` gives ``scale = exp(clamp * tanh(s / clamp))``, the identity at initialisation;
    ``"scaled_tanh"`` gives RealNVP's ``scale = exp(a tanh(s))`` with one learned factor ``a``
    per coupling, starting at ``scale_init`` (tensorflow/models research/real_nvp: the
    ``rescaling_scale`` of its checkerboard couplings starts at 0, the ``scale`` of its channel
    couplings at 1); ``"two_sigmoid"`` gives Jet's ``scale = 2 sigmoid(s)`` (big_vision
    ``models/proj/jet/jet.py``, ``Coupling``: ``(x2 + bias) * sigmoid(raw_scale) * scale_factor``
    with ``scale_factor = 2``), in (0, 2) and 1 at initialisation.

    .. math:: \log|\det \partial z / \partial x| = \sum_{i \in t} \log \text{scale}_i

    With ``mask_channel`` (spatial masks) the net also sees the mask, as RealNVP's does.

    With a checkerboard mask the sum runs over the transformed pixels only.

    References:
        Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018;
        Dinh et al., "Density estimation using Real NVP", 2017.

    Example:
        >>> import flowkit
        >>> t = flowkit.build("coupling", "affine", in_shape=(4, 8, 8), mask="checkerboard")
    """

    params_per_entry = 2

    def __init__(
        self, params: AffineParams, *, in_shape: Shape, context_shape: Shape | None = None, build: Any
    ) -> None:
        super().__init__(in_shape, mask=params.mask, parity=params.parity, factor=params.factor, net=params.net,
                         mask_channel=params.mask_channel, context_shape=context_shape, build=build)
        self.scale_fn = params.scale_fn
        self.clamp = params.clamp
        self.order = params.order
        # RealNVP's learned factor of tanh: a parameter only where it is used.
        self.scale_factor = (nn.Parameter(torch.tensor(float(params.scale_init))) if params.scale_fn == "scaled_tanh"
                             else None)

    def _shift_log_scale(self, h: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw = h.chunk(2, dim=1)
        if self.scale_fn == "sigmoid":
            # log(sigmoid(.)) through logsigmoid: exact where the scale underflows.
            return shift, F.logsigmoid(raw + 2.0)
        if self.scale_fn == "scaled_tanh":
            return shift, self.scale_factor.to(raw.dtype) * torch.tanh(raw)
        if self.scale_fn == "two_sigmoid":
            return shift, F.logsigmoid(raw) + math.log(2.0)
        return shift, self.clamp * torch.tanh(raw / self.clamp)

    def _transform(self, x_trans: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_log_scale(h)
        if self.order == "scale_first":
            return x_trans * torch.exp(log_scale) + shift, log_scale
        return (x_trans + shift) * torch.exp(log_scale), log_scale

    def _untransform(self, z_trans: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_log_scale(h)
        if self.order == "scale_first":
            return (z_trans - shift) * torch.exp(-log_scale), log_scale
        return z_trans * torch.exp(-log_scale) - shift, log_scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale_fn={self.scale_fn}, order={self.order}"


@hookimpl
def flowkit_register_couplings(register: Any) -> None:
    register("affine", AffineCoupling, params=AffineParams,
             summary="affine coupling (Glow: (x + shift) * sigmoid(s + 2)), channel or checkerboard mask")
