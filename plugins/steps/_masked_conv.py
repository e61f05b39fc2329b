"""The masked convolutional flow (MCF) of MaCow: an affine autoregressive map over rows or columns.

Private to ``flowkit_plugins.steps``; the ``macow`` step assembles these into MaCow units.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowkit import ShapeError, Transform
from flowkit.contracts.context import VectorContext, context_form
from flowkit.contracts.transform import logdet_dtype
from flowkit.nn.weight_norm import WeightNormConv2d

Direction = Literal["up", "down", "left", "right"]
DIRECTIONS: tuple[str, ...] = get_args(Direction)
Shape = tuple[int, ...]


def _to_canonical(t: Tensor, direction: str) -> Tensor:
    """A view in which ``direction`` becomes ``up``: each row depends on the rows above it."""
    if direction == "up":
        return t
    if direction == "down":
        return t.flip(2)
    if direction == "left":
        return t.transpose(2, 3)
    return t.transpose(2, 3).flip(2)  # right: columns to the right come first


def _from_canonical(t: Tensor, direction: str) -> Tensor:
    if direction == "up":
        return t
    if direction == "down":
        return t.flip(2)
    if direction == "left":
        return t.transpose(2, 3)
    return t.flip(2).transpose(2, 3)


def default_hidden(channels: int) -> int:
    """The reference code's width: 4C up to 96 channels, else min(2C, 512) (XuezheMax/macow
    ``macow/flows/conv.py``, ``MaskedConvFlow.__init__``: ``if in_channels <= 96``)."""
    return 4 * channels if channels <= 96 else min(2 * channels, 512)


class MaskedConvFlow(Transform):
    r"""One masked convolutional flow: ``z = x * sigmoid(s + 2) + mu``, with ``(mu, s)`` at each
    pixel computed from the ``k`` rows (or columns) before it only.

    In the canonical direction ``up``, the parameters of row ``i`` come from a ``k x l``
    convolution that sees rows ``i-k .. i-1`` (``l`` columns wide, centred; zero padding
    beyond the image), followed by ELU and a zero-initialised 1x1 convolution to ``2C``
    channels. ``down``, ``left`` and ``right`` condition on the rows below, the columns to the
    left and the columns to the right (the kernel turned by 90 degrees for columns).

    Row ``i`` of ``z`` depends on row ``i`` of ``x`` only through the diagonal scale, and on
    earlier rows otherwise: the Jacobian is block triangular with a diagonal diagonal block,
    so

    .. math:: \log|\det \partial z / \partial x| = \sum_{c, i, j} \log \text{sigmoid}(s_{cij} + 2).

    The inverse solves row by row (``H`` sequential evaluations of the net on a ``k``-row
    window, or ``W`` for columns): exact up to rounding, and slow, as in the paper.

    Args:
        in_shape: ``(C, H, W)``.
        direction: ``up``, ``down``, ``left`` or ``right``.
        kernel: ``(k, l)``: ``k`` rows of context before the pixel, ``l`` (odd) wide.
        hidden: channels of the masked convolution (0: the reference's width, `default_hidden`).
        weight_norm: weight-normalised convolutions initialised from data (the reference's
            ``MCFBlock``), or plain ones with a zero-initialised output layer.
        context_shape: ``(C_ctx, H, W)``, ``(C_z,)`` or ``None``; a context enters the hidden
            layer through a 3x3 convolution, a vector through a zero-initialised linear
            projection (`flowkit.contracts.context`); it does not depend on ``x``, so the
            Jacobian stays triangular.

    References:
        Ma et al., "MaCow: Masked Convolutional Generative Flow", NeurIPS 2019, section 3.1.
    """

    def __init__(
        self, in_shape: Shape, *, direction: str, kernel: tuple[int, int], hidden: int, weight_norm: bool,
        context_shape: Shape | None = None,
    ) -> None:
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f'direction = "{direction}" is not one of {", ".join(DIRECTIONS)}.')
        rows, width = kernel
        if rows < 1 or width < 1 or width % 2 == 0:
            raise ValueError(f"kernel = {kernel} must be (k >= 1, odd l >= 1).")
        channels = int(in_shape[0])
        hidden = hidden or default_hidden(channels)
        self.in_shape = tuple(int(s) for s in in_shape)
        self.direction = direction
        self.kernel = (int(rows), int(width))
        self.context_shape = None if context_shape is None else tuple(context_shape)
        self.weight_norm = weight_norm
        if weight_norm:  # the reference's MCFBlock; `initialize` sets the output layer to zero
            self.conv: nn.Module = WeightNormConv2d(channels, hidden, self.kernel)
            self.out: nn.Module = WeightNormConv2d(hidden, 2 * channels, 1)
            self.register_buffer("initialized", torch.tensor(False))  # saved: a restored flow keeps its weights
        else:
            self.conv = nn.Conv2d(channels, hidden, self.kernel)
            self.out = nn.Conv2d(hidden, 2 * channels, 1)
            # Zero-initialised last layer: mu = 0 and scale = sigmoid(2) at the start (as the
            # reference's data-dependent init with init_scale 0 does).
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        self.context_conv: nn.Module | None = None
        form = context_form(self.context_shape, self.in_shape, "MaskedConvFlow")
        if form == "spatial":
            self.context_conv = nn.Conv2d(self.context_shape[0], hidden, 3, padding=1)
        elif form == "vector":
            self.context_conv = VectorContext(self.context_shape[0], hidden)

    def _check(self, x: Tensor, context: Tensor | None) -> None:
        self.check_context(x, context)
        if x.dim() != 4 or x.shape[1] != self.in_shape[0]:
            raise ShapeError(
                f"MaskedConvFlow expected input of shape (B, {self.in_shape[0]}, H, W), got {tuple(x.shape)}."
            )

    def _context_hidden(self, context: Tensor | None) -> Tensor | None:
        if self.context_conv is None or context is None:
            return None
        return _to_canonical(self.context_conv(context), self.direction)

    def _mu_log_scale(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        mu, raw = self.out(F.elu(hidden)).chunk(2, dim=1)
        return mu, F.logsigmoid(raw + 2.0)

    def _shifted(self, xc: Tensor) -> Tensor:
        rows, width = self.kernel
        side = width // 2
        # k zero rows on top, the last row dropped: output row i sees input rows i-k .. i-1.
        return F.pad(xc, (side, side, rows, 0))[:, :, :-1]

    @torch.no_grad()
    def initialize(self, x: Tensor, context: Tensor | None = None) -> None:
        """With ``weight_norm``, the reference's data-dependent ``init`` on the batch ``x`` (once):
        the masked convolution's output standardised per channel, the output layer to zero."""
        if not self.weight_norm or bool(self.initialized):
            return
        self._check(x, context)
        hidden = self.conv.initialize(self._shifted(_to_canonical(x, self.direction)), 1.0)
        ctx = self._context_hidden(context)
        if ctx is not None:
            hidden = hidden + ctx
        self.out.initialize(F.elu(hidden), 0.0)
        self.initialized.fill_(True)

    def _canonical_params(self, xc: Tensor, ctx: Tensor | None) -> tuple[Tensor, Tensor]:
        hidden = self.conv(self._shifted(xc))
        if ctx is not None:
            hidden = hidden + ctx
        return self._mu_log_scale(hidden)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        xc = _to_canonical(x, self.direction)
        mu, log_scale = self._canonical_params(xc, self._context_hidden(context))
        zc = xc * torch.exp(log_scale) + mu
        logabsdet = log_scale.to(logdet_dtype(x)).flatten(1).sum(1)
        return _from_canonical(zc, self.direction), logabsdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z, context)
        zc = _to_canonical(z, self.direction)
        ctx = self._context_hidden(context)
        rows, width = self.kernel
        side = width // 2
        batch, channels, height, _ = zc.shape
        blank = zc.new_zeros(batch, channels, 1, zc.shape[3] + 2 * side)
        window = [blank] * rows
        solved = []
        total = zc.new_zeros(batch, dtype=logdet_dtype(z))
        # Row i needs rows i-k .. i-1 only; the window list (not an in-place buffer) keeps
        # this differentiable, so the inverse's Jacobian can be checked by autograd.
        for i in range(height):
            hidden = self.conv(torch.cat(window[-rows:], dim=2))
            if ctx is not None:  # a vector context's hidden offset is one (B, hidden, 1, 1) for all rows
                hidden = hidden + (ctx if ctx.shape[2] == 1 else ctx[:, :, i : i + 1])
            mu, log_scale = self._mu_log_scale(hidden)
            row = (zc[:, :, i : i + 1] - mu) * torch.exp(-log_scale)
            solved.append(row)
            window.append(F.pad(row, (side, side)))
            total = total - log_scale.to(total.dtype).flatten(1).sum(1)
        xc = torch.cat(solved, dim=2)
        return _from_canonical(xc, self.direction), total

    def extra_repr(self) -> str:
        return f"{self.in_shape[0]}, direction={self.direction}, kernel={self.kernel}"
