"""transform:actnorm: data-dependent initialisation, log-det, and checkpoint behaviour."""

from __future__ import annotations

import pytest
import torch

import flowkit
from flowkit.plugins import make_plugins
from flowkit.testing import check_gradients, check_transform

MODULES = ["flowkit_plugins.transforms.actnorm"]


@pytest.fixture(scope="module")
def plugins():
    return make_plugins(entry_points=False, extra=MODULES)


def make(plugins, shape=(3, 4, 4), **kwargs):
    return flowkit.build("transform", "actnorm", plugins=plugins, in_shape=shape, **kwargs).double()


def data(batch=8, shape=(3, 4, 4)):
    return 3.0 * torch.randn(batch, *shape, dtype=torch.float64) + 1.5


def test_actnorm_initialize_gives_zero_mean_unit_variance(plugins):
    t = make(plugins)
    x = data()
    t.initialize(x)
    z, _ = t(x)
    per_channel = z.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    # Glow's epsilon: the scale is 1 / (std + 1e-6), so the std comes out 1e-6 / std (~3.7e-7 here) short of 1.
    torch.testing.assert_close(per_channel.std(1, unbiased=False), torch.ones(3, dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_actnorm_scale_param_sets_output_std(plugins):
    t = make(plugins, scale=0.5)
    x = data()
    t.initialize(x)
    z, _ = t(x)
    std = z.transpose(0, 1).reshape(3, -1).std(1, unbiased=False)
    torch.testing.assert_close(std, torch.full((3,), 0.5, dtype=torch.float64), atol=1e-6, rtol=0)


def test_actnorm_round_trip_and_brute_force_logdet(plugins):
    t = make(plugins)
    t.initialize(data())
    check_transform(t, data(batch=2))


def test_actnorm_logabsdet_is_pixels_times_sum_of_log_scales(plugins):
    t = make(plugins)
    t.initialize(data())
    _, logabsdet = t(data(batch=2))
    expected = 16 * t.log_scale.sum()
    torch.testing.assert_close(logabsdet, expected.expand(2), atol=1e-12, rtol=0)


def test_actnorm_initializes_only_once(plugins):
    t = make(plugins)
    t.initialize(data())
    before = {k: v.clone() for k, v in t.state_dict().items()}
    t.initialize(data() * 10)
    for key, value in t.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)


def test_actnorm_restored_from_state_dict_does_not_reinitialize(plugins):
    t = make(plugins)
    t.initialize(data())
    assert "initialized" in t.state_dict()
    fresh = make(plugins)
    assert not bool(fresh.initialized)
    fresh.load_state_dict(t.state_dict())
    fresh.initialize(data() * 10 - 4)
    torch.testing.assert_close(fresh.bias, t.bias, atol=0, rtol=0)
    torch.testing.assert_close(fresh.log_scale, t.log_scale, atol=0, rtol=0)


def test_actnorm_gradients_are_finite(plugins):
    t = make(plugins)
    x = data(batch=2)
    t.initialize(data())
    z, logabsdet = t(x)
    check_gradients(t, -(logabsdet - 0.5 * z.pow(2).sum((1, 2, 3))).mean())


def test_actnorm_checks_context(plugins):
    x = data(batch=2)
    with pytest.raises(flowkit.ShapeError, match="without context"):
        make(plugins, context_shape=(2, 4, 4))(x)
    with pytest.raises(flowkit.ShapeError, match="built without context"):
        make(plugins)(x, torch.zeros(2, 2, 4, 4, dtype=torch.float64))


def test_actnorm_rejects_wrong_channel_count(plugins):
    with pytest.raises(flowkit.ShapeError, match=r"\(B, 3, H, W\)"):
        make(plugins)(torch.zeros(2, 4, 4, 4, dtype=torch.float64))


def test_actnorm_scale_must_be_positive(plugins):
    with pytest.raises(flowkit.RecipeError, match="scale"):
        make(plugins, scale=0.0)
