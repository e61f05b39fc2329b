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


def test_terms_are_independent_and_cover_every_dimension() -> None:
    model, y = tiny_model()
    assert isinstance(model, flowkit.IndependentTerms) and isinstance(model, flowkit.SuperResolution)
    parts = model.log_prob_parts(y)
    assert list(parts) == ["base", "level1"] and model.part_dims() == {"base": 4, "level1": 12}
    only = model.log_prob_terms(y, ["level1"])
    assert set(only) == {"level1"} and torch.equal(only["level1"], parts["level1"])
    assert set(model.parameter_groups()) == {"base", "level1"}
    # Each term's gradient reaches its own group only.
    only["level1"].sum().backward()
    assert all(p.grad is None for p in model.parameter_groups()["base"])
    assert any(p.grad is not None for p in model.parameter_groups()["level1"])
    with pytest.raises(ShapeError, match="no term 'level2'"):
        model.log_prob_terms(y, ["level2"])


def test_steps_are_copies_with_alternating_parity_and_the_width_of_their_level() -> None:
    model = flowkit.build("model", "wavelet_flow", in_shape=(1, 8, 8), levels=2, depth=[3, 2, 2], hidden=[4, 6, 8],
                          base_step=TINY["base_step"])
    for name, parities, width in (("base", [0, 1, 0], 4), ("level1", [0, 1], 6), ("level2", [0, 1], 8)):
        couplings = [step.transforms[-1] for step in model.flows[name].flow.transforms]
        assert [c.parity for c in couplings] == parities, name
        assert {c.net.conv_in.out_channels for c in couplings} == {width}, name


def test_a_width_set_on_the_net_is_refused_while_model_hidden_sets_it() -> None:
    with pytest.raises(flowkit.RecipeError, match=r"step\.coupling\.net\.hidden = 128 cannot be set.*model\.hidden"):
        flowkit.build("model", "wavelet_flow", in_shape=(1, 8, 8), levels=1,
                      step={"coupling": {"net": {"hidden": 128}}}, base_step=TINY["base_step"])
    # With model.hidden empty the nets keep their own width, and the override is honoured.
    model = flowkit.build("model", "wavelet_flow", in_shape=(1, 8, 8), levels=1, hidden=[],
                          step={"coupling": {"net": {"hidden": 12}}}, base_step=TINY["base_step"])
    assert model.flows["level1"].flow.transforms[0].transforms[-1].net.conv_in.out_channels == 12


def test_sampling_and_superresolution_invert_the_pyramid() -> None:
    model, y = tiny_model()
    model.eval()
    samples = model.sample(5, temperature=0.7)
    assert samples.shape == (5, 1, 4, 4)
    # From the finest level there is nothing to sample: super-resolution returns the image.
    torch.testing.assert_close(model.superres(model.reduce(y, 1), 1), y)
    low = model.reduce(y, 0)
    with pytest.raises(ShapeError, match="from-level 3"):
        model.superres(low, 3)


def test_crops_estimate_the_full_term_without_bias_in_scale() -> None:
    # 8x8 images: level 1's details are 4x4, cropped to 2x2 windows (a quarter of the dims),
    # each scaled by 4. Over many windows the estimate averages to about the full term (not
    # exactly: random windows cover the centre more often than the border, and the convolutions
    # see zero padding at a window's edge); without the scale it would be a quarter of it.
    model = flowkit.build("model", "wavelet_flow", in_shape=(1, 8, 8), levels=1, depth=[2], hidden=[4],
                          crops=[1, 2], base_step=TINY["base_step"]).double()
    y = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    model.initialize(y)
    model.eval()  # evaluation always uses the whole image
    full = model.log_prob_terms(y, ["level1"])["level1"]
    model.train()
    estimates = torch.stack([model.log_prob_terms(y, ["level1"])["level1"] for _ in range(200)])
    assert estimates.std(0).min() > 0  # the windows move
    torch.testing.assert_close(estimates.mean(0), full, rtol=0.35, atol=0.0)


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
