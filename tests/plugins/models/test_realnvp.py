"""The realnvp model: what it stacks (masks, parities, widths, factor-outs), its density against a
brute-force Jacobian, round trips, sampling, and what its recipe records."""

from __future__ import annotations

import math

import pytest
import torch

import flowkit
from flowkit.models import FactorOut, Logit, SqueezeLayer
from flowkit.testing import check_gradients, jacobian_logabsdet, randomize_

TINY = {"hidden": 2, "checkerboard_step": {"coupling": {"net": {"blocks": 1}}},
        "channel_step": {"coupling": {"net": {"blocks": 1}}}}


def _model(in_shape=(1, 8, 8), **params):
    return flowkit.build("model", "realnvp", in_shape=in_shape, **{**TINY, **params})


def _ready(model, in_shape, dtype=torch.float64, scale=0.05):
    model = model.to(dtype)
    model.initialize(torch.rand(32, *in_shape, dtype=dtype))
    return randomize_(model, scale)


def _couplings(model):
    return [m for m in model.modules() if type(m).__name__ == "AffineCoupling"]


def test_it_stacks_the_papers_scales():
    """Per scale 3 checkerboard (alternating parity), squeeze, 3 channel (alternating), factor out
    half; the last scale 4 checkerboard; widths doubling per scale and in the channel steps."""
    model = _model((3, 16, 16), scales=3, hidden=4)
    couplings = _couplings(model)
    assert [(c.mask_kind, c.parity) for c in couplings] == (
        [("checkerboard", p) for p in (0, 1, 0)] + [("channel", p) for p in (0, 1, 0)]) * 2 + [
        ("checkerboard", p) for p in (0, 1, 0, 1)]
    assert [c.in_shape for c in couplings] == ([(3, 16, 16)] * 3 + [(12, 8, 8)] * 3 + [(6, 8, 8)] * 3
                                               + [(24, 4, 4)] * 3 + [(12, 4, 4)] * 4)
    assert [c.net.conv_in.weight_v.shape[0] for c in couplings] == [4] * 3 + [8] * 3 + [8] * 3 + [16] * 3 + [16] * 4
    # The checkerboard nets see the mask (2C + 1 input channels) and the input times 2.
    assert all(c.mask_channel == (c.mask_kind == "checkerboard") for c in couplings)
    assert [c.net.conv_in.weight_v.shape[1] for c in couplings[:6]] == [7] * 3 + [12] * 3
    assert {c.net.in_gain for c in couplings if c.mask_kind == "checkerboard"} == {2.0}
    assert [c.scale_factor.item() for c in couplings[:6]] == [0.0] * 3 + [1.0] * 3
    assert model.part_dims() == {"level1": 384, "level2": 192, "top": 192}
    squeezes = [(m.decomposition.order, m.unsqueeze) for m in model.modules() if isinstance(m, SqueezeLayer)]
    assert squeezes == [("glow", False), ("glow", True), ("realnvp", False)] * 2
    assert isinstance(model.flow.chains()[0].transforms[0], Logit) and model.flow.chains()[0].transforms[0].alpha == 0.05


def test_the_factored_out_half_is_the_odd_checkerboard_of_the_scale():
    """squeeze_2x2_ordered, then the second half of the channels: pixels (i, j) with i + j odd."""
    in_shape = (1, 4, 4)
    model = _ready(_model(in_shape), in_shape)
    chain = model.flow.chains()[0]
    assert isinstance(chain.transforms[-1], SqueezeLayer) and chain.transforms[-1].decomposition.order == "realnvp"
    y = torch.rand(2, *in_shape, dtype=torch.float64)
    image = y
    for transform in chain.transforms[:-1]:  # logit, the first scale's steps, squeeze, unsqueeze
        image = transform(image)[0]
    assert image.shape == (2, 1, 4, 4)
    (split,) = model.flow.splits()
    assert isinstance(split, FactorOut) and split.keep == 2 and split.out_shape == (2, 2, 2)
    latents, _ = model.encode(y)
    torch.testing.assert_close(latents[0][:, 0], image[:, 0, 0::2, 1::2], atol=0, rtol=0)
    torch.testing.assert_close(latents[0][:, 1], image[:, 0, 1::2, 0::2], atol=0, rtol=0)


