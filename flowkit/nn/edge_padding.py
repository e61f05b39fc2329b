"""openai/glow's edge padding: a 'same' convolution that also sees where the padding is.

openai/glow ``tfops.py`` (``conv2d`` and ``conv2d_zeros`` with ``edge_bias=True``, the default,
``add_edge_padding``): the input is zero-padded by ``k // 2`` on each side and one channel is
appended that is 1 on the padded border and 0 inside, then a 'valid' convolution runs. The
filter has one more input channel than the data; at initialisation nothing else changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class EdgePaddedConv2d(nn.Conv2d):
    """``Conv2d(c_in + 1 -> c_out, k)`` over the zero-padded input and its border mask.

    Fully convolutional: the mask is built for the size of each input, so crops of other sizes work.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__(in_channels + 1, out_channels, kernel_size, padding=0, bias=bias)
        self.pad = kernel_size // 2

    def prepare(self, x: Tensor) -> Tensor:
        """The zero-padded input with its border channel: what the 'valid' convolution sees."""
        p = self.pad
        padded = F.pad(x, (p, p, p, p))
        # One border map, the same for every image of the batch (expanded, not copied).
        border = F.pad(x.new_zeros(1, 1, *x.shape[2:]), (p, p, p, p), value=1.0)
        return torch.cat([padded, border.expand(len(x), -1, -1, -1)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.prepare(x))


def scaled_conv(layer: nn.Conv2d, x: Tensor, log_scale: Tensor, shift: Tensor | None = None) -> Tensor:
    """``(layer(x) + shift) * exp(log_scale)`` per output channel, as ONE convolution with the
    weight and bias scaled: ``conv(x; W e^s) + (b + shift) e^s``. The same function as the
    convolution followed by an actnorm (or Glow's ``exp(3 logs)`` output scale), without the two
    passes over the activations forward and two more backward, which on a CPU cost about a
    third as much as the convolution itself at Glow's widths. ``log_scale``, ``shift``: (C_out,)."""
    scale = torch.exp(log_scale)
    weight = layer.weight * scale.view(-1, 1, 1, 1).to(layer.weight.dtype)
    bias = layer.bias if layer.bias is not None else None
    if shift is not None:
        bias = shift if bias is None else bias + shift
    bias = None if bias is None else bias * scale
    if isinstance(layer, EdgePaddedConv2d):
        x = layer.prepare(x)
    if layer.padding_mode != "zeros":
        raise ValueError(f"scaled_conv needs a zero-padded convolution, not padding_mode = {layer.padding_mode!r}.")
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def conv(in_channels: int, out_channels: int, kernel_size: int, *, edge_bias: bool, bias: bool = True) -> nn.Conv2d:
    """A 'same' convolution, with openai/glow's edge channel when ``edge_bias`` and the kernel is
    larger than 1x1 (a 1x1 convolution needs no padding, and openai adds none)."""
    if edge_bias and kernel_size > 1:
        return EdgePaddedConv2d(in_channels, out_channels, kernel_size, bias=bias)
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
