"""``net:nice_cnn``: MaCow's coupling network, weight-normalised convolutions with ELU.

XuezheMax/macow ``macow/flows/nice.py`` (``NICEConvBlock``) and ``macow/nnet/weight_norm.py``
(``Conv2dWeightNorm``)::

    h = ELU(WN-conv3x3(x ++ context)) -> ELU(WN-conv1x1(h)) -> WN-conv3x3(h)

Each convolution is ``W = g · v / ‖v‖`` (one norm per output channel, ``torch.nn.utils.weight_norm``
in the reference), ``v ~ N(0, 0.05²)``, ``g = ‖v‖`` and bias 0 at construction. `initialize`
is the reference's data-dependent ``init``: on the first batch each convolution's output is
standardised per channel (``g ← g · s``, ``b ← (b − mean) · s``, ``s = init_scale / (std + 1e-6)``
with the unbiased std), layer by layer, with ``init_scale`` 1 for the hidden layers and 0 for
the output layer, whose output (so the coupling's shift and raw scale) is then exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowkit import ShapeError, hookimpl, param
from flowkit.contracts.context import VectorContext, context_form
from flowkit.nn.weight_norm import WeightNormConv2d

Shape = tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class NiceCNNParams:
    hidden: int = param(512, "channels of the hidden layers (MaCow: min(8 C, 512); 512 in its CIFAR-10 model)")
    kernel: int = param(3, "kernel size of the first and the last convolution (MaCow: 3)")

    def __post_init__(self) -> None:
        if self.hidden < 1:
            raise ValueError(f"hidden = {self.hidden} must be >= 1.")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel = {self.kernel} must be odd and >= 1 ('same' padding).")


class NiceCNN(nn.Module):
    """Conditioner ``(x, context) -> (B, out_channels, H, W)``: MaCow's ``NICEConvBlock``.

    A spatial context ``(B, Cc, H, W)`` is concatenated to the input (the reference's ``s``); a
    vector context ``(B, Cz)`` is projected by a zero-initialised linear layer and added to the
    first layer's features before its ELU (`flowkit.contracts.context.VectorContext`).
    Until `initialize` runs, the output layer is not zero: the reference's ``init`` is what
    makes it so, and flowkit's models call it before training.

    Example:
        >>> import flowkit
        >>> net = flowkit.build("net", "nice_cnn", in_shape=(2, 8, 8), out_channels=4, hidden=16)
    """

    def __init__(self, params: NiceCNNParams, *, in_shape: Shape, out_channels: int,
                 context_shape: Shape | None = None, build: Any = None) -> None:
        super().__init__()
        hidden, kernel = params.hidden, params.kernel
        if len(in_shape) != 3:
            raise ShapeError(f"NiceCNN expects in_shape = (C, H, W), got {tuple(in_shape)}.")
        self.in_shape = tuple(int(s) for s in in_shape)
        self.context_shape = None if context_shape is None else tuple(int(s) for s in context_shape)
        form = context_form(self.context_shape, self.in_shape, "NiceCNN")
        context_channels = self.context_shape[0] if form == "spatial" else 0
        self.conv1 = WeightNormConv2d(self.in_shape[0] + context_channels, hidden, kernel, padding=kernel // 2)
        self.conv2 = WeightNormConv2d(hidden, hidden, 1)
        self.conv3 = WeightNormConv2d(hidden, out_channels, kernel, padding=kernel // 2)
        self.vector = VectorContext(self.context_shape[0], hidden) if form == "vector" else None
        # Saved with the weights: a restored net is not initialised again.
        self.register_buffer("initialized", torch.tensor(False))

    def _input(self, x: Tensor, context: Tensor | None) -> Tensor:
        if (context is None) != (self.context_shape is None):
            raise ShapeError(f"NiceCNN was built with context_shape = {self.context_shape} but was called "
                             f"{'without a context' if context is None else 'with one'}.")
        if context is None or self.vector is not None:
            return x
        if tuple(context.shape[1:]) != (self.context_shape[0], *x.shape[2:]) or len(context) != len(x):
            raise ShapeError(f"NiceCNN expected a context of shape (B, {self.context_shape[0]}, H, W) matching "
                             f"its input {tuple(x.shape)}, got {tuple(context.shape)}.")
        return torch.cat([x, context.to(x.dtype)], dim=1)

    def _first(self, h: Tensor, context: Tensor | None) -> Tensor:
        if self.vector is not None:
            h = h + self.vector(context, h.dtype)
        return F.elu(h)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self._first(self.conv1(self._input(x, context)), context)
        return self.conv3(F.elu(self.conv2(h)))

    @torch.no_grad()
    def initialize(self, x: Tensor, context: Tensor | None = None) -> None:
        """The reference's data-dependent ``init`` on the batch ``x`` (once)."""
        if bool(self.initialized):
            return
        h = self._first(self.conv1.initialize(self._input(x, context), 1.0), context)
        h = F.elu(self.conv2.initialize(h, 1.0))
        self.conv3.initialize(h, 0.0)
        self.initialized.fill_(True)


@hookimpl
def flowkit_register_nets(register: Any) -> None:
    register("nice_cnn", NiceCNN, params=NiceCNNParams,
             summary="MaCow's coupling network: weight-normalised conv 3x3, 1x1, 3x3 with ELU, initialised from data")
