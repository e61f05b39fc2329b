"""Dequantizers: integer pixels to continuous values in [0, 1), with log q(u | x).

With K = 2^n_bits levels and y = (x + u) / K for u ~ q(u | x) on [0, 1)^D, the discrete
log-likelihood is bounded by (Ho et al. 2019, eq. 4)

    log P(x) >= E_q[ log p(y) - D log K - log q(u | x) ],

so bits/dim = (-log p(y) + D log K + log q(u|x)) / (D log 2). Uniform dequantization has
log q = 0 and gives the usual offset D log K.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Dequantizer(nn.Module):
    """``forward(x, n_bits) -> (y, log_q)``.

    ``x`` holds integer values in ``[0, 2^n_bits)`` (any float or integer dtype, NCHW);
    ``y`` is float in ``[0, 1)``; ``log_q`` has shape ``(B,)`` and is the log-density of the
    noise ``u`` on the unit cube. Trainable dequantizers are optimised with the model.
    """

    def forward(self, x: Tensor, n_bits: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def initialize(self, x: Tensor, n_bits: int) -> None:
        """Data-dependent initialisation (actnorm in a learned dequantizer); the default does nothing."""
