"""``step:flowpp``: one step of Flow++ as released: per-half normalisation and 1x1 convolution, then the coupling.

aravindsrinivas/flowpp ``flows/run_cifar.py`` composes, inside a CheckerboardSplit or
ChannelSplit, ``Norm(), Pointwise(), MixLogisticAttnCoupling(...), TupleFlip()``; ``Norm`` and
``Pointwise`` (``flows/flows.py``) act on each half of the split separately:

- ``Norm``: a scale and bias per element of each half (``init_normalization``: shape
  ``x.shape[1:]``, data-dependent), i.e. one per channel and position of the image: flowkit's
  actnorm with ``per = "element"``;
- ``Pointwise``: a C x C matrix per half (``W0``, ``W1``), initialised to the identity plus
  N(0, 0.001²) noise. For a checkerboard split each pixel set has its own matrix over all
  channels; for a channel split the two channel halves are mixed among themselves only (a
  block-diagonal 1x1 convolution). `HalvesInvConv` is that map on the unsplit image.

The halves are the coupling's own (its ``mask`` and ``parity``, which models derive), so the step
works with any coupling that declares the coupling kind's assembly parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowkit import PartRef, Sequential, ShapeError, Transform, hookimpl, param, part_field
from flowkit.contracts.transform import logdet_dtype, zeros_logabsdet
from flowkit.nn.masks import SPATIAL_MASKS, spatial_mask

Shape = tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class FlowPPStepParams:
    coupling: PartRef = part_field("coupling", "mixlogistic", "the coupling that ends the step")
    noise: float = param(0.001, "the 1x1 matrices start at identity + N(0, noise²) (Flow++'s noisy_identity_init)")

    def __post_init__(self) -> None:
        if self.noise < 0:
            raise ValueError(f"noise = {self.noise} must be >= 0.")


class HalvesInvConv(Transform):
    r"""Two invertible 1x1 convolutions, one per half of a coupling's split (Flow++'s Pointwise).

    ``checkerboard`` (``columns``): ``z = W_0 x`` at the pixels where the mask of ``parity`` is
    true and ``W_1 x`` elsewhere (both C x C). ``channel``: ``z = blockdiag(W_0, W_1) x`` with ``W_0``
    over the first ``C // 2`` channels and ``W_1`` over the rest.

    .. math:: \log|\det J| = n_0 \log|\det W_0| + n_1 \log|\det W_1|

    with ``n_i`` the pixels of half i (checkerboard) or all ``H W`` pixels (channel).
    """

    def __init__(self, in_shape: Shape, mask: str, parity: int, noise: float,
                 context_shape: Shape | None = None) -> None:
        super().__init__()
        channels, height, width = (int(s) for s in in_shape)
        self.in_shape, self.mask_kind, self.context_shape = (channels, height, width), mask, context_shape
        if mask in SPATIAL_MASKS:
            sizes = (channels, channels)
            self.register_buffer("mask", spatial_mask(mask, height, width, parity), persistent=False)
            first = int(self.mask.sum())
            self.pixels = (first, height * width - first)  # pixels each matrix acts on
        elif mask == "channel":
            if channels < 2:
                raise ShapeError(f"HalvesInvConv cannot split {channels} channel(s) in halves.")
            sizes = (channels // 2, channels - channels // 2)
            self.pixels = (height * width, height * width)
        else:
            raise ShapeError(f'mask = "{mask}" is not one of "channel", "checkerboard", "columns".')
        self.weights = nn.ParameterList(
            nn.Parameter(torch.eye(c) + noise * torch.randn(c, c)) for c in sizes)

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            raise ShapeError(f"HalvesInvConv expected input of shape (B, {', '.join(map(str, self.in_shape))}), "
                             f"got {tuple(x.shape)}.")

    def _mix(self, x: Tensor, weights: list[Tensor]) -> Tensor:
        if self.mask_kind in SPATIAL_MASKS:
            w0, w1 = (w.to(x.dtype)[:, :, None, None] for w in weights)
            return torch.where(self.mask, F.conv2d(x, w0), F.conv2d(x, w1))
        return F.conv2d(x, torch.block_diag(*weights).to(x.dtype)[:, :, None, None])

    def _logabsdet(self, x: Tensor) -> Tensor:
        dtype = logdet_dtype(x)
        logdets = [torch.linalg.slogdet(w.to(dtype))[1] for w in self.weights]
        return zeros_logabsdet(x) + sum(n * ld for n, ld in zip(self.pixels, logdets, strict=True))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(x, context)
        self._check(x)
        return self._mix(x, list(self.weights)), self._logabsdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(z, context)
        self._check(z)
        return self._mix(z, [torch.linalg.inv(w) for w in self.weights]), -self._logabsdet(z)

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, mask={self.mask_kind}"


class FlowPPStep(Sequential):
    r"""``actnorm per element -> HalvesInvConv -> coupling``, the halves being the coupling's.

    .. math:: \log|\det J| = \log|\det J_\text{norm}| + \log|\det J_\text{1x1}| + \log|\det J_\text{coupling}|

    References:
        Ho, Chen, Srinivas, Duan & Abbeel, "Flow++", ICML 2019 (aravindsrinivas/flowpp).

    Example:
        >>> import flowkit
        >>> step = flowkit.build("step", "flowpp", in_shape=(4, 8, 8))
    """

    def __init__(self, params: FlowPPStepParams, *, in_shape: Shape, context_shape: Shape | None = None,
                 build: Any) -> None:
        shapes = {"in_shape": tuple(in_shape), "context_shape": context_shape}
        coupling = build(params.coupling, **shapes)
        coupling_params = params.coupling.params or build.default_params("coupling", params.coupling.use)
        parts: list[Transform] = [
            build(build.ref("transform", "actnorm", per="element"), **shapes),
            HalvesInvConv(tuple(in_shape), coupling_params.mask, coupling_params.parity, params.noise, context_shape),
            coupling,
        ]
        super().__init__(parts, context_shape=context_shape)
        self.in_shape = tuple(in_shape)


@hookimpl
def flowkit_register_steps(register: Any) -> None:
    register("flowpp", FlowPPStep, params=FlowPPStepParams,
             summary="Flow++ step: per-element actnorm, a 1x1 convolution per half of the split, coupling")
