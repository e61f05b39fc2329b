"""The orthonormal 2-D discrete wavelet transform shared by ``haar`` and ``db2``..``db8``.

One level of PyWavelets' ``dwt2(x, wavelet, mode="periodization")`` and its inverse in torch,
batched, differentiable and on any device. The filter banks are read from PyWavelets when the
module is built; nothing in the forward pass touches numpy.
"""

from __future__ import annotations

import pywt
import torch
from torch import Tensor

from flowkit.contracts.decomposition import Decomposition, Shape
from flowkit.contracts.transform import zeros_logabsdet
from flowkit.errors import ShapeError


def check_image_shape(owner: str, shape: tuple[int, ...], *, batched: bool) -> None:
    """Raises `ShapeError` unless ``shape`` is ``(B, C, H, W)`` (or ``(C, H, W)``) with even H, W >= 2."""
    layout = "(B, C, H, W)" if batched else "(C, H, W)"
    if len(shape) != (4 if batched else 3):
        raise ShapeError(
            f"{owner} expects an input of shape {layout}, but got a tensor of shape {tuple(shape)}."
        )
    height, width = shape[-2], shape[-1]
    if height < 2 or width < 2 or height % 2 or width % 2:
        raise ShapeError(
            f"{owner} halves the image, so H and W must be even and at least 2, but got shape "
            f"{tuple(shape)} (H={height}, W={width}); crop or pad the image to an even size."
        )


def check_bands_shape(owner: str, low: Tensor, detail: Tensor) -> None:
    """Raises `ShapeError` unless ``low`` is ``(B, C, h, w)`` and ``detail`` is ``(B, 3C, h, w)``."""
    if (
        low.dim() != 4
        or detail.dim() != 4
        or detail.shape[0] != low.shape[0]
        or detail.shape[1] != 3 * low.shape[1]
        or detail.shape[2:] != low.shape[2:]
    ):
        raise ShapeError(
            f"{owner}.merge expects low of shape (B, C, h, w) and detail of shape (B, 3C, h, w), "
            f"but got low {tuple(low.shape)} and detail {tuple(detail.shape)}."
        )


