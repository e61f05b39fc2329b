"""Prior ``learned_gaussian``: a diagonal Gaussian with a learned mean and log-scale (Glow's top prior)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from flowkit import Prior, ShapeError, hookimpl, param

if TYPE_CHECKING:
    from flowkit.registry import RegisterFn

Shape = tuple[int, ...]
LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True, kw_only=True)
class LearnedGaussianParams:
    per: Literal["channel", "element"] = param(
        "channel", "one mean and log-scale per channel (Glow's learntop) or per latent element"
    )
    ycond: bool = param(
        False, "also a mean and log-scale from the model's vector context (a class one-hot) through a "
        "zero-initialised linear map (openai/glow's ycond); needs a model built with a vector context")


class LearnedGaussian(Prior):
    r"""A diagonal Gaussian whose mean and log-scale are learned parameters, both starting at zero.

    .. math::

        \log p(z) = \sum_i \Big[ -\tfrac12 \big(\tfrac{z_i - \mu_i}{\sigma_i}\big)^2
            - \log\sigma_i - \tfrac12 \log 2\pi \Big], \qquad \sigma = e^{\text{log\_scale}},

    summed in at least float32 with autocast off. With ``per = "channel"`` (the default)
    ``mu`` and ``log_scale`` have shape ``(C, 1, 1)`` and are shared by all pixels of a channel:
    Glow's ``learntop``, a zero-initialised convolution applied to zeros, reduces to exactly
    that (its output is its per-channel bias). ``per = "element"`` learns one pair per latent
    value. At initialisation the prior is N(0, I).

    Unconditional unless ``ycond``: ``context_shape`` is ``None`` even when the factory is given
    one, and passing a context raises `ShapeError`. With ``ycond`` and a vector context ``c``
    (the class one-hot of a class-conditional model), ``[Δmu, Δlog_scale] = W c`` from a
    zero-initialised linear map is added, per channel (or element): openai/glow's ``ycond``
    (``model.py``, ``prior()``: ``h += linear_zeros(y_onehot, 2 n_z)``), without its
    ``weight_y`` classifier loss, so the objective stays the model's bits/dim. At initialisation
    the prior is N(0, I) for every class. Temperature ``T`` scales the standard deviation:
    samples are ``mu + T * sigma * eps``; ``T = 0`` gives the mean.

    Args:
        params: ``per``, ``"channel"`` or ``"element"``.
        in_shape: ``(C, H, W)`` (or any shape whose first entry is the channel count).
        context_shape: accepted for the prior factory's signature; not used.

    References:
        Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018
        (openai/glow ``model.py``, ``prior()`` with ``learntop``).

    Example:
        >>> import flowkit
        >>> prior = flowkit.build("prior", "learned_gaussian", in_shape=(3, 4, 4))
        >>> prior.log_prob(torch.zeros(2, 3, 4, 4)).shape
        torch.Size([2])
    """

    def __init__(
        self, params: LearnedGaussianParams, *, in_shape: Shape, context_shape: Shape | None = None,
        build: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        per = params.per
        self.shape = tuple(int(s) for s in in_shape)
        self.context_shape = None
        if not self.shape or min(self.shape) < 1:
            raise ShapeError(f"A learned Gaussian prior needs a non-empty shape of positive sizes, got {self.shape}.")
        if per not in ("channel", "element"):
            raise ValueError(f'per = "{per}" is not allowed; allowed: "channel", "element".')
        self.per = per
        param_shape = (self.shape[0], *([1] * (len(self.shape) - 1))) if per == "channel" else self.shape
        self.loc = nn.Parameter(torch.zeros(param_shape))
        self.log_scale = nn.Parameter(torch.zeros(param_shape))
        self.param_shape = param_shape
        self.ycond: nn.Linear | None = None
        if params.ycond:
            if context_shape is None or len(tuple(context_shape)) != 1:
                raise ShapeError(f"learned_gaussian with ycond = true takes a vector context (a class one-hot: a "
                                 f"class-conditional model, data.labels = true), got context_shape {context_shape}.")
            self.context_shape = (int(context_shape[0]),)
            self.ycond = nn.Linear(self.context_shape[0], 2 * math.prod(param_shape))
            nn.init.zeros_(self.ycond.weight)
            nn.init.zeros_(self.ycond.bias)

    def _check_context(self, context: Tensor | None) -> None:
        if self.ycond is None and context is not None:
            raise ShapeError(
                f"The learned_gaussian prior is unconditional but was given a context of shape "
                f"{tuple(context.shape)}; call it without context (or set ycond = true)."
            )
        if self.ycond is not None and (context is None or tuple(context.shape[1:]) != self.context_shape):
            got = None if context is None else tuple(context.shape)
            raise ShapeError(f"The learned_gaussian prior with ycond takes a context of shape (B, "
                             f"{self.context_shape[0]}), got {got}.")

    def _params(self, context: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(loc, log_scale)``: the learned ones, plus ``W c`` per image with ycond (batch first)."""
        loc, log_scale = self.loc.to(dtype), self.log_scale.to(dtype)
        if self.ycond is None:
            return loc, log_scale
        shift = self.ycond(context.to(self.ycond.weight.dtype)).to(dtype)
        d_loc, d_log_scale = shift.view(len(context), 2, *self.param_shape).unbind(1)
        return loc + d_loc, log_scale + d_log_scale

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        self._check_context(context)
        # Per channel the density factorises over positions, so a fully convolutional model
        # trained on crops (Wavelet Flow's top levels) may pass other spatial sizes.
        fits = z.dim() == len(self.shape) + 1 and z.shape[1] == self.shape[0] if self.per == "channel" \
            else tuple(z.shape[1:]) == self.shape
        if not fits:
            expected = ", ".join(map(str, self.shape if self.per == "element" else (self.shape[0], "...")))
            raise ShapeError(f"The learned_gaussian prior expected latents of shape (B, {expected}), got {tuple(z.shape)}.")
        with torch.autocast(device_type=z.device.type, enabled=False):
            dtype = torch.promote_types(torch.promote_types(z.dtype, self.loc.dtype), torch.float32)
            loc, log_scale = self._params(context, dtype)
            scaled = (z.to(dtype) - loc) * torch.exp(-log_scale)
            per_value = -0.5 * scaled.square() - log_scale - 0.5 * LOG_2PI
            return per_value.flatten(1).sum(1)

    def mean(self, n: int, context: Tensor | None = None) -> Tensor:
        self._check_context(context)
        if self.ycond is None:
            return self.loc.expand(self.shape).unsqueeze(0).expand(n, *self.shape).clone()
        loc, _ = self._params(context, self.loc.dtype)
        return loc.expand(n, *self.shape).clone()

    def sample(self, n: int, context: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        """``mu + temperature * sigma * eps`` with ``eps ~ N(0, I)``, of shape ``(n, *shape)``."""
        mean = self.mean(n, context)
        if temperature == 0:
            return mean
        eps = torch.randn_like(mean)
        log_scale = self.log_scale if self.ycond is None else self._params(context, self.loc.dtype)[1]
        return mean + temperature * torch.exp(log_scale) * eps

    def extra_repr(self) -> str:
        return f"shape={self.shape}, per={self.per}" + (f", ycond={self.context_shape[0]}" if self.ycond else "")


@hookimpl
def flowkit_register_priors(register: RegisterFn) -> None:
    register("learned_gaussian", LearnedGaussian, params=LearnedGaussianParams,
             summary="diagonal Gaussian with learned mean and log-scale, zero-initialised (Glow's learntop)")
