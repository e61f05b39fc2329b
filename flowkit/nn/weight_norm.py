"""Weight-normalised convolution with MaCow's data-dependent initialisation.

XuezheMax/macow ``macow/nnet/weight_norm.py`` (``Conv2dWeightNorm``, and ``ShiftedConv2d``,
which subclasses it): ``W = g · v / ‖v‖`` with one norm per output channel
(``torch.nn.utils.weight_norm``), ``v ~ N(0, 0.05²)``, ``g = ‖v‖`` and bias 0 at construction;
``init`` standardises the layer's output on a batch per channel: ``g ← g · s``,
``b ← (b − mean) · s``, ``s = init_scale / (std + 1e-6)`` with the unbiased std.

RealNVP's ``conv_layer`` with ``weight_norm`` (tensorflow/models research/real_nvp
``real_nvp_utils.py``) is the same map with its own start, ``uniform = a``: ``v ~ U(-a, a)``
and ``g = a · sqrt(fan_in / 12)``; without its ``scale`` there is no ``g`` (``gain = False``,
``W = v / ‖v‖``), and a layer followed by a normalisation has no bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INIT_STD = 0.05  # Conv2dWeightNorm.reset_parameters: nn.init.normal_(weight, 0.0, 0.05)


class WeightNormConv2d(nn.Module):
    """``conv(x; g · v / ‖v‖, b)``, stride 1, with the given zero padding on every side."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int], padding: int = 0, *,
                 bias: bool = True, gain: bool = True, uniform: float | None = None) -> None:
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.padding = padding
        shape = (out_channels, in_channels, kh, kw)
        if uniform is None:
            self.weight_v = nn.Parameter(torch.randn(shape) * INIT_STD)
            start = self._norm(self.weight_v.detach())
        else:
            self.weight_v = nn.Parameter((torch.rand(shape) * 2 - 1) * uniform)
            start = torch.full((out_channels, 1, 1, 1), uniform * (in_channels * kh * kw / 12) ** 0.5)
        self.weight_g = nn.Parameter(start) if gain else None
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @staticmethod
    def _norm(v: Tensor) -> Tensor:
        return v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)

    def weight(self) -> Tensor:
        if self.weight_g is None:
            return self.weight_v / self._norm(self.weight_v)
        return self.weight_v * (self.weight_g / self._norm(self.weight_v))

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.weight().to(x.dtype), bias, padding=self.padding)

    @torch.no_grad()
    def initialize(self, x: Tensor, init_scale: float) -> Tensor:
        """Standardises this layer's output on ``x`` to ``init_scale`` per channel; returns the new output."""
        out = self(x)
        per_channel = out.transpose(0, 1).reshape(out.shape[1], -1)
        mean, std = per_channel.mean(dim=1), per_channel.std(dim=1)
        inv_std = init_scale / (std + 1e-6)
        self.weight_g.mul_(inv_std.view(-1, 1, 1, 1))
        self.bias.sub_(mean).mul_(inv_std)
        return self(x)
