"""The learned Gaussian prior (Glow's learntop): density, sampling, temperature, parameters."""

from __future__ import annotations

import pytest
import torch

import flowkit
from flowkit.testing import check_prior


def test_starts_as_the_standard_normal():
    prior = flowkit.build("prior", "learned_gaussian", in_shape=(3, 4, 4))
    z = torch.randn(5, 3, 4, 4)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(prior.log_prob(z), expected, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("per, param_shape", [("channel", (3, 1, 1)), ("element", (3, 4, 4))])
def test_log_prob_matches_torch_normal_with_learned_mean_and_scale(per, param_shape):
    prior = flowkit.build("prior", "learned_gaussian", in_shape=(3, 4, 4), per=per).double()
    assert prior.loc.shape == param_shape and prior.log_scale.shape == param_shape
    with torch.no_grad():
        prior.loc.normal_()
        prior.log_scale.normal_(std=0.5)
    z = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    normal = torch.distributions.Normal(prior.loc.expand(3, 4, 4), prior.log_scale.exp().expand(3, 4, 4))
    torch.testing.assert_close(prior.log_prob(z), normal.log_prob(z).flatten(1).sum(1), atol=1e-10, rtol=1e-10)


def test_temperature_scales_the_standard_deviation_and_zero_gives_the_mean():
    prior = flowkit.build("prior", "learned_gaussian", in_shape=(2, 8, 8))
    with torch.no_grad():
        prior.loc.copy_(torch.tensor([1.0, -2.0]).view(2, 1, 1))
        prior.log_scale.copy_(torch.tensor([0.0, 0.5]).view(2, 1, 1))
    torch.testing.assert_close(prior.sample(3, temperature=0.0), prior.mean(3), atol=0, rtol=0)
    assert prior.mean(3)[:, 1].eq(-2.0).all()
    torch.manual_seed(0)
    samples = prior.sample(4000, temperature=0.5)
    std = samples.transpose(0, 1).reshape(2, -1).std(1)
    mean = samples.transpose(0, 1).reshape(2, -1).mean(1)
    torch.testing.assert_close(std, 0.5 * torch.tensor([0.0, 0.5]).exp(), atol=0.01, rtol=0.01)
    torch.testing.assert_close(mean, torch.tensor([1.0, -2.0]), atol=0.01, rtol=0)


def test_both_parameters_are_trained():
    prior = flowkit.build("prior", "learned_gaussian", in_shape=(2, 3, 3))
    prior.log_prob(torch.randn(4, 2, 3, 3) + 1).sum().backward()
    assert prior.loc.grad is not None and prior.loc.grad.abs().sum() > 0
    assert prior.log_scale.grad is not None and prior.log_scale.grad.abs().sum() > 0


def test_is_unconditional():
    prior = flowkit.build("prior", "learned_gaussian", in_shape=(2, 3, 3), context_shape=(1, 3, 3))
    assert prior.context_shape is None
    with pytest.raises(flowkit.ShapeError, match="unconditional"):
        prior.log_prob(torch.zeros(1, 2, 3, 3), torch.zeros(1, 1, 3, 3))
    with pytest.raises(flowkit.ShapeError, match="unconditional"):
        prior.sample(1, torch.zeros(1, 1, 3, 3))


def test_wrong_latent_shape_is_refused():
    prior = flowkit.build("prior", "learned_gaussian", in_shape=(2, 3, 3), per="element")
    with pytest.raises(flowkit.ShapeError, match=r"\(B, 2, 3, 3\)"):
        prior.log_prob(torch.zeros(1, 2, 4, 4))
    with pytest.raises(flowkit.ShapeError, match=r"\(B, 2, \.\.\.\)"):
        flowkit.build("prior", "learned_gaussian", in_shape=(2, 3, 3)).log_prob(torch.zeros(1, 3, 3, 3))


def test_per_channel_takes_any_spatial_size_as_a_crop_of_the_same_density():
    """Wavelet Flow's top levels train on crops: per channel the density factorises over
    positions, so a crop's log-density is the sum over its own positions."""
    prior = flowkit.build("prior", "learned_gaussian", in_shape=(2, 4, 4))
    with torch.no_grad():
        prior.loc.normal_()
        prior.log_scale.normal_()
    z = torch.randn(3, 2, 4, 4)
    crop = z[..., 1:3, :2]
    by_hand = torch.distributions.Normal(prior.loc, prior.log_scale.exp()).log_prob(crop).flatten(1).sum(1)
    torch.testing.assert_close(prior.log_prob(crop), by_hand)


def test_per_must_be_channel_or_element():
    with pytest.raises(flowkit.RecipeError, match="per"):
        flowkit.build("prior", "learned_gaussian", in_shape=(2, 3, 3), per="pixel")


@pytest.mark.parametrize("per", ["channel", "element"])
def test_contract_check_per_channel_and_per_element(per):
    prior = flowkit.build("prior", "learned_gaussian", in_shape=(2, 3, 3), per=per).double()
    with torch.no_grad():
        prior.loc.normal_()
        prior.log_scale.normal_(std=0.5)
    check_prior(prior, diagonal_gaussian=True)
