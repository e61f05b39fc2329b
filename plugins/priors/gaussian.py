"""Prior ``gaussian``: the standard normal N(0, I), the base distribution of most flows."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from flowkit import NoParams, Prior, ShapeError, hookimpl

if TYPE_CHECKING:
    from flowkit.registry import RegisterFn

Shape = tuple[int, ...]
LOG_2PI = math.log(2 * math.pi)


class StandardGaussian(Prior):
    r"""The standard normal density on latents ``z`` of shape ``(B, *shape)``.

    .. math::

        \log p(z) = -\tfrac12 \lVert z \rVert^2 - \tfrac{D}{2} \log 2\pi,

    with D the number of values in one latent, summed in
    ``torch.promote_types(z.dtype, torch.float32)`` with autocast off. The density is fully
    factorised, so ``log_prob`` also accepts other spatial sizes with the same leading
    (channel) dimension, as a fully convolutional model trained on crops needs.

    The prior is unconditional: its ``context_shape`` is ``None`` even when the factory is
    given one (a model asks ``prior.context_shape`` whether to pass a context), and passing
    a context raises `ShapeError`. A non-persistent buffer carries the device and dtype of
    samples, so ``.to(device)`` and ``.double()`` move it; checkpoints do not contain it.

    Args:
        params: none (`flowkit.NoParams`).
        in_shape: the shape of one latent, without the batch dimension, e.g. ``(C, H, W)``.
        context_shape: accepted for the prior factory's signature; not used.

    Example:
        >>> import flowkit
        >>> prior = flowkit.build("prior", "gaussian", in_shape=(3, 4, 4))
        >>> prior.log_prob(torch.zeros(2, 3, 4, 4)).shape
        torch.Size([2])
        >>> prior.sample(5, temperature=0.7).shape
        torch.Size([5, 3, 4, 4])
    """

    _anchor: Tensor

    def __init__(
        self, params: NoParams, *, in_shape: Shape, context_shape: Shape | None = None,
        build: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in in_shape)
        self.context_shape = None
        if not self.shape or min(self.shape) < 1:
            raise ShapeError(f"A Gaussian prior needs a non-empty shape of positive sizes, got {self.shape}.")
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def _check(self, z: Tensor, context: Tensor | None) -> None:
        self._check_context_none(context)
        if z.dim() != len(self.shape) + 1 or z.shape[1] != self.shape[0]:
            raise ShapeError(
                f"The gaussian prior expected latents of shape (B, {', '.join(map(str, self.shape))}), "
                f"got {tuple(z.shape)}."
            )

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        self._check(z, context)
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.to(torch.promote_types(z.dtype, torch.float32)).flatten(1)
            return -0.5 * (flat.square().sum(1) + flat.shape[1] * LOG_2PI)

    def sample(self, n: int, context: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        """``temperature * eps`` with ``eps ~ N(0, I)``, of shape ``(n, *shape)``."""
        self._check_context_none(context)
        eps = torch.randn((n, *self.shape), device=self._anchor.device, dtype=self._anchor.dtype)
        return temperature * eps

    def mean(self, n: int, context: Tensor | None = None) -> Tensor:
        self._check_context_none(context)
        return torch.zeros((n, *self.shape), device=self._anchor.device, dtype=self._anchor.dtype)

    def _check_context_none(self, context: Tensor | None) -> None:
        if context is not None:
            raise ShapeError(
                f"The gaussian prior is unconditional but was given a context of shape "
                f"{tuple(context.shape)}; call it without context."
            )

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


@hookimpl
def flowkit_register_priors(register: RegisterFn) -> None:
    register("gaussian", StandardGaussian, params=NoParams,
             summary="standard normal N(0, I), unconditional")
