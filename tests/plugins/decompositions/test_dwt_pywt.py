"""Haar and db2..db8 against PyWavelets' periodized DWT, band for band, in float64."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import pywt
import torch

from flowkit import NoParams
from flowkit_plugins.decompositions._dwt import DWT2Decomposition
from flowkit_plugins.decompositions.daubechies import DaubechiesDecomposition
from flowkit_plugins.decompositions.haar import HaarDecomposition

WAVELETS = ["haar"] + [f"db{order}" for order in range(2, 9)]
# 2x2 and 4x4 are smaller than every Daubechies filter: the periodic extension wraps more than once.
SIZES = [(2, 2), (4, 4), (8, 6), (6, 8), (16, 16)]
ATOL = 1e-10


def make(wavelet: str) -> DWT2Decomposition:
    return HaarDecomposition(NoParams()) if wavelet == "haar" else DaubechiesDecomposition(int(wavelet[2:]))


def pywt_split(x: torch.Tensor, wavelet: str) -> tuple[np.ndarray, np.ndarray]:
    """(B, C, H, W) -> (low (B, C, h, w), detail (B, 3C, h, w)) with PyWavelets, channel by channel."""
    lows, details = [], []
    for image in x.numpy():
        per_channel = [pywt.dwt2(channel, wavelet, mode="periodization") for channel in image]
        lows.append([c_a for c_a, _ in per_channel])
        details.append([band for _, bands in per_channel for band in bands])
    return np.asarray(lows), np.asarray(details)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("wavelet", WAVELETS)
def test_split_matches_pywt_dwt2_periodization(wavelet, size, channels):
    x = torch.randn(2, channels, *size, dtype=torch.float64)
    low, detail, logabsdet = make(wavelet).split(x)
    expected_low, expected_detail = pywt_split(x, wavelet)
    np.testing.assert_allclose(low.numpy(), expected_low, atol=ATOL, rtol=0)
    np.testing.assert_allclose(detail.numpy(), expected_detail, atol=ATOL, rtol=0)
    torch.testing.assert_close(logabsdet, torch.zeros(2, dtype=torch.float64), atol=0, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("wavelet", WAVELETS)
def test_merge_matches_pywt_idwt2_periodization(wavelet, size, channels):
    # Arbitrary bands, not the split of an image: merge is checked on its own.
    half = (size[0] // 2, size[1] // 2)
    low = torch.randn(2, channels, *half, dtype=torch.float64)
    detail = torch.randn(2, 3 * channels, *half, dtype=torch.float64)
    x, logabsdet = make(wavelet).merge(low, detail)
    expected = np.asarray([
        [
            pywt.idwt2(
                (low[b, c].numpy(), tuple(detail[b, 3 * c + k].numpy() for k in range(3))),
                wavelet, mode="periodization",
            )
            for c in range(channels)
        ]
        for b in range(2)
    ])
    np.testing.assert_allclose(x.numpy(), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(logabsdet, torch.zeros(2, dtype=torch.float64), atol=0, rtol=0)


@pytest.mark.parametrize("size", [(16, 16), (8, 12)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("wavelet", WAVELETS)
def test_two_levels_match_pywt_wavedec2(wavelet, size):
    decomposition = make(wavelet)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    low1, detail1, _ = decomposition.split(x)
    low2, detail2, _ = decomposition.split(low1)
    for b in range(2):
        for c in range(3):
            with warnings.catch_warnings():
                # Long filters on 16 pixels exceed pywt.dwt_max_level, which only warns; the
                # periodized transform is still defined and is what we compare against.
                warnings.simplefilter("ignore", UserWarning)
                c_a2, bands2, bands1 = pywt.wavedec2(x[b, c].numpy(), wavelet, mode="periodization", level=2)
            np.testing.assert_allclose(low2[b, c].numpy(), c_a2, atol=ATOL, rtol=0)
            for k in range(3):
                np.testing.assert_allclose(detail2[b, 3 * c + k].numpy(), bands2[k], atol=ATOL, rtol=0)
                np.testing.assert_allclose(detail1[b, 3 * c + k].numpy(), bands1[k], atol=ATOL, rtol=0)


def test_detail_bands_follow_pywt_order_ch_cv_cd():
    # A ramp along H has only a horizontal-edge response (cH); one along W only cV.
    rows = torch.arange(4, dtype=torch.float64).reshape(1, 1, 4, 1).expand(1, 1, 4, 4)
    _, detail, _ = HaarDecomposition(NoParams()).split(rows)
    assert detail[0, 0].abs().min() > 0.5
    torch.testing.assert_close(detail[0, 1:], torch.zeros(2, 2, 2, dtype=torch.float64), atol=1e-12, rtol=0)
    _, detail, _ = HaarDecomposition(NoParams()).split(rows.transpose(2, 3))
    assert detail[0, 1].abs().min() > 0.5
    torch.testing.assert_close(detail[0, 0::2], torch.zeros(2, 2, 2, dtype=torch.float64), atol=1e-12, rtol=0)
