"""The ``haar`` decomposition: one level of the orthonormal 2-D Haar transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flowkit import NoParams, hookimpl
from flowkit.registry import RegisterFn
from flowkit_plugins.decompositions._dwt import DWT2Decomposition


class HaarDecomposition(DWT2Decomposition):
    r"""The 2-D Haar wavelet transform, as in Wavelet Flow (Yu et al., 2020).

    On each 2x2 block :math:`\begin{pmatrix} p & q \\ r & s \end{pmatrix}` of each channel
    (row index along H), PyWavelets' ``dwt2(x, "haar", mode="periodization")`` gives

    .. math::

        a = \tfrac12 (p + q + r + s), \quad
        c_H = \tfrac12 (p + q - r - s), \quad
        c_V = \tfrac12 (p - q + r - s), \quad
        c_D = \tfrac12 (p - q - r + s),

    an orthogonal 4x4 matrix (a Hadamard matrix over 2), so :math:`\log|\det| = 0` and
    ``merge`` is its transpose. The two taps never reach past the block, so periodization
    never wraps and the result matches every PyWavelets boundary mode on even sizes.
    See `DWT2Decomposition` for the band layout: ``low`` is ``a`` (the 2x2 block mean times
    2) and ``detail`` channel ``3*c + k`` is ``(cH, cV, cD)[k]`` of channel c.

    References:
        Yu, Derpanis, Brubaker. Wavelet Flow: Fast Training of High Resolution Normalizing
        Flows. NeurIPS 2020.

    Example:
        >>> import torch
        >>> x = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]])
        >>> low, detail, _ = HaarDecomposition(NoParams()).split(x)
        >>> low.flatten().round(decimals=5).tolist(), detail.flatten().round(decimals=5).tolist()
        ([6.0], [-3.0, -2.0, 1.0])
    """

    def __init__(self, params: NoParams, *, build: Callable[..., Any] | None = None) -> None:
        super().__init__("haar")


@hookimpl
def flowkit_register_decompositions(register: RegisterFn) -> None:
    register(
        "haar", HaarDecomposition, params=NoParams,
        summary="one level of the orthonormal 2-D Haar wavelet transform",
    )
