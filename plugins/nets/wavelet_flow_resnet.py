"""``net:wavelet_flow_resnet``: the coupling network of Wavelet Flow's released code.

Read from YorkUCVIL/Wavelet-Flow (``src/tf_components/bijector/Coupling.py``, ``Coupling`` and
``Coupling_res_block``; ``openai_conv.py``; ``openai_zero_conv.py``; ImageNet 64 ``config.hjson``:
``n_res_blocks: 3``, ``openai_conv.normalized: true``, ``zero_logscale_factor: 3.0``):

    h = ReLU(AN(conv1x1(x ++ context)))
    n times:  h = ReLU(h + AN(conv1x1(ReLU(AN(convkxk(h))))))
    out = convkxk_zero(h) * exp(3 * logs)

where AN is actnorm with data-dependent initialisation and the convolutions before it have no
bias (the reference's normalised ``Openai_conv``), weights drawn from N(0, 0.05²) as there; the
output convolution (weights, bias, ``logs``) starts at zero, so a coupling starts as the identity.
It differs from ``glow_cnn`` with ``blocks = 3``: its input layer is 1x1, each residual block is
(kxk, 1x1) with the ReLU after the sum, and every hidden convolution is normalised.

What is not reproduced: the reference's actnorm stores ``log_std / 3`` (a reparametrisation that
triples the log-scale's effective learning rate); flowkit's actnorm stores the log-scale itself.
Its edge-bias channel is off in every configuration the paper reports (``spatial_biasing: false``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowkit import PartRef, ShapeError, hookimpl, param
from flowkit.contracts.context import VectorContext, context_form

Shape = tuple[int, ...]
INIT_STD = 0.05  # Openai_conv: tf.random_normal_initializer(0.0, 0.05)


@dataclass(frozen=True, kw_only=True)
class WaveletFlowResNetParams:
    hidden: int = param(128, "channels of the hidden layers (the reference's conv_widths)")
    blocks: int = param(3, "residual blocks (the reference's n_res_blocks)")
    kernel: int = param(3, "kernel size of each block's first convolution and of the output convolution")

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.blocks < 0:
            raise ValueError(f"hidden = {self.hidden} must be >= 1 and blocks = {self.blocks} >= 0.")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel = {self.kernel} must be odd and >= 1 (same padding).")


class NormalisedConv(nn.Module):
    """A convolution without bias followed by actnorm (the reference's normalised ``Openai_conv``)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, shape: tuple[int, int], build: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False)
        nn.init.normal_(self.conv.weight, 0.0, INIT_STD)
        self.norm = build(PartRef("transform", "actnorm"), in_shape=(c_out, *shape), context_shape=None)

    def forward(self, x: Tensor, init: bool = False) -> Tensor:
        h = self.conv(x)
        if init:
            self.norm.initialize(h)
        return self.norm(h)[0]


class WaveletFlowResNet(nn.Module):
    """See the module docstring. Context: a spatial one ``(B, Cc, H, W)`` is concatenated to the
    input (Wavelet Flow's coarse image); a vector one ``(B, Cz)`` is added, projected, to the
    input layer's features (`flowkit.contracts.context.VectorContext`)."""

    def __init__(self, params: WaveletFlowResNetParams, *, in_shape: Shape, out_channels: int,
                 context_shape: Shape | None = None, build: Any = None) -> None:
        super().__init__()
        hidden, blocks, kernel = params.hidden, params.blocks, params.kernel
        if len(in_shape) != 3:
            raise ShapeError(f"WaveletFlowResNet expects in_shape = (C, H, W), got {tuple(in_shape)}.")
        if build is None:
            raise ValueError("WaveletFlowResNet needs `build` to create its actnorm layers.")
        channels, height, width = (int(s) for s in in_shape)
        self.in_shape = (channels, height, width)
        self.context_shape = None if context_shape is None else tuple(int(s) for s in context_shape)
        self.form = context_form(self.context_shape, self.in_shape, "WaveletFlowResNet")
        c_in = channels + (self.context_shape[0] if self.form == "spatial" else 0)
        shape = (height, width)
        self.conv_in = NormalisedConv(c_in, hidden, 1, shape, build)
        self.vector = VectorContext(self.context_shape[0], hidden) if self.form == "vector" else None
        self.blocks = nn.ModuleList(
            nn.ModuleList([NormalisedConv(hidden, hidden, kernel, shape, build),
                           NormalisedConv(hidden, hidden, 1, shape, build)])
            for _ in range(blocks)
        )
        self.conv_out = nn.Conv2d(hidden, out_channels, kernel, padding=kernel // 2)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.out_channels = out_channels

    def _check(self, x: Tensor, context: Tensor | None) -> None:
        if (context is None) != (self.form is None):
            raise ShapeError(f"WaveletFlowResNet was built with context_shape {self.context_shape} but was called "
                             f"with {'no context' if context is None else f'a context of shape {tuple(context.shape)}'}.")
        if context is not None:
            expected = (self.context_shape[0], *x.shape[2:]) if self.form == "spatial" else self.context_shape
            if tuple(context.shape[1:]) != expected or context.shape[0] != x.shape[0]:
                raise ShapeError(f"WaveletFlowResNet expected a context of shape (B, {', '.join(map(str, expected))}) "
                                 f"with B = {x.shape[0]}, got {tuple(context.shape)}.")

    def _hidden(self, x: Tensor, context: Tensor | None, init: bool) -> Tensor:
        self._check(x, context)
        if self.form == "spatial":
            x = torch.cat([x, context.to(x.dtype)], dim=1)
        h = self.conv_in(x, init)
        if self.vector is not None:
            h = h + self.vector(context, h.dtype)
        h = F.relu(h)
        for first, second in self.blocks:
            h = F.relu(h + second(F.relu(first(h, init)), init))
        return h

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.conv_out(self._hidden(x, context, False)) * torch.exp(3.0 * self.logs)

    @torch.no_grad()
    def initialize(self, x: Tensor, context: Tensor | None = None) -> None:
        """Data-dependent initialisation of every actnorm, in order, on the batch ``x``."""
        self._hidden(x, context, True)


@hookimpl
def flowkit_register_nets(register: Any) -> None:
    register("wavelet_flow_resnet", WaveletFlowResNet, params=WaveletFlowResNetParams,
             summary="Wavelet Flow's coupling network: 1x1 in, (kxk, 1x1) residual blocks, actnorm after every conv")
