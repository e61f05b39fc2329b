"""The ``patchify`` decomposition: an image into a grid of p x p patches (TarFlow, Jet)."""

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
from flowkit_plugins.decompositions._space_to_depth import check_blocks, depth_to_space, space_to_depth


@dataclass(frozen=True, kw_only=True)
class PatchifyParams:
    patch: int = param(4, "side p of the square patches (TarFlow's patch_size, Jet's ps; both default to 4)")
    order: Literal["unfold", "space_to_depth"] = param(
        "unfold", "channel order within a patch: unfold: c p² + i p + j (torch's F.unfold, TarFlow's patchify; "
        "at p = 2 Glow's squeeze); space_to_depth: (i p + j) C + c (big_vision's einops 'b (h hp) (w wp) c -> "
        "b (h w) (hp wp c)', Jet's patches)")

    def __post_init__(self) -> None:
        if not 1 <= self.patch <= 256:
            raise ValueError(f"patch = {self.patch} must be in 1..256.")


class PatchifyDecomposition(Decomposition):
    r"""Space-to-depth by p: ``x (B, C, H, W) -> s (B, p²C, H/p, W/p)``, a permutation of the
    pixels, so :math:`\log|\det| = 0`.

    With ``order = "unfold"`` (TarFlow's ``Model.patchify``, ``F.unfold(x, p, stride=p)``),

    .. math:: s[:, c p^2 + i p + j, h, w] = x[:, c, p h + i, p w + j], \qquad 0 \le i, j < p,

    which at p = 2 is Glow's squeeze (``squeeze``'s default order, the same code). The steps and
    nets after it read the ``H/p x W/p`` grid as tokens in raster order, ``t = h (W/p) + w``, each
    a vector of ``p²C`` features: TarFlow's sequence ``(B, T, p²C)`` is ``s.flatten(2).transpose(1, 2)``.
    So the image contract (NCHW between parts) holds as it is. ``order = "space_to_depth"``
    puts the pixel first, ``s[:, (i p + j) C + c]``: big_vision's patches (Jet); for C = 1 both
    orders agree.

    As a `Decomposition` (`split`/`merge`) the same permutation reads as ``low`` = the pixel
    :math:`(0, 0)` of every patch and ``detail`` = the other :math:`p^2 - 1`, channel
    ``(p² - 1) c + k - 1`` for the k-th pixel (``k = i p + j``) of channel c: at p = 2, squeeze's
    decomposition view. `factor` is p.

    Example:
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> s, _ = PatchifyDecomposition(PatchifyParams(patch=2)).to_channels(x)
        >>> s[0, :, 0, 0].tolist()
        [0.0, 1.0, 4.0, 5.0]
    """

    orthonormal = True

    def __init__(self, params: PatchifyParams, *, build: Callable[..., Any] | None = None) -> None:
        super().__init__()
        self.factor = int(params.patch)
        self.order = params.order

    def _check(self, shape: tuple[int, ...], batched: bool) -> None:
        check_blocks(f"{type(self).__name__} (patch = {self.factor})", shape, self.factor, batched=batched)

    def output_shape(self, in_shape: Shape) -> tuple[Shape, Shape]:
        self._check(tuple(in_shape), batched=False)
        channels, height, width = in_shape
        p = self.factor
        return (channels, height // p, width // p), ((p * p - 1) * channels, height // p, width // p)

    def to_channels(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, H, W) -> (B, p²C, H/p, W/p)`` in `order`; log|det| = 0."""
        self._check(tuple(x.shape), batched=True)
        return space_to_depth(x, self.factor, pixel_first=self.order == "space_to_depth"), zeros_logabsdet(x)

    def from_channels(self, s: Tensor) -> tuple[Tensor, Tensor]:
        return depth_to_space(s, self.factor, pixel_first=self.order == "space_to_depth"), zeros_logabsdet(s)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``low (B, C, H/p, W/p)``: pixel (0, 0) of each patch; ``detail (B, (p² - 1)C, H/p, W/p)``."""
        self._check(tuple(x.shape), batched=True)
        batch, channels, height, width = x.shape
        p = self.factor
        s = space_to_depth(x, p).reshape(batch, channels, p * p, height // p, width // p)
        detail = s[:, :, 1:].reshape(batch, (p * p - 1) * channels, height // p, width // p)
        return s[:, :, 0], detail, zeros_logabsdet(x)

    def merge(self, low: Tensor, detail: Tensor) -> tuple[Tensor, Tensor]:
        p = self.factor
        if (low.dim() != 4 or detail.dim() != 4 or detail.shape[0] != low.shape[0]
                or detail.shape[1] != (p * p - 1) * low.shape[1] or detail.shape[2:] != low.shape[2:]):
            raise ShapeError(f"{type(self).__name__}.merge expects low (B, C, h, w) and detail (B, {p * p - 1}C, h, w), "
                             f"got low {tuple(low.shape)} and detail {tuple(detail.shape)}.")
        batch, channels, height, width = low.shape
        dtype = torch.promote_types(low.dtype, detail.dtype)
        s = torch.cat([low.to(dtype).unsqueeze(2), detail.to(dtype).reshape(batch, channels, p * p - 1, height, width)],
                      dim=2)
        return depth_to_space(s.reshape(batch, p * p * channels, height, width), p), zeros_logabsdet(low)

    def extra_repr(self) -> str:
        return f"patch={self.factor}, order={self.order}"


@hookimpl
def flowkit_register_decompositions(register: RegisterFn) -> None:
    register("patchify", PatchifyDecomposition, params=PatchifyParams,
             summary="p x p patches as channels (TarFlow, Jet): a grid of patch tokens, log|det| = 0")
