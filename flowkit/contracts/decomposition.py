"""Multiscale decompositions: an image into a low-pass image and detail coefficients."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowkit.contracts.transform import Transform

Shape = tuple[int, ...]


class Decomposition(nn.Module):
    """``split(x) -> (low, detail, logabsdet)``; ``merge(low, detail) -> (x, logabsdet)``.

    A decomposition works on blocks of ``f x f`` pixels, ``f = factor`` (2 for the wavelets and
    squeeze; patchify's patch side p). For an input ``(B, C, H, W)``: ``low`` is
    ``(B, C, H/f, W/f)`` and ``detail`` is ``(B, (f² - 1)C, H/f, W/f)``; for a wavelet (f = 2)
    channel ``3*c + k`` of ``detail`` holds PyWavelets' k-th detail band ``(cH, cV, cD)`` of
    input channel ``c`` (squeeze and patchify document their own layouts).
    ``logabsdet`` (shape ``(B,)``) is log|det| of the split map; an orthonormal
    decomposition returns zeros, and tests prove it, rather than assuming it.

    ``to_channels(x) -> (s, logabsdet)`` reads the decomposition as space-to-depth by f,
    ``(B, C, H, W) -> (B, f²C, H/f, W/f)``, and ``from_channels`` inverts it. The default is
    ``cat([low, detail])``; a decomposition with a layout of its own (Glow's squeeze,
    channel ``4c + 2i + j``; patchify, ``c p² + i p + j``) overrides both.
    """

    #: True when the transform is orthonormal (log|det| = 0, norms preserved).
    orthonormal: bool = False
    #: The side f of the pixel blocks `to_channels` turns into channels. The walker's squeezes
    #: (`flowkit.models.layout`) and `DecompositionLayer` read the shapes from it.
    factor: int = 2

    def split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def merge(self, low: Tensor, detail: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def output_shape(self, in_shape: Shape) -> tuple[Shape, Shape]:
        """``((C, H/f, W/f), ((f² - 1)C, H/f, W/f))`` for ``in_shape = (C, H, W)``, f = `factor`."""
        raise NotImplementedError

    def to_channels(self, x: Tensor) -> tuple[Tensor, Tensor]:
        low, detail, logabsdet = self.split(x)
        return torch.cat([low, detail], dim=1), logabsdet

    def from_channels(self, s: Tensor) -> tuple[Tensor, Tensor]:
        channels = s.shape[1] // self.factor**2
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
