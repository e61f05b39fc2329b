"""Prior ``conditional_gaussian``: a diagonal Gaussian whose mean and scale come from a context."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from flowkit import Prior, ShapeError, hookimpl, param
from flowkit.nn.edge_padding import conv

if TYPE_CHECKING:
    from flowkit.registry import RegisterFn

Shape = tuple[int, ...]
LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True, kw_only=True)
class ConditionalGaussianParams:
    hidden: int = param(0, "0: one zero-initialised layer; H: a layer of H channels, ReLU, then the zero-initialised one")
    edge_bias: bool = param(
        False, "image contexts: the 3x3 convolutions also see a channel marking the zero padding (openai/glow)")
    output_scale: bool = param(
        False, "multiply the last layer's output by exp(3 * logs), logs zero-initialised (openai/glow's conv2d_zeros)")

    def __post_init__(self) -> None:
        if self.hidden < 0:
            raise ValueError(f"hidden = {self.hidden} is negative; use 0 for a single layer.")


def _zero_(layer: nn.Conv2d | nn.Linear) -> nn.Module:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ConditionalGaussian(Prior):
    r"""A diagonal Gaussian on ``z`` of shape ``(B, *shape)`` with mean and scale from a context.

    .. math::

        \mu, \log\sigma = g(\text{context}), \qquad
        \log p(z \mid \text{context}) = \sum_i \Big[ -\tfrac12 \big(\tfrac{z_i - \mu_i}{\sigma_i}\big)^2
            - \log\sigma_i - \tfrac12 \log 2\pi \Big],

    summed in at least float32 with autocast off. ``g`` depends on the context shape:

    - ``(Cc, H, W)``, the same H and W as ``shape = (C, H, W)``: 3x3 convolutions (padding 1)
      to ``2C`` channels, the first C being the mean and the last C the log-scale, as Glow's
      split prior. The map is fully convolutional, so other spatial sizes work as long as the
      context has the size of ``z``.
    - ``(Cc,)``, a vector: linear layers to ``2 D`` values (D the size of ``shape``), reshaped to
      ``(2, *shape)``: mean, then log-scale.

    With ``hidden = 0``, ``g`` is one layer; with ``hidden = H`` it is a layer of H units, a ReLU
    and a final layer. The final layer starts at zero, so at initialisation the prior is
    N(0, I) for every context. The log-scale is not clamped.

    Args:
        params: ``hidden``, the width of the hidden layer (0: none), ``edge_bias`` and ``output_scale``.
        in_shape: the latent shape without the batch dimension.
        context_shape: ``(Cc, H, W)`` or ``(Cc,)``; ``None`` raises `ShapeError`.

    Example:
        >>> import flowkit
        >>> prior = flowkit.build("prior", "conditional_gaussian", in_shape=(3, 4, 4),
        ...                       context_shape=(2, 4, 4))
        >>> context = torch.randn(5, 2, 4, 4)
        >>> prior.sample(5, context, temperature=0.5).shape
        torch.Size([5, 3, 4, 4])
    """

    def __init__(
        self, params: ConditionalGaussianParams, *, in_shape: Shape, context_shape: Shape | None = None,
        build: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        hidden, edge_bias = params.hidden, params.edge_bias
        self.shape = tuple(int(s) for s in in_shape)
        if context_shape is None:
            raise ShapeError(
                f"The conditional_gaussian prior needs a context, but was built without one for "
                f"latents of shape {self.shape}; use the gaussian prior for an unconditional one."
            )
        self.context_shape = tuple(int(s) for s in context_shape)
        self.hidden = hidden
        if not self.shape or min(self.shape) < 1 or min(self.context_shape, default=0) < 1:
            raise ShapeError(
                f"The conditional_gaussian prior needs non-empty shapes of positive sizes, got "
                f"shape {self.shape} and context shape {self.context_shape}."
            )
        self.spatial = len(self.context_shape) == 3
        if self.spatial:
            if len(self.shape) != 3 or self.shape[1:] != self.context_shape[1:]:
                raise ShapeError(
                    f"The conditional_gaussian prior got latents of shape {self.shape} and an image "
                    f"context of shape {self.context_shape}; an image context (Cc, H, W) must have the "
                    "height and width of the latents (C, H, W)."
                )
            cin, cout = self.context_shape[0], 2 * self.shape[0]
            if hidden:
                self.net = nn.Sequential(
                    conv(cin, hidden, 3, edge_bias=edge_bias), nn.ReLU(),
                    _zero_(conv(hidden, cout, 3, edge_bias=edge_bias)),
                )
            else:
                self.net = _zero_(conv(cin, cout, 3, edge_bias=edge_bias))
        elif len(self.context_shape) == 1:
            cin, cout = self.context_shape[0], 2 * math.prod(self.shape)
            if hidden:
                self.net = nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(), _zero_(nn.Linear(hidden, cout)))
            else:
                self.net = _zero_(nn.Linear(cin, cout))
        else:
            raise ShapeError(
                f"The conditional_gaussian prior got a context shape {self.context_shape}; it must be "
                "an image (Cc, H, W) or a vector (Cc,)."
            )
        out_shape = (1, cout, 1, 1) if self.spatial else (1, cout)
        self.logs = nn.Parameter(torch.zeros(out_shape)) if params.output_scale else None

    def _check_context(self, context: Tensor | None, n: int, spatial_size: Shape | None = None) -> Tensor:
        """Raises `ShapeError` unless ``context`` fits; ``spatial_size`` is the latents' (H, W)."""
        if context is None:
            raise ShapeError(
                f"The conditional_gaussian prior was built with context of shape {self.context_shape} "
                "but was called without context."
            )
        expected = self.context_shape
        if self.spatial:
            if spatial_size is not None:
                expected = (self.context_shape[0], *spatial_size)
            ok = context.dim() == 4 and context.shape[1] == expected[0]
            ok = ok and (spatial_size is None or tuple(context.shape[2:]) == spatial_size)
        else:
            ok = tuple(context.shape[1:]) == expected
        if not ok:
            raise ShapeError(
                f"The conditional_gaussian prior expected a context of shape (B, "
                f"{', '.join(map(str, expected))}), got {tuple(context.shape)}."
            )
        if context.shape[0] != n:
            raise ShapeError(f"The context has batch size {context.shape[0]} but {n} latents were asked for.")
        return context

    def parameters_of(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, log_scale)`` for a checked context, each of shape ``(B, *shape)`` for the
        context's own spatial size."""
        out = self.net(context)
        if self.logs is not None:
            out = out * torch.exp(3.0 * self.logs)
        if self.spatial:
            mean, log_scale = out.chunk(2, dim=1)
            return mean, log_scale
        mean, log_scale = out.view(out.shape[0], 2, *self.shape).unbind(1)
        return mean, log_scale

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        if self.spatial:
            ok = z.dim() == 4 and z.shape[1] == self.shape[0]
        else:
            ok = tuple(z.shape[1:]) == self.shape
        if not ok:
            raise ShapeError(
                f"The conditional_gaussian prior expected latents of shape "
                f"(B, {', '.join(map(str, self.shape))}), got {tuple(z.shape)}."
            )
        context = self._check_context(context, z.shape[0], tuple(z.shape[2:]) if self.spatial else None)
        mean, log_scale = self.parameters_of(context)
        with torch.autocast(device_type=z.device.type, enabled=False):
            dtype = torch.promote_types(torch.promote_types(z.dtype, mean.dtype), torch.float32)
            mean, log_scale = mean.to(dtype), log_scale.to(dtype)
            scaled = (z.to(dtype) - mean) * torch.exp(-log_scale)
            return (-0.5 * scaled.square() - log_scale).flatten(1).sum(1) - 0.5 * LOG_2PI * math.prod(z.shape[1:])

    def sample(self, n: int, context: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        """``mean + temperature * exp(log_scale) * eps`` with ``eps ~ N(0, I)``; ``n`` = context batch."""
        context = self._check_context(context, n)
        mean, log_scale = self.parameters_of(context)
        if temperature == 0:
            return mean
        return mean + temperature * torch.exp(log_scale) * torch.randn_like(mean)

    def mean(self, n: int, context: Tensor | None = None) -> Tensor:
        """The mean (the mode) for each context; ``n`` must equal the context batch size."""
        context = self._check_context(context, n)
        return self.parameters_of(context)[0]

    def extra_repr(self) -> str:
        return f"shape={self.shape}, context_shape={self.context_shape}, hidden={self.hidden}"


@hookimpl
def flowkit_register_priors(register: RegisterFn) -> None:
    register("conditional_gaussian", ConditionalGaussian, params=ConditionalGaussianParams,
             summary="diagonal Gaussian with mean and log-scale from a context (zero-initialised: N(0, I))")
