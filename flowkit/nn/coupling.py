"""The base of mask couplings: split by a mask, transform one part given the other, merge back.

Public, so a third-party coupling gets the masks, the net's construction and the log-det
bookkeeping by subclassing `MaskedCoupling` (the built-in ``additive`` and ``affine`` do);
`CompactHalves` is the same split with the halves gathered into compact tensors
(``mixlogistic``). The masks themselves are `flowkit.nn.masks`.

With a spatial mask and ``mask_channel`` the net also gets the mask itself (1 on the
conditioning pixels), as one more channel of its spatial context, after the coupling's own
context: RealNVP's masked convolution coupling appends it to its net's input. A vector context
(a class one-hot) is then broadcast over the pixels before the mask, so the net gets one spatial
context (`flowkit.contracts.context`'s rule for a part with both).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flowkit.contracts.context import context_form
from flowkit.contracts.transform import Transform, logdet_dtype, zeros_logabsdet
from flowkit.errors import ShapeError
from flowkit.nn.masks import SPATIAL_MASKS, MaskKind, Shape, spatial_mask
from flowkit.params import PartRef


class MaskedCoupling(Transform):
    """Base of couplings that transform one part of the input given the other and the context.

    Subclasses set ``params_per_entry`` (net outputs per transformed entry) and implement
    ``_transform(x_trans, h) -> (z_trans, log_scale)`` and
    ``_untransform(z_trans, h) -> (x_trans, log_scale)``, where ``h`` is the net output in at
    least float32 and ``log_scale`` the elementwise log|dz/dx| of the forward map (``None`` when
    volume-preserving). Entries outside the transformed part are excluded here.
    """

    params_per_entry: int = 1

    def __init__(
        self, in_shape: Shape, *, mask: MaskKind, parity: int, net: PartRef, context_shape: Shape | None,
        build: Any, factor: int = 0, mask_channel: bool = False,
    ) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ShapeError(f"{type(self).__name__} expects in_shape = (C, H, W), got {tuple(in_shape)}.")
        channels, height, width = (int(s) for s in in_shape)
        self.in_shape = (channels, height, width)
        self.mask_kind = mask
        self.parity = parity
        self.context_shape = context_shape
        if mask == "channel":
            if channels < 2:
                raise ShapeError(
                    f"{type(self).__name__} cannot split {channels} channel(s) in halves with a channel "
                    'mask; use mask = "checkerboard" for single-channel inputs.'
                )
            first = channels - channels // factor if factor else channels // 2
            if not 0 < first < channels:
                raise ShapeError(f"{type(self).__name__} with factor = {factor} cannot split {channels} channels: "
                                 "the last C // factor must be between 1 and C - 1.")
            self.cond_channels = first if parity == 0 else channels - first
            self.trans_channels = channels - self.cond_channels
            self._first = first
        elif mask in SPATIAL_MASKS:
            self.cond_channels = self.trans_channels = channels
            self.register_buffer("mask", spatial_mask(mask, height, width, parity), persistent=False)
        else:
            raise ShapeError(f'mask = "{mask}" is not one of "channel", "checkerboard", "columns".')
        self.mask_channel = mask_channel
        net_context = context_shape
        if mask_channel:
            if mask not in SPATIAL_MASKS:
                raise ShapeError(f"{type(self).__name__} hands its net the mask as a channel of a spatial context: "
                                 f'it needs a spatial mask, got mask = "{mask}".')
            context_form(context_shape, self.in_shape, type(self).__name__)  # a vector, or a map of this size
            net_context = (1 + (int(context_shape[0]) if context_shape else 0), height, width)
        self.net = build(
            net, in_shape=(self.cond_channels, height, width), context_shape=net_context,
            out_channels=self.params_per_entry * self.trans_channels,
        )

    def _check_input(self, x: Tensor) -> None:
        # Fully convolutional: any H, W (Wavelet Flow trains its top levels on crops), but the
        # channel count is fixed.
        if x.dim() != 4 or x.shape[1] != self.in_shape[0]:
            c, h, w = self.in_shape
            raise ShapeError(
                f"{type(self).__name__} expected input of shape (B, {c}, H, W) (built for {h}x{w}), "
                f"got {tuple(x.shape)}."
            )

    def _mask(self, x: Tensor) -> Tensor:
        if tuple(x.shape[2:]) == tuple(self.mask.shape[2:]):
            return self.mask
        return spatial_mask(self.mask_kind, x.shape[2], x.shape[3], self.parity).to(x.device)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_cond, x_trans)``: what the net sees and what is transformed."""
        if self.mask_kind == "channel":
            first, rest = x[:, : self._first], x[:, self._first :]
            return (first, rest) if self.parity == 0 else (rest, first)
        return x * self._mask(x), x

    def merge(self, x_cond: Tensor, z_trans: Tensor) -> Tensor:
        """The inverse of `split` with the transformed part replaced by ``z_trans``."""
        if self.mask_kind == "channel":
            parts = (x_cond, z_trans) if self.parity == 0 else (z_trans, x_cond)
            return torch.cat(parts, dim=1)
        return torch.where(self._mask(z_trans), x_cond, z_trans)

    def sum_transformed(self, values: Tensor) -> Tensor:
        """Per-sample sum of ``values`` over the transformed entries only."""
        if self.mask_kind in SPATIAL_MASKS:
            values = values.masked_fill(self._mask(values), 0.0)
        return values.sum(dim=(1, 2, 3))

    def _net_context(self, x: Tensor, context: Tensor | None) -> Tensor | None:
        """The net's context: the coupling's, and the mask after it with ``mask_channel``."""
        if not self.mask_channel:
            return context
        mask = self._mask(x).to(x.dtype).expand(x.shape[0], 1, -1, -1)
        if context is None:
            return mask
        if context.dim() == 2:  # a vector (a class one-hot), broadcast over the pixels: one spatial context
            context = context[:, :, None, None].expand(-1, -1, *x.shape[2:])
        return torch.cat([context.to(x.dtype), mask], dim=1)

    def _net_output(self, x_cond: Tensor, context: Tensor | None, dtype: torch.dtype) -> Tensor:
        return self.net(x_cond, self._net_context(x_cond, context)).to(dtype)

    def _transform(self, x_trans: Tensor, h: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def _untransform(self, z_trans: Tensor, h: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(x, context)
        self._check_input(x)
        dtype = logdet_dtype(x)
        x_cond, x_trans = self.split(x)
        h = self._net_output(x_cond, context, dtype)
        z_trans, log_scale = self._transform(x_trans.to(dtype), h)
        z = self.merge(x_cond, z_trans.to(x.dtype))
        if log_scale is None:
            return z, zeros_logabsdet(x)
        return z, self.sum_transformed(log_scale)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(z, context)
        self._check_input(z)
        dtype = logdet_dtype(z)
        z_cond, z_trans = self.split(z)
        h = self._net_output(z_cond, context, dtype)
        x_trans, log_scale = self._untransform(z_trans.to(dtype), h)
        x = self.merge(z_cond, x_trans.to(z.dtype))
        if log_scale is None:
            return x, zeros_logabsdet(z)
        return x, -self.sum_transformed(log_scale)

    @torch.no_grad()
    def initialize(self, x: Tensor, context: Tensor | None = None) -> None:
        """Passes the conditioning part to the net's own ``initialize`` (actnorm inside the net)."""
        self.check_context(x, context)
        self._check_input(x)
        init = getattr(self.net, "initialize", None)
        if init is not None:
            x_cond, _ = self.split(x)
            init(x_cond, self._net_context(x_cond, context))

    def extra_repr(self) -> str:
        return (f"in_shape={self.in_shape}, mask={self.mask_kind}, parity={self.parity}"
                + (", mask_channel=True" if self.mask_channel else ""))


class CompactHalves:
    """Splits ``(B, C, H, W)`` into a conditioning and a transformed half, and merges back,
    with the halves gathered into compact tensors (the mixlogistic coupling's layout).

    The same masks as `MaskedCoupling` (`checkerboard` and the channel halves, same parity),
    but ``checkerboard`` gathers the conditioning pixels and the others into two
    ``(B, C, H, W/2)`` tensors, so the net runs on half the pixels; ``columns`` gathers the
    even and the odd columns, as Flow++'s released CheckerboardSplit does.
    """

    def __init__(self, in_shape: Shape, mask: str, parity: int) -> None:
        channels, height, width = in_shape
        self.mask, self.parity = mask, parity
        if mask in SPATIAL_MASKS:
            if width % 2:
                raise ShapeError(f"A {mask} coupling with compact halves needs an even width, got in_shape {in_shape}.")
            self.cond_shape = self.trans_shape = (channels, height, width // 2)
            # In row i the pair (2m, 2m + 1) has its conditioning pixel at the even column
            # exactly when the mask marks column 0 of that row.
            self.cond_is_even_col = spatial_mask(mask, height, width, parity)[..., :1]
        elif mask == "channel":
            if channels < 2:
                raise ShapeError(
                    f"A channel coupling cannot split {channels} channel(s); use mask = "
                    '"checkerboard" for single-channel inputs.'
                )
            self.first = channels // 2
            cond = self.first if parity == 0 else channels - self.first
            self.cond_shape = (cond, height, width)
            self.trans_shape = (channels - cond, height, width)
        else:
            raise ShapeError(f'mask = "{mask}" is not one of "channel", "checkerboard", "columns".')

    def split(self, x: Tensor, cond_is_even_col: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.mask == "channel":
            first, rest = x[:, : self.first], x[:, self.first :]
            return (first, rest) if self.parity == 0 else (rest, first)
        b, c, h, w = x.shape
        pairs = x.reshape(b, c, h, w // 2, 2)
        even, odd = pairs[..., 0], pairs[..., 1]
        return torch.where(cond_is_even_col, even, odd), torch.where(cond_is_even_col, odd, even)

    def merge(self, cond: Tensor, trans: Tensor, cond_is_even_col: Tensor | None = None) -> Tensor:
        if self.mask == "channel":
            return torch.cat((cond, trans) if self.parity == 0 else (trans, cond), dim=1)
        even = torch.where(cond_is_even_col, cond, trans)
        odd = torch.where(cond_is_even_col, trans, cond)
        b, c, h, half = cond.shape
        return torch.stack((even, odd), dim=-1).reshape(b, c, h, 2 * half)
