"""Dequantizers: integer pixels to continuous values, with log q(u | x), and which figure their
noise gives.

With K = 2^n_bits levels and y = (x + u) / K for u ~ q(u | x) on [0, 1)^D, the discrete
log-likelihood is bounded by (Ho et al. 2019, eq. 4)

    log P(x) >= E_q[ log p(y) - D log K - log q(u | x) ],

so bits/dim = (-log p(y) + D log K + log q(u|x)) / (D log 2). Uniform dequantization has
log q = 0 and gives the usual offset D log K.

That bound needs the noise to stay in each integer's bin (``floor(y K) = x``). Noise that
leaves the bin (TarFlow's Gaussian noise augmentation, y = (x + 1/2) / K + σ ε) trains a density
of *noisy* images: ``-log p(y) + D log K`` is then the negative log-likelihood of the noisy
image on the data-level scale (K·y), a continuous density, and bounds nothing discrete. A
dequantizer declares which of the two its noise gives (`Dequantizer.figure`), and the run
engine names its figures by it: ``bpd`` only for ``"bits_per_dim"``, ``noisy_nll`` otherwise.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

#: What a dequantizer's figure is: the dequantized bound on the images' bits/dim, or the
#: negative log-likelihood of noisy images (module docstring).
Figure = Literal["bits_per_dim", "noisy_nll"]
FIGURES: tuple[str, ...] = ("bits_per_dim", "noisy_nll")


class Dequantizer(nn.Module):
    """``forward(x, n_bits) -> (y, log_q)``.

    ``x`` holds integer values in ``[0, 2^n_bits)`` (any float or integer dtype, NCHW);
    ``log_q`` has shape ``(B,)``. With ``figure = "bits_per_dim"`` (the default) ``y`` is float
    in the bin of ``x``, ``floor(y 2^n_bits) = x``, hence in ``[0, 1)``, and ``log_q`` is the
    log-density of the noise ``u`` on the unit cube. With ``figure = "noisy_nll"`` ``y`` may
    leave the bin (and ``[0, 1)``) and ``log_q`` is 0: the figure is the noisy images' NLL.
    Trainable dequantizers are optimised with the model.
    """

    #: Which figure the noise gives (module docstring): the run engine's summary, report and
    #: evaluation label their figures by it.
    figure: ClassVar[Figure] = "bits_per_dim"
    #: The standard deviation σ of Gaussian noise on y's scale ([0, 1) for the images), for
    #: score-based denoising of samples (``flowkit sample --denoise``: y + σ² ∇ log p(y));
    #: ``None`` for noise that is not Gaussian.
    noise_std: float | None = None

    def forward(self, x: Tensor, n_bits: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def initialize(self, x: Tensor, n_bits: int) -> None:
        """Data-dependent initialisation (actnorm in a learned dequantizer); the default does nothing."""

    @staticmethod
    def levels_in(x: Tensor, n_bits: int) -> Tensor:
        """``x`` checked (a batch dimension, ``1 <= n_bits <= 16``) and as a float tensor (at least
        float32; a float input keeps its precision): what every dequantizer's ``forward`` starts from."""
        if not 1 <= n_bits <= 16:
            raise ValueError(f"n_bits = {n_bits} is out of range; allowed: 1 to 16.")
        if x.dim() < 1:
            raise ValueError(f"x must have a batch dimension, got a tensor of shape {tuple(x.shape)}.")
        dtype = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
        return x.to(dtype)
