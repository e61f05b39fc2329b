"""Dequantizer ``uniform``: add uniform noise to integer pixels and scale to [0, 1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from flowkit import Dequantizer, NoParams, hookimpl

if TYPE_CHECKING:
    from flowkit.registry import RegisterFn

Shape = tuple[int, ...]


class UniformDequantizer(Dequantizer):
    r"""``y = (x + u) / K`` with ``u ~ U[0, 1)^D`` and ``K = 2^n_bits``; ``log q(u | x) = 0``.

    ``x`` holds integers in ``[0, K)`` (uint8, int64, or a float dtype holding integer
    values), NCHW or any shape ``(B, ...)``. ``y`` has dtype float32, or
    ``torch.promote_types(x.dtype, torch.float32)`` when ``x`` is floating (float64 stays
    float64; half and bfloat16 are computed in float32, whose 24-bit mantissa keeps the noise
    resolution that bfloat16's 8 bits would lose).

    Every ``y`` lies in ``[x / K, (x + 1) / K)``, hence in ``[0, 1)``, and
    ``floor(y * K) == x`` exactly: in float32, ``255 + u`` rounds up to ``256`` for ``u``
    within ``2^-17`` of 1, so ``y`` is capped at the largest float below ``(x + 1) / K``.

    Bits per dimension (see `flowkit.contracts.dequantizer`): with ``D = C·H·W``,

    .. math::

        \text{bits/dim} = \frac{-\log p(y) + D \log K + \log q(u \mid x)}{D \log 2}
                        = \frac{-\log p(y)}{D \log 2} + n_\text{bits},

    because ``log q = 0`` here: the offset is ``D log K`` nats, ``n_bits`` bits per dimension.
    Averaged over ``u`` this is an upper bound on the discrete model's bits/dim.

    Example:
        >>> import flowkit
        >>> dequantize = flowkit.build("dequantizer", "uniform")
        >>> y, log_q = dequantize(torch.tensor([[0, 31]], dtype=torch.uint8), n_bits=5)
        >>> bool(((y * 32).floor() == torch.tensor([[0.0, 31.0]])).all()), log_q.tolist()
        (True, [0.0])
    """

    def __init__(
        self, params: NoParams, *, in_shape: Shape | None = None, build: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        self.in_shape = None if in_shape is None else tuple(in_shape)

    def forward(self, x: Tensor, n_bits: int) -> tuple[Tensor, Tensor]:
        x = self.levels_in(x, n_bits)
        dtype = x.dtype
        levels = float(2**n_bits)
        # Division by a power of two is exact, so the cap below keeps floor(y * K) == x.
        y = (x + torch.rand_like(x)) / levels
        cap = torch.nextafter((x + 1) / levels, torch.zeros((), dtype=dtype, device=x.device))
        y = torch.minimum(y, cap)
        log_q = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
        return y, log_q

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}"


@hookimpl
def flowkit_register_dequantizers(register: RegisterFn) -> None:
    register("uniform", UniformDequantizer, params=NoParams,
             summary="uniform noise: y = (x + u) / 2^n_bits, log q = 0 (offset n_bits bits/dim)")
