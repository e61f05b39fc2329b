"""flowkit-spline: a rational-quadratic spline coupling for flowkit, wrapping nflows.

``coupling:spline`` is nflows' `PiecewiseRationalQuadraticCouplingTransform` (Durkan et al.,
"Neural Spline Flows", 2019) behind flowkit's coupling contract: each transformed entry goes
through a monotone rational-quadratic spline with ``bins`` bins on ``[-bound, bound]`` (the
identity outside), whose bin widths, heights and inner knot slopes a registered net predicts
from the conditioning entries and the context. In a recipe::

    [model.step.coupling]
    use = "spline"
    bins = 8
    net = { use = "glow_cnn", hidden = 64 }

docs/writing-a-plugin.md walks through this module line by line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from nflows.transforms.coupling import PiecewiseRationalQuadraticCouplingTransform
from nflows.transforms.splines.rational_quadratic import DEFAULT_MIN_DERIVATIVE
from torch import Tensor, nn

from flowkit import PartRef, ShapeError, Transform, hookimpl, param, part_field
from flowkit.nn.masks import check_parity, checkerboard

Shape = tuple[int, ...]

#: nflows turns a raw knot slope d into ``min_derivative + softplus(d)``, which is 0.69 at d = 0,
#: not 1. Added to the net's raw slopes, this offset makes a zero output the identity spline
#: (equal bins, every slope 1); nflows pins the two end knots to the same constant.
SLOPE_OFFSET = math.log(math.expm1(1 - DEFAULT_MIN_DERIVATIVE))


@dataclass(frozen=True, kw_only=True)
class SplineParams:
    # mask, parity and net are the names every coupling declares (the coupling contract):
    # models that assemble steps set parity (and Flow++ the mask) copy by copy.
    mask: Literal["channel", "checkerboard"] = param(
        "channel", "which entries condition: channel halves, or a spatial checkerboard (one-channel images)")
    parity: int = param(0, "which half is transformed (0 or 1); models alternate it step by step")
    bins: int = param(8, "spline bins on [-bound, bound]")
    bound: float = param(3.0, "the splines cover [-bound, bound]; outside it each entry is left as it is")
    net: PartRef = part_field("net", "glow_cnn", "conditioner: 3 * bins - 1 spline values per entry")

    def __post_init__(self) -> None:
        check_parity(self.parity)
        if not 2 <= self.bins <= 100:
            raise ValueError(f"bins = {self.bins} must be between 2 and 100.")
        if not self.bound > 0:
            raise ValueError(f"bound = {self.bound} must be > 0.")


class SplineConditioner(nn.Module):
    """The ``transform_net`` nflows calls: ``(conditioning entries, context) -> spline values``.

    With a channel mask nflows hands it the conditioning channels, ``(B, C_c, H, W)``; with a
    checkerboard it hands it the conditioning entries of the flattened image, ``(B, D_c)``,
    which are put back in place (zeros elsewhere) for the convolutional net, whose output is
    then read at the transformed entries. Either way the result holds ``3 * bins - 1`` values
    per transformed entry, entry-major as nflows reads them: widths, heights, inner slopes.
    """

    # nflows divides the width and height logits by sqrt(hidden_channels) (or hidden_features)
    # when the net has that attribute, and warns on every call when it has neither. The scaling
    # tames a randomly initialised last layer; flowkit's nets start at zero, so: no scaling.
    hidden_channels = 1

    def __init__(self, net: nn.Module, *, in_shape: Shape, bins: int, board: Tensor | None) -> None:
        super().__init__()
        self.net = net
        self.in_shape = in_shape
        self.values = 3 * bins - 1
        # The raw slopes are the last bins - 1 of each entry's values. A bool mask, not a float
        # buffer: .float() then .double() on the module would round the offset to float32.
        slopes = torch.arange(self.values) >= 2 * bins
        self.register_buffer("slopes", slopes, persistent=False)
        if board is not None:
            flat = board.expand(in_shape).reshape(-1)
            self.register_buffer("cond_index", flat.nonzero().squeeze(1), persistent=False)
            self.register_buffer("trans_index", (~flat).nonzero().squeeze(1), persistent=False)
        else:
            self.cond_index = self.trans_index = None

    def image(self, cond: Tensor) -> Tensor:
        """The net's input: ``(B, C_c, H, W)`` as given, or flattened entries put back in place."""
        if self.cond_index is None:
            return cond
        flat = cond.new_zeros(cond.shape[0], math.prod(self.in_shape))
        return flat.index_copy(1, self.cond_index, cond).view(-1, *self.in_shape)

    def forward(self, cond: Tensor, context: Tensor | None = None) -> Tensor:
        out = self.net(self.image(cond), context)
        batch, _, height, width = out.shape
        out = out.view(batch, -1, self.values, height, width)
        offset = self.slopes.to(out.dtype) * SLOPE_OFFSET
        if self.trans_index is None:  # channel mask: nflows reshapes (B, C_t * values, H, W) itself
            return (out + offset.view(1, 1, -1, 1, 1)).flatten(1, 2)
        per_entry = out.permute(0, 1, 3, 4, 2).reshape(batch, -1, self.values)[:, self.trans_index]
        return (per_entry + offset).flatten(1)