def check_floating(owner: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise ShapeError(f"{owner} needs a floating-point tensor, but got dtype {x.dtype}.")


def _polyphase_taps(length: int) -> tuple[tuple[int, int], ...]:
    """For each tap k, ``(r, q)`` with ``2n + L/2 - k = 2(n + q) + r`` and ``r`` in {0, 1}."""
    taps = []
    for k in range(length):
        offset = length // 2 - k
        parity = offset % 2
        taps.append((parity, (offset - parity) // 2))
    return tuple(taps)


def _periodic_extension(x: Tensor, dim: int, start: int, stop: int) -> Tensor:
    """``x[start mod n], ..., x[(stop - 1) mod n]`` along ``dim`` (n = size of ``dim``)."""
    # A modulo index rather than F.pad(mode="circular"), which refuses pads longer than the
    # signal: db8 has 16 taps and a 4x4 image 2 samples per phase, so it wraps several times.
    index = torch.arange(start, stop, device=x.device).remainder(x.shape[dim])
    return x.index_select(dim, index)


class DWT2Decomposition(Decomposition):
    r"""One level of the orthonormal 2-D DWT with periodized boundaries.

    For a 1-D signal :math:`x \in \mathbb{R}^N` (N even) and PyWavelets' decomposition
    filters :math:`h` (``dec_lo``) and :math:`g` (``dec_hi``) of even length :math:`L`,

    .. math::

        a_n = \sum_{k=0}^{L-1} h_k\, x_{(2n + L/2 - k) \bmod N}, \qquad
        d_n = \sum_{k=0}^{L-1} g_k\, x_{(2n + L/2 - k) \bmod N}, \qquad n = 0, \dots, N/2 - 1,

    which is exactly ``pywt.dwt(x, wavelet, mode="periodization")``. Stacked, the analysis
    matrix :math:`W = \begin{pmatrix} A \\ D \end{pmatrix} \in \mathbb{R}^{N \times N}` is
    orthogonal for an orthogonal wavelet (:math:`W W^\top = I`), so synthesis is
    :math:`x = W^\top \begin{pmatrix} a \\ d \end{pmatrix}`, which is
    ``pywt.idwt(a, d, wavelet, mode="periodization")``. The 2-D transform applies
    :math:`W_H` along H and :math:`W_W` along W, i.e. :math:`X \mapsto W_H X W_W^\top`, a
    Kronecker product of orthogonal matrices, hence orthonormal: norms are preserved and
    :math:`\log|\det| = 0` for both ``split`` and ``merge``.

    Periodization is the one boundary mode that keeps both properties: PyWavelets' default
    ``"symmetric"`` mode returns :math:`\lfloor (N + L - 1)/2 \rfloor` coefficients per axis,
    more than :math:`N/2`, so the map is not square, let alone orthonormal, and a flow could
    not use it as a bijection.

    Implementation (polyphase form): with the even and odd samples :math:`x^{(r)}_p = x_{2p+r}`
    and :math:`2n + L/2 - k = 2(n + q_k) + r_k`,
    :math:`a_n = \sum_k h_k\, x^{(r_k)}_{(n + q_k) \bmod N/2}`: each tap is a multiply-add of
    a shifted view of one phase, and synthesis is the transpose,
    :math:`x^{(r)}_p = \sum_{k : r_k = r} h_k a_{p - q_k} + g_k d_{p - q_k}`. A loop over the
    :math:`L \le 16` taps, with elementwise arithmetic only: unlike a convolution or a matrix
    product, nothing can run in TF32 on a GPU (cuDNN's default for float32 convolutions),
    which would leave ``merge(split(x))`` off by 1e-3 for ``db8``.

    Band layout: ``low`` is ``(B, C, H/2, W/2)``; ``detail`` is ``(B, 3C, H/2, W/2)`` with
    channel ``3*c + k`` equal to PyWavelets' k-th detail band ``(cH, cV, cD)`` of channel c:
    cH is high-pass along H (horizontal edges), cV high-pass along W, cD high-pass along both.

    Args:
        wavelet: a PyWavelets name of an orthogonal wavelet (``"haar"``, ``"db4"``, ...).

    Example:
        >>> import torch
        >>> dwt = DWT2Decomposition("db2")
        >>> low, detail, logabsdet = dwt.split(torch.randn(2, 3, 8, 8))
        >>> low.shape, detail.shape, logabsdet.shape
        (torch.Size([2, 3, 4, 4]), torch.Size([2, 9, 4, 4]), torch.Size([2]))
    """

    orthonormal = True

    def __init__(self, wavelet: str) -> None:
        super().__init__()
        w = pywt.Wavelet(wavelet)
        if not w.orthogonal:
            raise ValueError(
                f'Wavelet "{wavelet}" is not orthogonal, so its periodized DWT is not an '
                "orthonormal bijection."
            )
        self.wavelet = wavelet
        # float64 so that float64 inputs match PyWavelets to round-off; non-persistent because
        # the bank is a function of the wavelet's name and has no place in a checkpoint.
        self.register_buffer("dec_lo", torch.tensor(w.dec_lo, dtype=torch.float64), persistent=False)
        self.register_buffer("dec_hi", torch.tensor(w.dec_hi, dtype=torch.float64), persistent=False)
        self._taps = _polyphase_taps(w.dec_len)

    @property
    def filter_length(self) -> int:
        return len(self._taps)

    def extra_repr(self) -> str:
        return f'wavelet="{self.wavelet}"'

    def output_shape(self, in_shape: Shape) -> tuple[Shape, Shape]:
        check_image_shape(type(self).__name__, tuple(in_shape), batched=False)
        channels, height, width = in_shape
        return (channels, height // 2, width // 2), (3 * channels, height // 2, width // 2)

    def _filters(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.dec_lo.to(device=x.device, dtype=x.dtype), self.dec_hi.to(device=x.device, dtype=x.dtype)

    def _analysis(self, x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """Periodized 1-D DWT along ``dim`` (size N): ``(a, d)``, each of size N/2 there."""
        half = x.shape[dim] // 2
        phases = x.unflatten(dim, (half, 2))
        lo, hi = self._filters(x)
        a = d = None
        for parity in (0, 1):
            shifts = [q for r, q in self._taps if r == parity]
            first = min(shifts)
            ext = _periodic_extension(phases.select(dim + 1, parity), dim, first, max(shifts) + half)
            for k, (r, q) in enumerate(self._taps):
                if r != parity:
                    continue
                term = ext.narrow(dim, q - first, half)
                a = term * lo[k] if a is None else torch.addcmul(a, term, lo[k])
                d = term * hi[k] if d is None else torch.addcmul(d, term, hi[k])
        return a, d

    def _synthesis(self, a: Tensor, d: Tensor, dim: int) -> Tensor:
        """The inverse (and transpose) of `_analysis`: size N/2 along ``dim`` back to N."""
        half = a.shape[dim]
        lo, hi = self._filters(a)
        phases = []
        for parity in (0, 1):
            shifts = [-q for r, q in self._taps if r == parity]
            first = min(shifts)
            ext_a = _periodic_extension(a, dim, first, max(shifts) + half)
            ext_d = _periodic_extension(d, dim, first, max(shifts) + half)
            x = None
            for k, (r, q) in enumerate(self._taps):
                if r != parity:
                    continue
                term = torch.addcmul(ext_a.narrow(dim, -q - first, half) * lo[k],
                                     ext_d.narrow(dim, -q - first, half), hi[k])
                x = term if x is None else x + term
            phases.append(x)
        # Interleave: sample 2p + r of the result is phase r at p.
        return torch.stack(phases, dim=dim + 1).flatten(dim, dim + 1)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, C, H, W) -> (low (B, C, H/2, W/2), detail (B, 3C, H/2, W/2), zeros (B,))``."""
        name = type(self).__name__
        check_image_shape(name, tuple(x.shape), batched=True)
        check_floating(name, x)
        batch, channels, height, width = x.shape
        lo_h, hi_h = self._analysis(x, 2)
        # One pass along W for both halves: (B, C, 2, H/2, W) with index 0 low-pass along H.
        lo_w, hi_w = self._analysis(torch.stack([lo_h, hi_h], dim=2), 4)
        # (cH, cV, cD) = (high H / low W, low H / high W, high H / high W).
        detail = torch.stack([lo_w[:, :, 1], hi_w[:, :, 0], hi_w[:, :, 1]], dim=2)
        low = lo_w[:, :, 0]
        return low, detail.reshape(batch, 3 * channels, height // 2, width // 2), zeros_logabsdet(x)

    def merge(self, low: Tensor, detail: Tensor) -> tuple[Tensor, Tensor]:
        """``(low (B, C, h, w), detail (B, 3C, h, w)) -> (x (B, C, 2h, 2w), zeros (B,))``."""
        name = type(self).__name__
        check_bands_shape(name, low, detail)
        dtype = torch.promote_types(low.dtype, detail.dtype)
        low, detail = low.to(dtype), detail.to(dtype)
        check_floating(name, low)
        batch, channels, half_h, half_w = low.shape
        bands = detail.reshape(batch, channels, 3, half_h, half_w)
        lo_w = torch.stack([low, bands[:, :, 0]], dim=2)
        hi_w = torch.stack([bands[:, :, 1], bands[:, :, 2]], dim=2)
        halves = self._synthesis(lo_w, hi_w, 4)
        x = self._synthesis(halves[:, :, 0], halves[:, :, 1], 2)
        return x, zeros_logabsdet(low)
