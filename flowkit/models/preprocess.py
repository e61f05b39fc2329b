"""Fixed maps from images in ``[0, 1)`` to the space a flow's first step sees.

They are the first `flowkit.models.layout.Step` of a layout, so the walker inverts them and counts
their log-determinant like any other step: Glow's centring (a shift), the logit of RealNVP
and Flow++, and the ``[-1, 1)`` scale of TarFlow and Jet (`Rescale`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from flowkit.contracts.transform import Transform, logdet_dtype, zeros_logabsdet

Shape = tuple[int, ...]


class Centre(Transform):
    r"""``x = y - 1/2`` (Glow's preprocessing, openai/glow ``model.py``): a shift, so
    :math:`\log|\det| = 0`.

    Built with the flow's ``context_shape`` so that it can sit in a conditioned chain; it takes
    the context and ignores it.
    """

    shift = 0.5

    def __init__(self, context_shape: Shape | None = None) -> None:
        super().__init__()
        self.context_shape = context_shape

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(x, context)
        return x - self.shift, zeros_logabsdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(z, context)
        return z + self.shift, zeros_logabsdet(z)


class Rescale(Transform):
    r"""``x = a y + b`` with fixed ``a != 0`` and ``b``: :math:`\log|\det| = D \log|a|`.

    ``a = 2, b = -1`` maps images in ``[0, 1)`` to ``[-1, 1)``, the scale TarFlow and Jet train
    on (apple/ml-tarflow ``train.py``: ``x * 2 - 1`` after uniform noise; big_vision's
    ``value_range(-1, 1)``), so their nets see inputs of the reference's size.
    """

    def __init__(self, scale: float, shift: float = 0.0, context_shape: Shape | None = None) -> None:
        super().__init__()
        if scale == 0 or not math.isfinite(scale) or not math.isfinite(shift):
            raise ValueError(f"scale = {scale} must be finite and non-zero, shift = {shift} finite.")
        self.scale, self.shift = float(scale), float(shift)
        self.context_shape = context_shape

    def _logabsdet(self, x: Tensor) -> Tensor:
        return zeros_logabsdet(x) + x[0].numel() * math.log(abs(self.scale))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(x, context)
        return x * self.scale + self.shift, self._logabsdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(z, context)
        return (z - self.shift) / self.scale, -self._logabsdet(z)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, shift={self.shift}"


class Logit(Transform):
    r"""``z = logit(α + (1 - 2α) y)``: images in ``[0, 1)`` to the real line, away from the
    boundary (RealNVP section 4.1, ``α = 0.05``; Flow++'s ``ImgProc``).

    .. math:: \log|\det| = \sum_i \big[\log(1 - 2α) - \log p_i - \log(1 - p_i)\big],\ p = α + (1 - 2α) y

    Computed in at least float32 (`logdet_dtype`), the image returned in the input's dtype.
    """

    def __init__(self, alpha: float, context_shape: Shape | None = None) -> None:
        super().__init__()
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"alpha = {alpha} must be in [0, 0.5).")
        self.alpha = alpha
        self.context_shape = context_shape

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(x, context)
        p = self.alpha + (1 - 2 * self.alpha) * x.to(logdet_dtype(x))
        log_p, log_1mp = torch.log(p), torch.log1p(-p)
        logabsdet = (math.log1p(-2 * self.alpha) - log_p - log_1mp).flatten(1).sum(1)
        return (log_p - log_1mp).to(x.dtype), logabsdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(z, context)
        zf = z.to(logdet_dtype(z))
        x = (torch.sigmoid(zf) - self.alpha) / (1 - 2 * self.alpha)
        log_deriv = F.logsigmoid(zf) + F.logsigmoid(-zf) - math.log1p(-2 * self.alpha)
        return x.to(z.dtype), log_deriv.flatten(1).sum(1)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