class SplineCoupling(Transform):
    r"""Rational-quadratic spline coupling: ``z_t = s(x_t; θ(x_c, context))``, ``z_c = x_c``.

    ``s`` is a monotone rational-quadratic spline per transformed entry with ``bins`` bins on
    ``[-bound, bound]`` and the identity outside (nflows' linear tails), and

    .. math:: \log|\det \partial z / \partial x| = \sum_{i \in t} \log s_i'(x_i)

    At initialisation (a zero last layer in the net) every spline is the identity.

    Args:
        params: ``mask`` (``"channel"``: any ``H, W``, needs ``C >= 2``; ``"checkerboard"``: any
            ``C``, built for one ``H, W``), ``parity``, ``bins``, ``bound`` (the spline interval's
            half-width) and the ``net``.
        in_shape: ``(C, H, W)``.
        context_shape: shape of the context without the batch dimension, or ``None``.
        build: builds the net, another registered part.

    References:
        Durkan, Bekasov, Murray, Papamakarios. "Neural Spline Flows." NeurIPS 2019.
    """

    def __init__(
        self, params: SplineParams, *, in_shape: Shape, context_shape: Shape | None = None, build: Any
    ) -> None:
        super().__init__()
        channels, height, width = (int(s) for s in in_shape)
        mask, parity, bins = params.mask, params.parity, params.bins
        self.in_shape, self.mask_kind, self.parity = (channels, height, width), mask, parity
        self.context_shape = context_shape
        values = 3 * bins - 1
        if mask == "channel":
            if channels < 2:
                raise ShapeError(f"spline cannot split in_shape {tuple(in_shape)} in channel halves: "
                                 'use mask = "checkerboard" for one-channel images.')
            # nflows transforms the features whose mask is > 0: here, one half of the channels.
            first = channels // 2
            transformed = torch.arange(channels) >= first if parity == 0 else torch.arange(channels) < first
            cond = first if parity == 0 else channels - first
            board, net_in, out_channels = None, (cond, height, width), (channels - cond) * values
        else:
            board = checkerboard(height, width, parity)[0]
            transformed = ~board.expand(self.in_shape).reshape(-1)
            net_in, out_channels = self.in_shape, channels * values
        # The net is another registered part: `build` makes it, so this plugin imports none.
        net = build(params.net, in_shape=net_in, context_shape=context_shape, out_channels=out_channels)
        conditioner = SplineConditioner(net, in_shape=self.in_shape, bins=bins, board=board)
        self.spline = PiecewiseRationalQuadraticCouplingTransform(
            mask=transformed.int(), transform_net_create_fn=lambda n_cond, n_out: conditioner,
            num_bins=bins, tails="linear", tail_bound=params.bound,
        )

    def _check_input(self, x: Tensor) -> None:
        c, h, w = self.in_shape
        any_size = self.mask_kind == "channel"  # nflows' channel split is convolutional: any H, W
        fits = x.dim() == 4 and x.shape[1] == c and (any_size or tuple(x.shape[2:]) == (h, w))
        if not fits:
            expected = f"(B, {c}, H, W)" if self.mask_kind == "channel" else f"(B, {c}, {h}, {w})"
            raise ShapeError(f"spline ({self.mask_kind} mask) expected input of shape {expected}, "
                             f"got {tuple(x.shape)}.")

    def _run(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        self.check_context(x, context)
        self._check_input(x)
        # Splines and log-dets in float32 at least; a checkerboard coupling hands nflows the
        # flattened image, so that its feature mask can pick pixels rather than channels.
        v = x.to(torch.promote_types(x.dtype, torch.float32))
        if self.mask_kind == "checkerboard":
            v = v.flatten(1)
        out, logabsdet = (self.spline.inverse if inverse else self.spline)(v, context)
        return out.view(x.shape).to(x.dtype), logabsdet

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._run(x, context, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._run(z, context, inverse=True)

    @torch.no_grad()
    def initialize(self, x: Tensor, context: Tensor | None = None) -> None:
        """Hands the conditioning entries to the net's data-dependent initialisation, if any."""
        self.check_context(x, context)
        self._check_input(x)
        init = getattr(self.spline.transform_net.net, "initialize", None)
        if init is None:
            return
        flat = x.flatten(1) if self.mask_kind == "checkerboard" else x
        cond = flat[:, self.spline.identity_features]
        init(self.spline.transform_net.image(cond), context)

    def extra_repr(self) -> str:
        return (f"in_shape={self.in_shape}, mask={self.mask_kind}, parity={self.parity}, "
                f"bins={self.spline.num_bins}, bound={self.spline.tail_bound}")


@hookimpl
def flowkit_register_couplings(register: Any) -> None:
    register("spline", SplineCoupling, params=SplineParams,
             summary="rational-quadratic spline coupling (Neural Spline Flows, via nflows), channel or "
                     "checkerboard mask")
