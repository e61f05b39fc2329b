"""Multiscale decompositions: an image into a low-pass image and detail coefficients."""

from __future__ import annotations

from torch import Tensor, nn

Shape = tuple[int, ...]


class Decomposition(nn.Module):
    """``split(x) -> (low, detail, logabsdet)``; ``merge(low, detail) -> (x, logabsdet)``.

    For an input ``(B, C, H, W)``: ``low`` is ``(B, C, H/2, W/2)`` and ``detail`` is
    ``(B, 3C, H/2, W/2)`` with channel ``3*c + k`` holding PyWavelets' k-th detail band
    ``(cH, cV, cD)`` of input channel ``c`` (squeeze documents its own layout).
    ``logabsdet`` (shape ``(B,)``) is log|det| of the split map; an orthonormal
    decomposition returns zeros, and tests prove it, rather than assuming it.
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
