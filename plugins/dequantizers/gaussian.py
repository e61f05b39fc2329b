"""Dequantizer ``gaussian``: Gaussian noise augmentation (TarFlow), a density of noisy images."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from flowkit import Dequantizer, hookimpl, param

if TYPE_CHECKING:
    from flowkit.registry import RegisterFn

Shape = tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class GaussianParams:
    std: float = param(
        0.05, "standard deviation sigma of the noise on flowkit's [0, 1) scale; TarFlow's noise_std is on [-1, 1], "
        "so halve it (its MNIST notebook's 0.1 is 0.05 here, its ImageNet 64 runs' 0.05 is 0.025)")

    def __post_init__(self) -> None:
        if not 0 < self.std <= 1 or not math.isfinite(self.std):
            raise ValueError(f"std = {self.std} must be in (0, 1].")


class GaussianDequantizer(Dequantizer):
    r"""``y = (x + 1/2) / K + σ ε`` with ``ε ~ N(0, I)`` and ``K = 2^n_bits``: the bin centre plus
    Gaussian noise (TarFlow's ``x = x + noise_std * randn_like(x)`` on images in [-1, 1]; here
    on [0, 1), so σ is half of TarFlow's, and the pixel sits at its bin's centre where TarFlow
    puts level k at k/255).

    The noise leaves the bin, so there is no bound on the images' bits/dim (`figure` =
    ``"noisy_nll"``): ``log_q`` is 0, and what the run reports,

    .. math:: \frac{-\log p(y) + D \log K}{D \log 2},

    is the negative log-likelihood of the noisy image ``K y`` in bits per dimension, under the
    name ``noisy_nll``. Samples of a model trained so are noisy images; one step of score-based
    denoising, ``y + σ² ∇_y \log p(y)`` (Tweedie's formula, TarFlow's post-training denoising;
    ``flowkit sample --denoise``), removes the noise, with σ = `noise_std`.

    Example:
        >>> import flowkit
        >>> dequantize = flowkit.build("dequantizer", "gaussian", std=0.01)
        >>> y, log_q = dequantize(torch.tensor([[0, 255]], dtype=torch.uint8), n_bits=8)
        >>> log_q.tolist()
        [0.0]
    """

    figure = "noisy_nll"

    def __init__(self, params: GaussianParams, *, in_shape: Shape | None = None,
                 build: Callable[..., Any] | None = None) -> None:
        super().__init__()
        self.in_shape = None if in_shape is None else tuple(in_shape)
        self.noise_std = float(params.std)

    def forward(self, x: Tensor, n_bits: int) -> tuple[Tensor, Tensor]:
        x = self.levels_in(x, n_bits)
        dtype = x.dtype
        y = (x + 0.5) / float(2**n_bits) + self.noise_std * torch.randn_like(x)
        return y, torch.zeros(x.shape[0], dtype=dtype, device=x.device)

    def extra_repr(self) -> str:
        return f"std={self.noise_std}"


@hookimpl
def flowkit_register_dequantizers(register: RegisterFn) -> None:
    register("gaussian", GaussianDequantizer, params=GaussianParams,
             summary="Gaussian noise (TarFlow): y = (x + 1/2) / 2^n_bits + std * eps; reports the noisy images' NLL, "
                     "not bits/dim")
