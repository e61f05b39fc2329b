"""``transform:actnorm``: per-channel affine normalisation with data-dependent initialisation (Glow)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from flowkit import ShapeError, Transform, hookimpl, param
from flowkit.contracts.transform import logdet_dtype, zeros_logabsdet

Shape = tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class ActNormParams:
    scale: float = param(1.0, "standard deviation of each channel after initialisation (Glow's actnorm scale)")
    per: Literal["channel", "element"] = param(
        "channel", "one bias and scale per channel (Glow) or per channel and position (Flow++'s Norm)")

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"scale = {self.scale} must be > 0.")


class ActNorm(Transform):
    r"""Activation normalisation: ``z = (x + bias) * exp(log_scale)``, one bias and scale per channel.

    ``initialize(x)`` sets ``bias = -mean`` and ``log_scale = log(scale / std)`` (over batch
    and pixels, per channel), so the output of that batch has zero mean and standard deviation
    ``scale`` per channel (Kingma & Dhariwal 2018, section 3.1). With ``per = "element"`` there
    is one bias and scale per channel and position, initialised over the batch alone (Flow++'s
    ``Norm``, aravindsrinivas/flowpp ``flows/flows.py``); the input size is then fixed. It runs once: the
    ``initialized`` buffer is saved with the state dict, so a restored model keeps its values.
    Storing the log-scale keeps the scale positive and the log-det exact.

    .. math:: \log|\det \partial z / \partial x| = H W \sum_c \text{log\_scale}_c

    Args:
        params: ``scale`` (standard deviation per channel after initialisation) and ``per``.
        in_shape: ``(C, H, W)`` of inputs ``(B, C, H, W)``; ``H, W`` are used only with ``per = "element"``.
        context_shape: accepted (and checked) for uniformity with couplings; the value is unused.

    References:
        Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.

    Example:
        >>> import flowkit
        >>> t = flowkit.build("transform", "actnorm", in_shape=(3, 4, 4))
        >>> t.initialize(torch.randn(8, 3, 4, 4) * 5 + 1)
        >>> z, logabsdet = t(torch.randn(2, 3, 4, 4))
    """

    def __init__(
        self, params: ActNormParams, *, in_shape: Shape, context_shape: Shape | None = None, build: Any = None
    ) -> None:
        super().__init__()
        num_channels = int(in_shape[0])
        size = (int(in_shape[1]), int(in_shape[2])) if params.per == "element" else None
        self.num_channels = num_channels
        self.scale = params.scale
        self.context_shape = context_shape
        self.size = size  # (H, W) of a per-element actnorm; None: per channel
        shape = (1, num_channels, *(size or (1, 1)))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(False))

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.num_channels or (self.size and tuple(x.shape[2:]) != self.size):
            h, w = self.size or ("H", "W")
            raise ShapeError(
                f"ActNorm expected input of shape (B, {self.num_channels}, {h}, {w}), got {tuple(x.shape)}."
            )

    def _logabsdet(self, x: Tensor) -> Tensor:
        pixels = 1 if self.size else x.shape[2] * x.shape[3]
        return zeros_logabsdet(x) + pixels * self.log_scale.to(logdet_dtype(x)).sum()

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(x, context)
        self._check_input(x)
        z = (x + self.bias) * torch.exp(self.log_scale)
        return z, self._logabsdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(z, context)
        self._check_input(z)
        x = z * torch.exp(-self.log_scale) - self.bias
        return x, -self._logabsdet(z)

    @torch.no_grad()
    def initialize(self, x: Tensor, context: Tensor | None = None) -> None:
        """Sets bias and scale from the batch ``x``, unless already initialised (or restored)."""
        self.check_context(x, context)
        self._check_input(x)
        if bool(self.initialized):
            return
        x = x.detach().to(logdet_dtype(x))
        dims = (0,) if self.size else (0, 2, 3)
        mean = x.mean(dim=dims)
        std = x.std(dim=dims, unbiased=False)
        self.bias.copy_((-mean).view_as(self.bias))
        # The epsilon guards constant channels (e.g. zero padding), as Glow's 1e-6 does.
        self.log_scale.copy_(torch.log(self.scale / (std + 1e-6)).view_as(self.log_scale))
        self.initialized.fill_(True)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, scale={self.scale}" + (f", per element of {self.size}" if self.size else "")


@hookimpl
def flowkit_register_transforms(register: Any) -> None:
    register("actnorm", ActNorm, params=ActNormParams,
             summary="per-channel scale and bias with data-dependent initialisation (Glow)")
