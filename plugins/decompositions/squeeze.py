"""The ``squeeze`` decomposition: Glow's space-to-depth by 2, as a (trivial) decomposition."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from flowkit import NoParams, ShapeError, hookimpl
from flowkit.contracts.decomposition import Decomposition, Shape
from flowkit.contracts.transform import zeros_logabsdet
from flowkit.registry import RegisterFn
from flowkit_plugins.decompositions._dwt import check_bands_shape, check_image_shape


class SqueezeDecomposition(Decomposition):
    r"""Space-to-depth by 2 (RealNVP, Glow): a permutation of pixels, so :math:`\log|\det| = 0`.

    `squeeze` maps ``x (B, C, H, W)`` to ``s (B, 4C, H/2, W/2)`` in Glow's layout,

    .. math::

        s[:, 4c + 2i + j, h, w] = x[:, c, 2h + i, 2w + j], \qquad i, j \in \{0, 1\},

    and `unsqueeze` is its inverse; `to_channels`/`from_channels` are this pair, so the
    multiscale and Flow++ models squeeze in Glow's layout (the one squeeze of flowkit).

    As a `Decomposition`, the same permutation is read as a "wavelet" without any filtering,
    with the channel convention of the wavelets, so that it can replace ``haar`` in a
    Wavelet Flow (the no-wavelet ablation):

    - ``low[:, c] = s[:, 4c]``, the sub-pixel :math:`(i, j) = (0, 0)`: ``x[:, c, 0::2, 0::2]``;
    - ``detail[:, 3c + k] = s[:, 4c + 1 + k]``, the sub-pixels :math:`(0, 1), (1, 0), (1, 1)`
      for :math:`k = 0, 1, 2`: ``x[:, c, 0::2, 1::2]``, ``x[:, c, 1::2, 0::2]``,
      ``x[:, c, 1::2, 1::2]``.

    ``low`` is a plain subsampling (no averaging), so it aliases; that is the point of the
    ablation. The map is a permutation matrix, hence orthonormal.

    Example:
        >>> import torch
        >>> x = torch.arange(4.0).reshape(1, 1, 2, 2)
        >>> low, detail, _ = SqueezeDecomposition().split(x)
        >>> low.flatten().tolist(), detail.flatten().tolist()
        ([0.0], [1.0, 2.0, 3.0])
    """

    orthonormal = True

    @classmethod
    def from_params(cls, params: NoParams, *, build: Callable[..., Any]) -> SqueezeDecomposition:
        """Space-to-depth by 2 (Glow's squeeze), split into sub-pixel (0, 0) and the other three."""
        return cls()

    def output_shape(self, in_shape: Shape) -> tuple[Shape, Shape]:
        check_image_shape(type(self).__name__, tuple(in_shape), batched=False)
        channels, height, width = in_shape
        return (channels, height // 2, width // 2), (3 * channels, height // 2, width // 2)

    def squeeze(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, 4C, H/2, W/2)`` with ``s[:, 4c + 2i + j, h, w] = x[:, c, 2h + i, 2w + j]``."""
        check_image_shape(type(self).__name__, tuple(x.shape), batched=True)
        batch, channels, height, width = x.shape
        s = x.reshape(batch, channels, height // 2, 2, width // 2, 2)
        return s.permute(0, 1, 3, 5, 2, 4).reshape(batch, 4 * channels, height // 2, width // 2)

    def unsqueeze(self, s: Tensor) -> Tensor:
        """``(B, 4C, h, w) -> (B, C, 2h, 2w)``, the inverse of `squeeze`."""
        if s.dim() != 4 or s.shape[1] % 4:
            raise ShapeError(
                f"{type(self).__name__}.unsqueeze expects a tensor of shape (B, 4C, h, w), but got "
                f"shape {tuple(s.shape)}."
            )
        batch, channels4, half_h, half_w = s.shape
        x = s.reshape(batch, channels4 // 4, 2, 2, half_h, half_w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(batch, channels4 // 4, 2 * half_h, 2 * half_w)

    def to_channels(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Space to depth in Glow's layout (`squeeze`); a permutation, log|det| = 0."""
        return self.squeeze(x), zeros_logabsdet(x)

    def from_channels(self, s: Tensor) -> tuple[Tensor, Tensor]:
        return self.unsqueeze(s), zeros_logabsdet(s)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, C, H, W) -> (low (B, C, H/2, W/2), detail (B, 3C, H/2, W/2), zeros (B,))``."""
        check_image_shape(type(self).__name__, tuple(x.shape), batched=True)
        batch, channels, height, width = x.shape
        s = self.squeeze(x).reshape(batch, channels, 4, height // 2, width // 2)
        low = s[:, :, 0]
        detail = s[:, :, 1:].reshape(batch, 3 * channels, height // 2, width // 2)
        return low, detail, zeros_logabsdet(x)

    def merge(self, low: Tensor, detail: Tensor) -> tuple[Tensor, Tensor]:
        """``(low (B, C, h, w), detail (B, 3C, h, w)) -> (x (B, C, 2h, 2w), zeros (B,))``."""
        check_bands_shape(type(self).__name__, low, detail)
        batch, channels, half_h, half_w = low.shape
        dtype = torch.promote_types(low.dtype, detail.dtype)
        s = torch.cat(
            [low.to(dtype).unsqueeze(2), detail.to(dtype).reshape(batch, channels, 3, half_h, half_w)],
            dim=2,
        )
        return self.unsqueeze(s.reshape(batch, 4 * channels, half_h, half_w)), zeros_logabsdet(low)


@hookimpl
def flowkit_register_decompositions(register: RegisterFn) -> None:
    register(
        "squeeze", SqueezeDecomposition.from_params, params=NoParams,
        summary="space-to-depth by 2 (Glow), split into sub-pixel (0, 0) and the other three",
    )
