"""``net:glow_cnn``: Glow's coupling network, 3x3 -> 1x1 -> 3x3 with a zero-initialised output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowkit import PartRef, ShapeError, hookimpl, param
from flowkit.contracts.context import VectorContext, context_form
from flowkit.nn.edge_padding import conv, scaled_conv

Shape = tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class GlowCNNParams:
    hidden: int = param(64, "channels of the hidden layers (Glow uses 512)")
    blocks: int = param(0, "extra residual 3x3 blocks after the 1x1 layer (Wavelet Flow uses 3)")
    actnorm: bool = param(False, "actnorm after each hidden convolution, as Glow does")
    edge_bias: bool = param(
        False, "the 3x3 convolutions also see a channel marking the zero padding (openai/glow's tfops.conv2d default)")
    output_scale: bool = param(True, "multiply the output by exp(3 * logs), logs zero-initialised (Glow)")

    def __post_init__(self) -> None:
        if self.hidden < 1:
            raise ValueError(f"hidden = {self.hidden} must be >= 1.")
        if self.blocks < 0:
            raise ValueError(f"blocks = {self.blocks} must be >= 0.")


class GlowCNN(nn.Module):
    """Conditioner ``(x, context) -> (B, out_channels, H, W)``: Glow's ``NN()``.

    ``conv3x3(C + Cc -> hidden) -> ReLU -> conv1x1 [+ W z] -> ReLU -> [residual blocks] -> conv3x3(-> out)``.
    A spatial context ``(B, Cc, H, W)`` is concatenated to the input channels; a vector context
    ``z`` of shape ``(B, Cz)`` is projected by a zero-initialised linear layer and added to the
    features of the 1x1 convolution, before its ReLU (`flowkit.contracts.context.VectorContext`;
    the VAE-flow's ``global_linear``). The last convolution (weights
    and bias) is zero, so a coupling using this net starts as its identity-like map; with
    ``output_scale`` its output is multiplied by ``exp(3 * logs)`` with a per-channel ``logs``
    starting at zero (Glow's ``Conv2dZeros``). Each residual block is
    ``h + conv3x3(ReLU(conv3x3(h)))``. With ``actnorm`` the hidden convolutions have no bias
    and are followed by actnorm, initialised by `initialize`.

    Example:
        >>> import flowkit
        >>> net = flowkit.build("net", "glow_cnn", in_shape=(2, 8, 8), out_channels=4)
    """

    def __init__(
        self, params: GlowCNNParams, *, in_shape: Shape, out_channels: int, context_shape: Shape | None = None,
        build: Any = None,
    ) -> None:
        super().__init__()
        hidden, blocks, actnorm, edge_bias = params.hidden, params.blocks, params.actnorm, params.edge_bias
        if len(in_shape) != 3:
            raise ShapeError(f"GlowCNN expects in_shape = (C, H, W), got {tuple(in_shape)}.")
        channels, height, width = (int(s) for s in in_shape)
        self.in_shape = (channels, height, width)
        self.context_shape = None if context_shape is None else tuple(int(s) for s in context_shape)
        form = context_form(self.context_shape, self.in_shape, "GlowCNN")
        context_channels = self.context_shape[0] if form == "spatial" else 0
        self.out_channels = out_channels
        self.conv_in = conv(channels + context_channels, hidden, 3, edge_bias=edge_bias, bias=not actnorm)
        self.conv_mid = nn.Conv2d(hidden, hidden, 1, bias=not actnorm)
        self.vector = VectorContext(self.context_shape[0], hidden) if form == "vector" else None
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(hidden, hidden, 3, padding=1))
            for _ in range(blocks)
        )
        self.norms = nn.ModuleList()
        if actnorm:
            if build is None:
                raise ValueError("GlowCNN with actnorm = true needs `build` to create its actnorm layers.")
            self.norms.extend(
                build(PartRef("transform", "actnorm"), in_shape=(hidden, height, width), context_shape=None)
                for _ in range(2)
            )
        self.conv_out = conv(hidden, out_channels, 3, edge_bias=edge_bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1)) if params.output_scale else None

    def _input(self, x: Tensor, context: Tensor | None) -> Tensor:
        if self.context_shape is None:
            if context is not None:
                raise ShapeError(
                    f"GlowCNN was built without context but was given a context of shape {tuple(context.shape)}."
                )
            return x
        if context is None:
            raise ShapeError(f"GlowCNN was built with context of shape {self.context_shape} but was called without.")
        # Fully convolutional: a spatial context must match the input's H, W (not the built
        # size), so Wavelet Flow's patch-wise training on crops works.
        expected = (self.context_shape[0], *x.shape[2:]) if len(self.context_shape) == 3 else self.context_shape
        if tuple(context.shape[1:]) != expected or context.shape[0] != x.shape[0]:
            raise ShapeError(
                f"GlowCNN expected a context of shape (B, {', '.join(map(str, self.context_shape))}) with "
                f"B = {x.shape[0]}, got {tuple(context.shape)}."
            )
        if self.vector is not None:
            return x
        return torch.cat([x, context.to(x.dtype)], dim=1)

    def _conv_norm(self, index: int, layer: nn.Conv2d, x: Tensor, init: bool) -> Tensor:
        """``layer`` then the ``index``-th actnorm, if any. Once initialised, a per-channel actnorm
        ``(h + b) e^s`` is folded into the convolution's weight and bias (`scaled_conv`): the same
        function, one pass over the activations instead of three."""
        if not len(self.norms):
            return layer(x)
        norm = self.norms[index]
        if init:
            h = layer(x)
            norm.initialize(h)
            return norm(h)[0]
        if getattr(norm, "size", True) is None:  # actnorm per channel: (1, C, 1, 1) bias and log-scale
            return scaled_conv(layer, x, norm.log_scale.view(-1), norm.bias.view(-1))
        return norm(layer(x))[0]

    def _hidden(self, x: Tensor, context: Tensor | None, init: bool = False) -> Tensor:
        h = F.relu(self._conv_norm(0, self.conv_in, self._input(x, context), init))
        h = self._conv_norm(1, self.conv_mid, h, init)
        if self.vector is not None:
            h = h + self.vector(context, h.dtype)
        h = F.relu(h)
        for block in self.blocks:
            h = h + block(h)
        return h

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self._hidden(x, context)
        if self.logs is None:
            return self.conv_out(h)
        return scaled_conv(self.conv_out, h, 3.0 * self.logs.view(-1))  # conv_out(h) * exp(3 logs), one pass

    @torch.no_grad()
    def initialize(self, x: Tensor, context: Tensor | None = None) -> None:
        """Data-dependent initialisation of the actnorm layers (nothing to do without them)."""
        if len(self.norms):
            self._hidden(x, context, init=True)


@hookimpl
def flowkit_register_nets(register: Any) -> None:
    register("glow_cnn", GlowCNN, params=GlowCNNParams,
             summary="Glow's coupling network: conv 3x3, 1x1, 3x3, zero-initialised output")
