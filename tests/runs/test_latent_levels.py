"""The LatentLevels capability of wavelet_flow and multiscale: from plain draws the levels give
back the model's own samples, and log p_base(z) − log|det ∂part/∂z| is the model's density."""

from __future__ import annotations

import pytest
import torch

import flowkit
from flowkit.contracts.model import LatentLevels
from flowkit.errors import ShapeError
from flowkit.testing import randomize_

CHECKERBOARD = {"use": "glow", "coupling": {"use": "affine", "mask": "checkerboard"}}
MODELS = {
    "wavelet_flow": {"levels": 2, "depth": [2], "hidden": [4], "cond_channels": 2, "base_step": CHECKERBOARD},
    "multiscale": {"levels": 2, "depth": 2, "bottom_depth": 1, "bottom_step": CHECKERBOARD},
}
SHAPE = (1, 8, 8)


def ready(name: str):  # noqa: ANN201 - the model
    torch.manual_seed(0)
    model = flowkit.build("model", name, in_shape=SHAPE, **MODELS[name]).double()
    model.initialize(torch.rand(16, *SHAPE, dtype=torch.float64))
    with torch.no_grad():
        randomize_(model, 0.05)  # zero-initialised priors and nets would make the checks trivial
    return model.eval()


def through_levels(model, n: int, temperature: float, given=None, levels=None):  # noqa: ANN001, ANN201
    """Images generated level by level from plain draws, and Σ (log p_base(z) − log|det|) per level."""
    log_densities = {}
    for name in model.latent_levels() if levels is None else levels:
        level = model.latent_level(name, given, n)
        with torch.no_grad():
            z = level.draw(temperature)
        assert tuple(z.shape) == (n, *level.shape)
        generated = level.generate(z)
        given = generated.out
        log_densities[name] = generated.log_prob - generated.logabsdet
    return given, log_densities


@pytest.mark.parametrize("name", list(MODELS))
def test_levels_reproduce_the_models_samples_and_density(name: str) -> None:
    model = ready(name)
    assert isinstance(model, LatentLevels)
    torch.manual_seed(5)
    expected = model.sample(3, 0.8)
    torch.manual_seed(5)
    y, log_densities = through_levels(model, 3, 0.8)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(sum(log_densities.values()), model.log_prob(y), atol=1e-9, rtol=1e-9)
    if name == "wavelet_flow":  # each level is its own term
        parts = model.log_prob_parts(y)
        for level, value in log_densities.items():
            torch.testing.assert_close(value, parts[level], atol=1e-9, rtol=1e-9)


def test_wavelet_flow_levels_continue_from_a_low_pass_image_as_superres_does() -> None:
    model = ready("wavelet_flow")
    low = model.reduce(torch.rand(2, *SHAPE, dtype=torch.float64), 1)
    torch.manual_seed(3)
    expected = model.superres(low, 1, 0.9)
    torch.manual_seed(3)
    y, _ = through_levels(model, 2, 0.9, given=low, levels=model.latent_levels()[2:])
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)


def test_levels_check_what_they_are_given() -> None:
    with pytest.raises(ShapeError, match=r"samples level1 given I_0 of shape \(2, 1, 2, 2\), got None"):
        ready("wavelet_flow").latent_level("level1", None, 2)
    with pytest.raises(ShapeError, match="one latent level, 'latent'"):
        ready("multiscale").latent_level("top", None, 2)
