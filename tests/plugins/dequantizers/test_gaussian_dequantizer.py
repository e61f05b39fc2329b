"""``dequantizer:gaussian``: TarFlow's noise augmentation, y = (x + 1/2) / K + sigma eps."""

from __future__ import annotations

import pytest
import torch

import flowkit
from flowkit.plugins import make_plugins


@pytest.fixture(scope="module")
def plugins():
    return make_plugins()


def test_noise_is_centred_on_the_bin_with_the_given_std_and_log_q_is_zero(plugins) -> None:
    d = flowkit.build("dequantizer", "gaussian", plugins=plugins, std=0.02)
    assert d.figure == "noisy_nll" and d.noise_std == 0.02
    x = torch.tensor([0, 100, 255], dtype=torch.uint8).repeat(20000, 1)
    torch.manual_seed(0)
    y, log_q = d(x, 8)
    assert torch.equal(log_q, torch.zeros(20000))
    centre = (x[0].float() + 0.5) / 256
    torch.testing.assert_close(y.mean(0), centre, atol=5 * 0.02 / 20000**0.5, rtol=0)
    torch.testing.assert_close(y.std(0), torch.full((3,), 0.02), atol=5 * 0.02 / (2 * 20000) ** 0.5, rtol=0)
    assert (y < 0).any() and (y >= 1).any(), "the noise leaves [0, 1): what makes its figure no bound"


def test_the_std_is_checked_and_the_uniform_dequantizer_keeps_the_bits_per_dim_figure(plugins) -> None:
    with pytest.raises(flowkit.RecipeError, match="std"):
        flowkit.ref("dequantizer", "gaussian", plugins=plugins, std=0.0)
    uniform = flowkit.build("dequantizer", "uniform", plugins=plugins)
    assert uniform.figure == "bits_per_dim" and uniform.noise_std is None
