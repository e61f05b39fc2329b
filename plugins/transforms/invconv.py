"""``transform:invconv``: the invertible 1x1 convolution of Glow, plain or LU-decomposed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowkit import ShapeError, Transform, hookimpl, param
from flowkit.contracts.transform import logdet_dtype, zeros_logabsdet

Shape = tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class InvConvParams:
    lu: bool = param(True, "LU-decomposed weight (Glow's fast log-det); false: a full matrix and slogdet")


class InvConv1x1(Transform):
    r"""Invertible 1x1 convolution: ``z[:, :, i, j] = W x[:, :, i, j]`` with a learned ``C x C`` ``W``.

    ``W`` starts as a random rotation (the Q of a QR decomposition of a Gaussian matrix, drawn
    from the global RNG). With ``lu=True`` it is kept as ``W = P L (U + diag(sign * exp(log_s)))``
    with a fixed permutation ``P``, a unit lower-triangular ``L`` and a strictly upper ``U``,
    so the log-det costs ``O(C)`` and the inverse two triangular solves (Glow, section 3.2).
    With ``lu=False`` the full matrix is learned and ``slogdet`` gives the log-det.
    Nothing is cached: the weight and its inverse are recomputed on every call.

    .. math:: \log|\det \partial z / \partial x| = H W \log|\det W| = H W \sum_c \log s_c\ \text{(LU)}

    Args:
        params: ``lu``, whether to use the LU parametrisation.
        in_shape: ``(C, H, W)``; ``C`` of inputs ``(B, C, H, W)`` (any ``H, W``).
        context_shape: accepted (and checked) for uniformity with couplings; the value is unused.

    References:
        Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.

    Example:
        >>> import flowkit
        >>> t = flowkit.build("transform", "invconv", in_shape=(4, 8, 8))
        >>> z, logabsdet = t(torch.randn(2, 4, 8, 8))
    """

    def __init__(
        self, params: InvConvParams, *, in_shape: Shape, context_shape: Shape | None = None, build: Any = None
    ) -> None:
        super().__init__()
        num_channels, lu = int(in_shape[0]), params.lu
        self.num_channels = num_channels
        self.lu = lu
        self.context_shape = context_shape
        rotation = torch.linalg.qr(torch.randn(num_channels, num_channels))[0]
        if lu:
            perm, lower, upper = torch.linalg.lu(rotation)
            diag = torch.diagonal(upper)
            self.register_buffer("perm", perm)
            self.register_buffer("sign_s", torch.sign(diag))
            self.lower = nn.Parameter(torch.tril(lower, -1))
            self.upper = nn.Parameter(torch.triu(upper, 1))
            self.log_s = nn.Parameter(torch.log(torch.abs(diag)))
        else:
            self.weight = nn.Parameter(rotation)

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.num_channels, dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return lower, upper

    def weight_matrix(self) -> Tensor:
        """The current ``C x C`` weight ``W``."""
        if not self.lu:
            return self.weight
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def inverse_weight_matrix(self) -> Tensor:
        """``W^{-1}``, computed afresh from the current parameters."""
        if not self.lu:
            return torch.linalg.inv(self.weight)
        lower, upper = self._factors()
        # W^{-1} = U^{-1} L^{-1} P^T; P is a permutation, so P^{-1} = P^T.
        lower_inv_pt = torch.linalg.solve_triangular(lower, self.perm.T, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, lower_inv_pt, upper=True)

    def _log_abs_det_weight(self, dtype: torch.dtype) -> Tensor:
        if self.lu:
            return self.log_s.to(dtype).sum()
        return torch.linalg.slogdet(self.weight.to(dtype)).logabsdet

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.num_channels:
            raise ShapeError(
                f"InvConv1x1 expected input of shape (B, {self.num_channels}, H, W), got {tuple(x.shape)}."
            )

    def _conv(self, x: Tensor, weight: Tensor) -> Tensor:
        # A 1x1 convolution is a channel-mixing matmul. As one, it costs a third of conv2d's
        # time at the few channels of a wavelet level (C = 1 or 3 at 7x7 or 14x14: 150 us
        # against 360-390 us per forward and backward on one CPU core). On a GPU, matmuls
        # stay in float32 by default, whereas cuDNN convolutions may round to TF32.
        return torch.einsum("oc,bchw->bohw", weight.to(x.dtype), x)

    # The flow's own path stays in full precision under autocast (only coupling nets run in
    # reduced precision): a bf16 weight and an fp32 inverse would not invert each other.
    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(x, context)
        self._check_input(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = self._conv(x, self.weight_matrix())
            pixels = x.shape[2] * x.shape[3]
            return z, zeros_logabsdet(x) + pixels * self._log_abs_det_weight(logdet_dtype(x))

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(z, context)
        self._check_input(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = self._conv(z, self.inverse_weight_matrix())
            pixels = z.shape[2] * z.shape[3]
            return x, zeros_logabsdet(z) - pixels * self._log_abs_det_weight(logdet_dtype(z))

    def extra_repr(self) -> str:
        return f"{self.num_channels}, lu={self.lu}"


@hookimpl
def flowkit_register_transforms(register: Any) -> None:
    register("invconv", InvConv1x1, params=InvConvParams,
             summary="invertible 1x1 convolution (Glow), LU-decomposed or plain")
