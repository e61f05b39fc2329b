"""Wavelet Flow: the level factorisation is an exact change of variables."""

from __future__ import annotations

import math

import pytest
import torch

import flowkit
from flowkit.errors import ShapeError
from flowkit.testing import jacobian_logabsdet, randomize_

TINY = {"levels": 1, "depth": [2], "hidden": [4], "cond_channels": 2, "cond_depth": 1,
        "base_step": {"use": "glow", "coupling": {"use": "affine", "mask": "checkerboard"}}}


def tiny_model(**changes):  # noqa: ANN201
    params = {**TINY, **changes}
    model = flowkit.build("model", "wavelet_flow", in_shape=(1, 4, 4), **params).double()
    y = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    model.initialize(y)
    randomize_(model, 0.2)
    # Priors back to N(0, I) so the brute-force density below needs no prior network.
    for name, p in model.named_parameters():
        if ".prior." in name:
            p.data.zero_()
    return model, y


def latents(model, y: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    lows, details = model.pyramid(y)
    zs = []
    for name, level in model.flows.items():
        v, low, _ = model._inputs(name, lows, details)
        zs.append(level.flow(v, level.context(low))[0].flatten(1))
    return torch.cat(zs, dim=1)


def test_log_prob_is_the_change_of_variables_of_the_whole_pyramid() -> None:
    model, y = tiny_model()
    z = latents(model, y)
    expected = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(1) + jacobian_logabsdet(lambda v: latents(model, v), y)
    torch.testing.assert_close(model.log_prob(y), expected, atol=1e-8, rtol=1e-8)


def test_parts_add_up_and_cover_every_dimension() -> None:
    model, y = tiny_model()
    parts = model.log_prob_parts(y)
    assert set(parts) == {"base", "level1"}
    torch.testing.assert_close(sum(parts.values()), model.log_prob(y))
    assert sum(model.part_dims().values()) == 16
    only = model.log_prob_parts(y, ["level1"])
    assert set(only) == {"level1"} and torch.equal(only["level1"], parts["level1"])
    assert set(model.parameter_groups()) == {"base", "level1"}


def test_sampling_and_superresolution_invert_the_pyramid() -> None:
    model, y = tiny_model()
    model.eval()
    samples = model.sample(5, temperature=0.7)
    assert samples.shape == (5, 1, 4, 4) and (samples >= 0).all() and (samples < 1).all()
    # From the finest level there is nothing to sample: super-resolution returns the image.
    torch.testing.assert_close(model.superres(model.reduce(y, 1), 1), y)
    # At temperature 0 the details are the flows' inverse of the prior mean: deterministic.
    low = model.reduce(y, 0)
    torch.testing.assert_close(model.superres(low, 0, temperature=0.0), model.superres(low, 0, temperature=0.0))
    with pytest.raises(ShapeError, match="from-level 3"):
        model.superres(low, 3)


def test_crops_estimate_the_full_term_without_bias_in_scale() -> None:
    model, y = tiny_model(levels=1, crops=[1, 2])
    model.train()
    term = model.log_prob_parts(y, ["level1"])["level1"]
    assert torch.isfinite(term).all()
    model.eval()  # evaluation always uses the whole image
    assert torch.isfinite(model.log_prob(y)).all()


def test_levels_that_do_not_divide_the_image_are_refused() -> None:
    with pytest.raises(ShapeError, match=r"model.levels = 3 .* 28x28; allowed for this size: levels <= 2"):
        flowkit.build("model", "wavelet_flow", in_shape=(1, 28, 28), levels=3)


def test_per_level_lists_must_match_the_levels() -> None:
    with pytest.raises(flowkit.RecipeError, match="depth has 2 entries"):
        flowkit.build("model", "wavelet_flow", in_shape=(1, 8, 8), levels=2, depth=[2, 2])


def test_gradients_reach_every_level() -> None:
    model, y = tiny_model()
    loss = -model.log_prob(y).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
