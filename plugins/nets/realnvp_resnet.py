"""``net:realnvp_resnet``: the residual network of RealNVP's coupling layers, with actnorm for batch norm.

Read from tensorflow/models ``research/real_nvp/real_nvp_multiscale_dataset.py`` (``resnet``,
``residual_block``, the input handling of ``masked_conv_aff_coupling`` and ``conv_ch_aff_coupling``)
and ``real_nvp_utils.py`` (``conv_layer``), with its defaults ``skip = 1`` and ``bottleneck = 0``::

    h   = CReLU(N(x) * in_gain) ++ spatial context         CReLU(u) = [ReLU(u), ReLU(-u)]
    h   = conv3x3(h)                                       the reference's h_in (bias, no gain)
    out = conv1x1_g(h)                                     skip_in
    n times:  h = h + conv3x3_g(ReLU(N(conv3x3(ReLU(N(h))))))     residual_block (h_0 without bias)
              out = out + conv1x1_g(h)                     skip_<k>
    y   = conv1x1_g(ReLU(N(out)))                          out

Every convolution is weight-normalised, ``W = v / ‖v‖`` per output channel, times a learned gain
``g`` in the ``_g`` ones (the reference's ``magnitude``, which its L2 penalty acts on), with
``v ~ U(-a, a)``, ``a = sqrt(2 / C_in)`` and ``g = a sqrt(C_in k² / 12)`` at the start (the
reference's initialisers); the output layer is not zero at the start, as there.

Where the reference has batch normalisation, ``N`` is actnorm (data-dependent initialisation,
`initialize`): batch statistics would make an image's density depend on the rest of its batch
and the inverse inexact. The reference's batch norms have no scale (``scale = False``, one
``beta`` per channel), an actnorm has a bias and a log-scale per channel: one parameter more
per channel. ``in_gain`` is the ``res *= 2.`` after the input's batch norm in the checkerboard
couplings. RealNVP's checkerboard coupling also hands its net the mask as one more input channel
after the CReLU: the coupling gives it as a spatial context (``coupling:affine``'s
``mask_channel``), which this net concatenates after the CReLU, as it does any spatial context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowkit import PartRef, ShapeError, hookimpl, param
from flowkit.contracts.context import VectorContext, context_form
from flowkit.nn.weight_norm import WeightNormConv2d

Shape = tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class RealNVPResNetParams:
    hidden: int = param(64, "feature maps (the reference's base_dim, doubled per scale and in the channel couplings)")
    blocks: int = param(8, "residual blocks (the reference's residual_blocks; 8 in the paper's CIFAR-10 model)")
    in_gain: float = param(1.0, "factor on the normalised input before the CReLU (the reference's checkerboard "
                                "couplings: 2)")

    def __post_init__(self) -> None:
        # The reference's net without residual blocks is another one (two plain 3x3 convolutions).
        if self.hidden < 1 or self.blocks < 1:
            raise ValueError(f"hidden = {self.hidden} and blocks = {self.blocks} must be >= 1.")
        if not (math.isfinite(self.in_gain) and self.in_gain > 0):
            raise ValueError(f"in_gain = {self.in_gain} must be a finite number > 0.")


def _conv(c_in: int, c_out: int, kernel: int, *, gain: bool, bias: bool = True) -> WeightNormConv2d:
    # The reference's conv_layer: stddev = sqrt(2 / dim_in), where dim_in counts channels only.
    return WeightNormConv2d(c_in, c_out, kernel, padding=kernel // 2, gain=gain, bias=bias,
                            uniform=math.sqrt(2.0 / c_in))


class RealNVPResNet(nn.Module):
    """Conditioner ``(x, context) -> (B, out_channels, H, W)``: RealNVP's resnet (module docstring).

    A spatial context ``(B, Cc, H, W)`` is concatenated after the CReLU (the checkerboard
    coupling's mask goes in this way); a vector context ``(B, Cz)`` is projected and added to the
    input convolution's features (`flowkit.contracts.context.VectorContext`).

    Example:
        >>> import flowkit
        >>> net = flowkit.build("net", "realnvp_resnet", in_shape=(2, 8, 8), out_channels=4, hidden=8, blocks=1)
    """

    def __init__(self, params: RealNVPResNetParams, *, in_shape: Shape, out_channels: int,
                 context_shape: Shape | None = None, build: Any = None) -> None:
        super().__init__()
        hidden, blocks, in_gain = params.hidden, params.blocks, params.in_gain
        if len(in_shape) != 3:
            raise ShapeError(f"RealNVPResNet expects in_shape = (C, H, W), got {tuple(in_shape)}.")
        if build is None:
            raise ValueError("RealNVPResNet needs `build` to create its actnorm layers.")
        channels, height, width = (int(s) for s in in_shape)
        self.in_shape = (channels, height, width)
        self.context_shape = None if context_shape is None else tuple(int(s) for s in context_shape)
        self.form = context_form(self.context_shape, self.in_shape, "RealNVPResNet")
        self.in_gain = in_gain

        def norm(c: int) -> nn.Module:
            return build(PartRef("transform", "actnorm"), in_shape=(c, height, width), context_shape=None)

        c_in = 2 * channels + (self.context_shape[0] if self.form == "spatial" else 0)
        self.norm_in = norm(channels)
        self.conv_in = _conv(c_in, hidden, 3, gain=False)
        self.vector = VectorContext(self.context_shape[0], hidden) if self.form == "vector" else None
        self.skip_in = _conv(hidden, hidden, 1, gain=True)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm_a": norm(hidden), "conv_a": _conv(hidden, hidden, 3, gain=False, bias=False),
                           "norm_b": norm(hidden), "conv_b": _conv(hidden, hidden, 3, gain=True),
                           "skip": _conv(hidden, hidden, 1, gain=True)})
            for _ in range(blocks)
        )
        self.norm_out = norm(hidden)
        self.conv_out = _conv(hidden, out_channels, 1, gain=True)
        self.out_channels = out_channels

    def _check(self, x: Tensor, context: Tensor | None) -> None:
        if (context is None) != (self.form is None):
            raise ShapeError(f"RealNVPResNet was built with context_shape {self.context_shape} but was called "
                             f"with {'no context' if context is None else f'a context of shape {tuple(context.shape)}'}.")
        if context is not None:
            expected = (self.context_shape[0], *x.shape[2:]) if self.form == "spatial" else self.context_shape
            if tuple(context.shape[1:]) != expected or context.shape[0] != x.shape[0]:
                raise ShapeError(f"RealNVPResNet expected a context of shape (B, {', '.join(map(str, expected))}) "
                                 f"with B = {x.shape[0]}, got {tuple(context.shape)}.")

    def _run(self, x: Tensor, context: Tensor | None, init: bool) -> Tensor:
        self._check(x, context)

        def normed(layer: nn.Module, h: Tensor) -> Tensor:
            if init:
                layer.initialize(h)
            return layer(h)[0]

        u = normed(self.norm_in, x) * self.in_gain
        h = torch.cat([F.relu(u), F.relu(-u)], dim=1)
        if self.form == "spatial":
            h = torch.cat([h, context.to(h.dtype)], dim=1)
        h = self.conv_in(h)
        if self.vector is not None:
            h = h + self.vector(context, h.dtype)
        out = self.skip_in(h)
        for block in self.blocks:
            r = block["conv_a"](F.relu(normed(block["norm_a"], h)))
            h = h + block["conv_b"](F.relu(normed(block["norm_b"], r)))
            out = out + block["skip"](h)
        return self.conv_out(F.relu(normed(self.norm_out, out)))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self._run(x, context, False)

    @torch.no_grad()
    def initialize(self, x: Tensor, context: Tensor | None = None) -> None:
        """Data-dependent initialisation of every actnorm, in order, on the batch ``x``."""
        self._run(x, context, True)


@hookimpl
def flowkit_register_nets(register: Any) -> None:
    register("realnvp_resnet", RealNVPResNet, params=RealNVPResNetParams,
             summary="RealNVP's coupling resnet: CReLU input, skip connections, weight norm, actnorm for batch norm")
