"""The multiscale model: log-density assembly, part dimensions, sampling, initialisation."""

from __future__ import annotations

import math

import pytest
import torch

import flowkit
from flowkit.testing import check_gradients, jacobian_logabsdet, randomize_

TINY_NET = {"use": "glow_cnn", "hidden": 8}
GLOW = {"use": "glow", "coupling": {"use": "affine", "net": TINY_NET}}
MACOW = {"use": "macow", "units": 1, "glow": GLOW}


def _model(in_shape=(1, 8, 8), **params):
    table = {"levels": 2, "depth": 2, "step": GLOW, **params}
    return flowkit.build("model", "multiscale", in_shape=in_shape, **table)


def _ready(model, in_shape, *, scale=0.05, dtype=torch.float32, seed=0):
    """Actnorm initialised on data, then every parameter perturbed so no part is an identity."""
    torch.manual_seed(seed)
    model = model.to(dtype)
    model.initialize(torch.rand(32, *in_shape, dtype=dtype))
    randomize_(model, scale)
    return model


CONFIGS = {
    "glow": ((1, 8, 8), {}),
    "glow_three_levels": ((3, 16, 16), {"levels": 3, "depth": 1}),
    "macow_fine": ((2, 8, 8), {"step": MACOW, "bottom_step": MACOW, "splits": 2, "bottom_depth": 1, "depth": 1}),
    "one_level": ((1, 4, 4), {"levels": 1}),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_parts_are_named_by_level_and_their_dims_add_up_to_d(name):
    in_shape, params = CONFIGS[name]
    model = _ready(_model(in_shape, **params), in_shape)
    y = torch.rand(3, *in_shape)
    parts = model.log_prob_parts(y)
    dims = model.part_dims()
    assert list(parts) == list(dims)
    assert list(parts)[-1] == "top"
    assert sum(dims.values()) == math.prod(in_shape)
    assert all(d > 0 for d in dims.values())
    # What the terms are worth is checked against independent references in
    # test_multiscale_reference.py (the generative pass, a brute-force log-det).


def test_part_dims_are_the_factored_out_dimensions_of_glow_on_cifar_shapes():
    model = _model((3, 32, 32), levels=3, depth=1)
    assert model.part_dims() == {"level1": 6 * 16 * 16, "level2": 12 * 8 * 8, "top": 48 * 4 * 4}
    fine = _model((3, 32, 32), levels=3, depth=1, splits=2)
    assert fine.part_dims() == {"level1": 2 * 3 * 16 * 16, "level2": 2 * 6 * 8 * 8, "top": 48 * 4 * 4}


def test_log_prob_equals_the_change_of_variables_by_brute_force():
    """With N(0, I) priors everywhere, log p(y) = log N(f(y)) + log|det J_f| exactly."""
    in_shape = (1, 4, 4)
    model = _model(in_shape, depth=1, split_prior={"use": "gaussian"}, top_prior={"use": "gaussian"})
    model = _ready(model, in_shape, scale=0.1, dtype=torch.float64)
    y = torch.rand(2, *in_shape, dtype=torch.float64)

    def flat_latents(v):
        latents, _ = model.encode(v)
        return torch.cat([z.flatten(1) for z in latents], dim=1)

    z = flat_latents(y)
    log_normal = -0.5 * (z.square().sum(1) + z.shape[1] * math.log(2 * math.pi))
    expected = log_normal + jacobian_logabsdet(flat_latents, y)
    torch.testing.assert_close(model.log_prob(y), expected, atol=1e-8, rtol=1e-8)
    _, logabsdet = model.encode(y)
    torch.testing.assert_close(logabsdet, expected - log_normal, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("step", [GLOW, MACOW])
def test_encode_then_decode_returns_the_image_in_float32(step):
    in_shape = (3, 16, 16)
    model = _ready(_model(in_shape, step=step, depth=1, levels=3), in_shape, scale=0.02)
    y = torch.rand(2, *in_shape)
    with torch.no_grad():
        latents, _ = model.encode(y)
        assert (model.decode(latents) - y).abs().max() < 1e-4


def test_sampling_at_temperature_zero_returns_the_prior_means_through_the_inverse():
    in_shape = (1, 8, 8)
    model = _ready(_model(in_shape), in_shape, scale=0.02, dtype=torch.float64)
    with torch.no_grad():  # make every prior mean non-zero, so the check is not trivial
        model.top_prior.loc.copy_(0.3 * torch.randn_like(model.top_prior.loc))
    y0 = model.sample(2, temperature=0.0)
    # Equal up to float64 rounding: a convolution may round the rows of a batch differently.
    torch.testing.assert_close(y0[0], y0[1], atol=1e-12, rtol=0)
    assert ((y0 > 0) & (y0 < 1)).all()  # nothing clamped: the next check is exact
    seen = []

    def recording(prior):
        original = prior.log_prob

        def log_prob(z, context=None):
            seen.append((prior, z, context))
            return original(z, context)

        return log_prob

    for split in model.flow.splits():
        split.prior.log_prob = recording(split.prior)
    latents, _ = model.encode(y0)
    model.log_prob(y0)
    assert len(seen) == len(latents) - 1 == 1
    for prior, z, context in seen:
        mean = prior.mean(len(z), context)
        assert mean.abs().max() > 1e-3
        torch.testing.assert_close(z, mean, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(latents[-1], model.top_prior.mean(2), atol=1e-8, rtol=1e-8)


def test_temperature_sets_the_spread_of_the_samples():
    in_shape = (1, 8, 8)
    model = _ready(_model(in_shape), in_shape)
    torch.manual_seed(0)
    hot = model.sample(16, temperature=1.0)
    cold = model.sample(16, temperature=0.3)
    assert hot.shape == (16, *in_shape)
    assert hot.std(0).mean() > cold.std(0).mean()


def test_initialize_runs_actnorm_initialisation_through_the_whole_stack():
    in_shape = (2, 8, 8)
    model = _model(in_shape, step=MACOW, bottom_step=MACOW, bottom_depth=1, splits=2, depth=1)
    actnorms = [m for m in model.modules() if type(m).__name__ == "ActNorm"]
    assert actnorms and not any(bool(a.initialized) for a in actnorms)
    y = torch.rand(32, *in_shape) * 0.3 + 0.6
    model.initialize(y)
    assert all(bool(a.initialized) for a in actnorms)
    bottom = model.flow.chains()[0].transforms[1]  # after the centring
    first = bottom.transforms[0].transforms[0]  # the first actnorm sees y - 1/2
    z, _ = first(y - 0.5)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(2), atol=1e-3, rtol=0)


def test_every_parameter_gets_a_gradient():
    in_shape = (1, 8, 8)
    model = _ready(_model(in_shape), in_shape)
    check_gradients(model, -model.log_prob(torch.rand(4, *in_shape)).mean())


def test_another_decomposition_can_replace_the_squeeze():
    in_shape = (1, 8, 8)
    model = _ready(_model(in_shape, squeeze={"use": "haar"}), in_shape)
    y = torch.rand(2, *in_shape)
    with torch.no_grad():
        latents, _ = model.encode(y)
        assert (model.decode(latents) - y).abs().max() < 1e-4
    assert torch.isfinite(model.log_prob(y)).all()


def test_image_size_must_survive_every_squeeze():
    with pytest.raises(flowkit.ShapeError, match="divisible by 8"):
        _model((1, 28, 28), levels=3)


def test_splits_must_divide_half_the_channels():
    with pytest.raises(flowkit.ShapeError, match="splits"):
        _model((1, 8, 8), splits=3)


def test_wrong_input_shape_is_refused():
    model = _model((1, 8, 8))
    with pytest.raises(flowkit.ShapeError, match=r"\(B, 1, 8, 8\)"):
        model.log_prob(torch.rand(2, 1, 16, 16))


def test_an_overflowing_inverse_is_returned_as_is_for_the_run_engine_to_count():
    # Models do not clamp or count: `flowkit.runs.sampling.saturate` does, for every model.
    in_shape = (1, 8, 8)
    model = _ready(_model(in_shape), in_shape)
    with torch.no_grad():
        model.top_prior.log_scale.fill_(100.0)  # exp(100) overflows float32: the inverse gets inf
    y = model.sample(3, temperature=1.0)
    assert not torch.isfinite(y).flatten(1).all(1).any()
    assert torch.isfinite(model.sample(2, temperature=0.0)).all()