@pytest.mark.parametrize("scales", [1, 2])
def test_log_prob_is_the_priors_plus_the_brute_force_log_det(scales):
    in_shape = (1, 4, 4)
    model = _ready(_model(in_shape, scales=scales), in_shape)
    y = torch.rand(2, *in_shape, dtype=torch.float64) * 0.9 + 0.05

    def flat_latents(v):
        return torch.cat([z.flatten(1) for z in model.encode(v)[0]], dim=1)

    z = flat_latents(y)
    log_normal = -0.5 * (z.square().sum(1) + z.shape[1] * math.log(2 * math.pi))
    brute = jacobian_logabsdet(flat_latents, y)
    torch.testing.assert_close(model.encode(y)[1], brute, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(model.log_prob(y), log_normal + brute, atol=1e-8, rtol=1e-8)
    assert list(model.log_prob_parts(y)) == (["level1", "top"] if scales == 2 else ["top"])


def test_encode_then_decode_returns_the_image():
    in_shape = (3, 8, 8)
    model = _ready(_model(in_shape), in_shape, dtype=torch.float32, scale=0.02)
    y = torch.rand(2, *in_shape)
    with torch.no_grad():
        latents, _ = model.encode(y)
        assert [tuple(z.shape[1:]) for z in latents] == [(6, 4, 4), (6, 4, 4)]
        assert (model.decode(latents) - y).abs().max() < 1e-4


def test_sampling_decodes_prior_draws_and_temperature_zero_is_the_mode():
    in_shape = (1, 8, 8)
    model = _ready(_model(in_shape), in_shape)
    torch.manual_seed(3)
    s = model.sample(5, temperature=0.7)
    torch.manual_seed(3)
    top = 0.7 * torch.randn(5, *model.flow.out_shape, dtype=torch.float64)
    out = 0.7 * torch.randn(5, *model.flow.splits()[0].out_shape, dtype=torch.float64)
    torch.testing.assert_close(s, model.decode([out, top]), atol=1e-10, rtol=0)
    zero = model.sample(2, temperature=0.0)
    latents, _ = model.encode(zero)
    assert all(z.abs().max() < 1e-8 for z in latents)


def test_the_latent_level_has_the_models_density():
    in_shape = (1, 8, 8)
    model = _ready(_model(in_shape), in_shape)
    (name,) = model.latent_levels()
    level = model.latent_level(name, None, 3)
    generated = level.generate(level.draw(1.0))
    torch.testing.assert_close(model.log_prob(generated.out), generated.log_prob - generated.logabsdet,
                               atol=1e-8, rtol=1e-10)
    with pytest.raises(flowkit.ShapeError, match="one latent level"):
        model.latent_level("level1", None, 3)


def test_every_parameter_gets_a_gradient():
    in_shape = (1, 8, 8)
    model = _ready(_model(in_shape), in_shape)
    check_gradients(model, -model.log_prob(torch.rand(4, *in_shape, dtype=torch.float64)).mean())


def test_the_recipe_records_the_derived_masks_parities_and_widths(plugins):
    ref = flowkit.ref("model", "realnvp", plugins=plugins, scales=2, hidden=8)
    derived = ref.to_toml()["derived"]
    assert derived == {
        "checkerboard_step.coupling.mask": "checkerboard",
        "checkerboard_step.coupling.parity": [0, 1, 0, 0, 1, 0, 1],
        "checkerboard_step.coupling.net.hidden": [8, 8, 8, 16, 16, 16, 16],
        "channel_step.coupling.mask": "channel",
        "channel_step.coupling.parity": [0, 1, 0],
        "channel_step.coupling.net.hidden": 16,
    }
    with pytest.raises(flowkit.RecipeError, match=r"checkerboard_step\.coupling\.parity = 1 cannot be set"):
        flowkit.ref("model", "realnvp", plugins=plugins, checkerboard_step={"coupling": {"parity": 1}})
    with pytest.raises(flowkit.RecipeError, match=r"channel_step\.coupling\.net\.hidden = 3 cannot be set"):
        flowkit.ref("model", "realnvp", plugins=plugins, channel_step={"coupling": {"net": {"hidden": 3}}})


def test_image_sides_must_survive_every_squeeze():
    with pytest.raises(flowkit.ShapeError, match="divisible by 4"):
        _model((1, 6, 6), scales=3)
    with pytest.raises(flowkit.ShapeError, match=r"realnvp expected images of shape \(B, 1, 8, 8\)"):
        _model().log_prob(torch.rand(2, 1, 4, 4))
