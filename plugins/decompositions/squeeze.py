"""The ``squeeze`` decomposition: Glow's space-to-depth by 2, as a (trivial) decomposition."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from flowkit import ShapeError, hookimpl, param
from flowkit.contracts.decomposition import Decomposition, Shape
from flowkit.contracts.transform import zeros_logabsdet
from flowkit.registry import RegisterFn
from flowkit_plugins.decompositions._dwt import check_bands_shape, check_image_shape
from flowkit_plugins.decompositions._space_to_depth import depth_to_space, space_to_depth


@dataclass(frozen=True, kw_only=True)
class SqueezeParams:
    order: Literal["glow", "space_to_depth", "realnvp"] = param(
        "glow", "channel order of the squeezed image: glow: 4c + 2i + j (openai/glow squeeze2d); space_to_depth: "
        "(2i + j) C + c, TensorFlow's tf.space_to_depth on NHWC (Flow++'s released SpaceToDepth); realnvp: "
        "sub-pixels (0, 0), (1, 1), (0, 1), (1, 0) in that order, C channels each (RealNVP's squeeze_2x2_ordered: "
        "the first half is the pixels with i + j even)")

#: order = "realnvp": which Glow sub-pixel 2i + j each block of C channels holds (real_nvp_utils.py
#: SQUEEZE_MATRIX: (0, 0) -> 0, (1, 1) -> 1, (0, 1) -> 2, (1, 0) -> 3), and the inverse permutation.
REALNVP_BLOCKS = (0, 3, 1, 2)
REALNVP_INVERSE = (0, 2, 3, 1)


class SqueezeDecomposition(Decomposition):
    r"""Space-to-depth by 2 (RealNVP, Glow): a permutation of pixels, so :math:`\log|\det| = 0`.

    `squeeze` maps ``x (B, C, H, W)`` to ``s (B, 4C, H/2, W/2)`` in Glow's layout,

    .. math::

        s[:, 4c + 2i + j, h, w] = x[:, c, 2h + i, 2w + j], \qquad i, j \in \{0, 1\},

    and `unsqueeze` is its inverse; `to_channels`/`from_channels` are this pair, so the
    multiscale and Flow++ models squeeze in Glow's layout. With ``order = "space_to_depth"``
    the channels come sub-pixel first, ``s[:, (2i + j) C + c]``, as ``tf.space_to_depth`` orders
    them (Flow++'s released ``SpaceToDepth``): the same pixels, another permutation of them,
    which decides what a following channel coupling conditions on (or a split factors out).
    ``order = "realnvp"`` is RealNVP's ``squeeze_2x2_ordered`` (tensorflow/models
    research/real_nvp/real_nvp_utils.py): sub-pixel blocks of C channels in the order
    :math:`(0, 0), (1, 1), (0, 1), (1, 0)`, so that the first half of the channels is a
    checkerboard of the pixels (:math:`i + j` even), which RealNVP keeps when it factors out the
    second half. `split` and `merge` (the decomposition view) do not depend on the order.

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
        >>> low, detail, _ = SqueezeDecomposition(SqueezeParams()).split(x)
        >>> low.flatten().tolist(), detail.flatten().tolist()
        ([0.0], [1.0, 2.0, 3.0])
    """

    orthonormal = True

    def __init__(self, params: SqueezeParams, *, build: Callable[..., Any] | None = None) -> None:
        super().__init__()
        self.order = params.order

    def output_shape(self, in_shape: Shape) -> tuple[Shape, Shape]:
        check_image_shape(type(self).__name__, tuple(in_shape), batched=False)
        channels, height, width = in_shape
        return (channels, height // 2, width // 2), (3 * channels, height // 2, width // 2)

    def squeeze(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, 4C, H/2, W/2)`` with ``s[:, 4c + 2i + j, h, w] = x[:, c, 2h + i, 2w + j]``
        (``order = "glow"``), ``s[:, (2i + j) C + c, h, w]`` (``"space_to_depth"``) or
        ``s[:, k C + c, h, w]`` with :math:`k` the place of :math:`(i, j)` in RealNVP's order (``"realnvp"``)."""
        check_image_shape(type(self).__name__, tuple(x.shape), batched=True)
        s = space_to_depth(x, 2, pixel_first=self.order != "glow")
        if self.order == "realnvp":
            batch, channels4, half_h, half_w = s.shape
            s = s.reshape(batch, 4, channels4 // 4, half_h, half_w)[:, REALNVP_BLOCKS].reshape(s.shape)
        return s

    def unsqueeze(self, s: Tensor) -> Tensor:
        """``(B, 4C, h, w) -> (B, C, 2h, 2w)``, the inverse of `squeeze`."""
        self._check_squeezed(s)
        if self.order == "realnvp":
            batch, channels4, half_h, half_w = s.shape
            s = s.reshape(batch, 4, channels4 // 4, half_h, half_w)[:, REALNVP_INVERSE].reshape(s.shape)
        return depth_to_space(s, 2, pixel_first=self.order != "glow")

    def _check_squeezed(self, s: Tensor) -> None:
        if s.dim() != 4 or s.shape[1] % 4:
            raise ShapeError(
                f"{type(self).__name__}.unsqueeze expects a tensor of shape (B, 4C, h, w), but got "
                f"shape {tuple(s.shape)}."
            )

    def to_channels(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Space to depth in Glow's layout (`squeeze`); a permutation, log|det| = 0."""
        return self.squeeze(x), zeros_logabsdet(x)

    def from_channels(self, s: Tensor) -> tuple[Tensor, Tensor]:
        return self.unsqueeze(s), zeros_logabsdet(s)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, C, H, W) -> (low (B, C, H/2, W/2), detail (B, 3C, H/2, W/2), zeros (B,))``."""
        check_image_shape(type(self).__name__, tuple(x.shape), batched=True)
        batch, channels, height, width = x.shape
        s = space_to_depth(x, 2).reshape(batch, channels, 4, height // 2, width // 2)
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
        return depth_to_space(s.reshape(batch, 4 * channels, half_h, half_w), 2), zeros_logabsdet(low)


@hookimpl
def flowkit_register_decompositions(register: RegisterFn) -> None:
    register(
        "squeeze", SqueezeDecomposition, params=SqueezeParams,
        summary="space-to-depth by 2 (Glow), split into sub-pixel (0, 0) and the other three",
    )
