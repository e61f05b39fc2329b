"""Uniform dequantization: y in [0, 1), floor(y * 2^n) == x exactly, log q = 0, dtypes."""

from __future__ import annotations

import pytest
import torch

import flowkit
from flowkit.testing import check_dequantizer
from flowkit_plugins.dequantizers.uniform import UniformDequantizer


@pytest.fixture
def dequantize() -> UniformDequantizer:
    return flowkit.build("dequantizer", "uniform", in_shape=(3, 8, 8))


@pytest.mark.parametrize("n_bits", [1, 5, 8])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float32])
def test_floor_recovers_the_integers_exactly(dequantize: UniformDequantizer, n_bits: int, dtype: torch.dtype) -> None:
    torch.manual_seed(n_bits)
    levels = 2**n_bits
    x = torch.randint(0, levels, (64, 3, 8, 8)).to(dtype)
    # The top level is where float32 rounding would reach (x + 1) / K: include many of them.
    x[:8] = levels - 1
    y, log_q = dequantize(x, n_bits)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert (y >= 0).all() and (y < 1).all()
    assert torch.equal(torch.floor(y * levels), x.float())
    assert log_q.shape == (64,) and torch.equal(log_q, torch.zeros(64))


def test_the_top_level_never_rounds_up_to_one(dequantize: UniformDequantizer) -> None:
    # Plain (255 + u) / 256 in float32 reaches 1.0 for about one value in 2^17; 2^21 tries here.
    torch.manual_seed(0)
    x = torch.full((2048, 1024), 255, dtype=torch.uint8)
    y, _ = dequantize(x, 8)
    assert y.max() < 1.0
    assert torch.equal(torch.floor(y * 256), x.float())


def test_noise_is_uniform_within_each_bin(dequantize: UniformDequantizer) -> None:
    torch.manual_seed(1)
    x = torch.full((100, 3, 8, 8), 12, dtype=torch.uint8)
    y, _ = dequantize(x, 5)
    u = y * 32 - 12
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(u.var().item() - 1 / 12) < 0.005
    # Different noise per pixel and per call.
    assert u.unique().numel() > 1000
    assert not torch.equal(dequantize(x, 5)[0], y)


def test_float64_input_stays_float64(dequantize: UniformDequantizer) -> None:
    x = torch.randint(0, 256, (4, 3, 8, 8)).double()
    y, log_q = dequantize(x, 8)
    assert y.dtype == torch.float64 and log_q.dtype == torch.float64
    assert torch.equal(torch.floor(y * 256), x)


def test_bfloat16_input_is_dequantized_in_float32(dequantize: UniformDequantizer) -> None:
    x = torch.randint(0, 256, (4, 3, 8, 8)).to(torch.bfloat16)
    y, _ = dequantize(x, 8)
    assert y.dtype == torch.float32
    assert torch.equal(torch.floor(y * 256), x.float())


def test_input_is_not_modified(dequantize: UniformDequantizer) -> None:
    x = torch.randint(0, 32, (2, 3, 8, 8)).float()
    before = x.clone()
    dequantize(x, 5)
    assert torch.equal(x, before)


def test_n_bits_out_of_range_is_refused(dequantize: UniformDequantizer) -> None:
    with pytest.raises(ValueError, match="n_bits = 0 is out of range"):
        dequantize(torch.zeros(1, 3, 8, 8), 0)


def test_it_has_no_parameters(dequantize: UniformDequantizer) -> None:
    assert list(dequantize.parameters()) == []
    assert isinstance(dequantize, flowkit.Dequantizer)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float64])
def test_contract_check_on_a_four_pixel_image(dtype: torch.dtype) -> None:
    # log q = 0 is checked by importance sampling as a normalised density on the unit cube.
    dequantize = flowkit.build("dequantizer", "uniform", in_shape=(1, 2, 2))
    x = torch.tensor([[0, 255], [17, 128]]).view(1, 1, 2, 2).repeat(3, 1, 1, 1).to(dtype)
    check_dequantizer(dequantize, x, 8)
