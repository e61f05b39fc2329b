"""The ``db2`` .. ``db8`` decompositions: orthonormal 2-D Daubechies wavelet transforms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flowkit import NoParams, hookimpl
from flowkit.registry import RegisterFn
from flowkit_plugins.decompositions._dwt import DWT2Decomposition

#: Registered orders: ``db<order>`` has ``2 * order`` taps and ``order`` vanishing moments.
ORDERS = range(2, 9)


class DaubechiesDecomposition(DWT2Decomposition):
    r"""One level of the 2-D Daubechies ``db<order>`` transform, periodized.

    Daubechies' wavelet of order :math:`p` has filters of length :math:`L = 2p` and
    :math:`p` vanishing moments: the detail bands of a polynomial image of degree below
    :math:`p` are zero, so smooth images leave more of their energy in ``low`` than with
    Haar (``db1``). The filter banks are PyWavelets' ``dec_lo``/``dec_hi``; the analysis
    matrix per axis, :math:`W \in \mathbb{R}^{N \times N}`,

    .. math::

        (W x)_n = \sum_{k=0}^{L-1} h_k\, x_{(2n + L/2 - k) \bmod N}, \qquad
        (W x)_{N/2 + n} = \sum_{k=0}^{L-1} g_k\, x_{(2n + L/2 - k) \bmod N},

    is orthogonal for every even :math:`N \ge 2`, including :math:`N < L` where the periodic
    extension wraps around more than once (``db8`` on a 4x4 image), so
    :math:`\log|\det| = 0`. Results equal ``pywt.dwt2(x, f"db{order}", mode="periodization")``
    band for band; see `DWT2Decomposition` for the layout and for why periodization.

    Args:
        order: 2 to 8 (``db2`` .. ``db8``), the number of vanishing moments.

    References:
        Daubechies. Ten Lectures on Wavelets. SIAM, 1992.

    Example:
        >>> import torch
        >>> low, detail, _ = DaubechiesDecomposition(4).split(torch.randn(1, 3, 16, 16))
        >>> tuple(low.shape), tuple(detail.shape)
        ((1, 3, 8, 8), (1, 9, 8, 8))
    """

    def __init__(self, order: int) -> None:
        if order not in ORDERS:
            raise ValueError(f"Daubechies order must be between 2 and 8, but got {order}.")
        super().__init__(f"db{order}")
        self.order = order


def _factory(order: int) -> Callable[..., DaubechiesDecomposition]:
    def factory(params: NoParams, *, build: Callable[..., Any]) -> DaubechiesDecomposition:
        return DaubechiesDecomposition(order)

    factory.__doc__ = f"One level of the orthonormal 2-D db{order} wavelet transform (periodized)."
    return factory


@hookimpl
def flowkit_register_decompositions(register: RegisterFn) -> None:
    for order in ORDERS:
        register(
            f"db{order}", _factory(order), params=NoParams,
            summary=f"one level of the orthonormal 2-D Daubechies transform with {2 * order} taps",
        )
