"""Multiscale decompositions: an image into a low-pass image and detail coefficients."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowkit.contracts.transform import Transform

Shape = tuple[int, ...]


class Decomposition(nn.Module):
    """``split(x) -> (low, detail, logabsdet)``; ``merge(low, detail) -> (x, logabsdet)``.

    For an input ``(B, C, H, W)``: ``low`` is ``(B, C, H/2, W/2)`` and ``detail`` is
    ``(B, 3C, H/2, W/2)`` with channel ``3*c + k`` holding PyWavelets' k-th detail band
    ``(cH, cV, cD)`` of input channel ``c`` (squeeze documents its own layout).
    ``logabsdet`` (shape ``(B,)``) is log|det| of the split map; an orthonormal
    decomposition returns zeros, and tests prove it, rather than assuming it.

    ``to_channels(x) -> (s, logabsdet)`` reads the decomposition as space-to-depth,
    ``(B, C, H, W) -> (B, 4C, H/2, W/2)``, and ``from_channels`` inverts it. The default is
    ``cat([low, detail])``; a decomposition with a layout of its own (Glow's squeeze,
    channel ``4c + 2i + j``) overrides both.
    """

    #: True when the transform is orthonormal (log|det| = 0, norms preserved).
    orthonormal: bool = False

    def split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def merge(self, low: Tensor, detail: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def output_shape(self, in_shape: Shape) -> tuple[Shape, Shape]:
        """``((C, H/2, W/2), (3C, H/2, W/2))`` for ``in_shape = (C, H, W)``."""
        raise NotImplementedError

    def to_channels(self, x: Tensor) -> tuple[Tensor, Tensor]:
        low, detail, logabsdet = self.split(x)
        return torch.cat([low, detail], dim=1), logabsdet

    def from_channels(self, s: Tensor) -> tuple[Tensor, Tensor]:
        channels = s.shape[1] // 4
        return self.merge(s[:, :channels], s[:, channels:])


class DecompositionLayer(Transform):
    """A decomposition as a shape-changing flow layer: ``x -> to_channels(x)`` (squeeze in Glow,
    Flow++ and MaCow). The only `Transform` that changes the shape; unconditional."""

    def __init__(self, decomposition: Decomposition, in_shape: Shape) -> None:
        super().__init__()
        self.decomposition = decomposition
        low, detail = decomposition.output_shape(tuple(in_shape))
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_shape = (int(low[0]) + int(detail[0]), int(low[1]), int(low[2]))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(x, context)
        return self.decomposition.to_channels(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(z, context)
        return self.decomposition.from_channels(z)
