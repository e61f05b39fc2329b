"""The standard Gaussian prior: closed-form log-density, temperature, dtypes and errors."""

from __future__ import annotations

import math

import pytest
import torch

import flowkit
from flowkit_plugins.priors.gaussian import StandardGaussian


@pytest.fixture
def prior() -> StandardGaussian:
    return flowkit.build("prior", "gaussian", in_shape=(3, 4, 4))


def test_log_prob_at_zero_is_minus_half_d_log_2pi(prior: StandardGaussian) -> None:
    logp = prior.log_prob(torch.zeros(2, 3, 4, 4))
    assert logp.shape == (2,)
    expected = torch.full((2,), -48 / 2 * math.log(2 * math.pi))
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=0)


def test_log_prob_matches_the_closed_form_by_hand(prior: StandardGaussian) -> None:
    z = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    z[0, 0, 0, 0], z[0, 2, 3, 1] = 3.0, -4.0  # |z|^2 = 25
    z[1] = 1.0  # |z|^2 = 48
    logp = prior.log_prob(z)
    assert logp.dtype == torch.float64
    constant = 24 * math.log(2 * math.pi)
    torch.testing.assert_close(logp, torch.tensor([-12.5 - constant, -24.0 - constant], dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_log_prob_matches_torch_distributions(prior: StandardGaussian) -> None:
    z = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    reference = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(prior.log_prob(z), reference, atol=1e-5, rtol=1e-6)


def test_log_prob_of_half_precision_is_float32(prior: StandardGaussian) -> None:
    z = torch.randn(2, 3, 4, 4).to(torch.bfloat16)
    logp = prior.log_prob(z)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, prior.log_prob(z.float()), atol=1e-5, rtol=0)


def test_sample_scales_with_temperature(prior: StandardGaussian) -> None:
    torch.manual_seed(1)
    base = prior.sample(4000)
    torch.manual_seed(1)
    cooled = prior.sample(4000, temperature=0.5)
    assert base.shape == (4000, 3, 4, 4) and base.dtype == torch.float32
    torch.testing.assert_close(cooled, 0.5 * base, atol=1e-7, rtol=0)
    assert abs(base.std().item() - 1.0) < 0.01 and abs(base.mean().item()) < 0.01
    assert torch.equal(prior.sample(3, temperature=0.0), torch.zeros(3, 3, 4, 4))


def test_mean_is_zero(prior: StandardGaussian) -> None:
    assert torch.equal(prior.mean(2), torch.zeros(2, 3, 4, 4))


def test_dtype_moves_with_the_module(prior: StandardGaussian) -> None:
    prior.double()
    assert prior.sample(2).dtype == torch.float64
    assert prior.mean(2).dtype == torch.float64
    assert prior.state_dict() == {}


def test_other_spatial_sizes_are_accepted(prior: StandardGaussian) -> None:
    logp = prior.log_prob(torch.zeros(1, 3, 2, 6))
    torch.testing.assert_close(logp, torch.tensor([-18 * math.log(2 * math.pi)]), atol=1e-5, rtol=0)


def test_a_context_is_refused(prior: StandardGaussian) -> None:
    context = torch.zeros(2, 1, 4, 4)
    with pytest.raises(flowkit.ShapeError, match=r"unconditional but was given a context of shape \(2, 1, 4, 4\)"):
        prior.log_prob(torch.zeros(2, 3, 4, 4), context)
    with pytest.raises(flowkit.ShapeError):
        prior.sample(2, context)
    with pytest.raises(flowkit.ShapeError):
        prior.mean(2, context)


def test_built_with_a_context_shape_it_stays_unconditional() -> None:
    prior = flowkit.build("prior", "gaussian", in_shape=(3, 4, 4), context_shape=(2, 4, 4))
    assert prior.context_shape is None


@pytest.mark.parametrize("shape", [(2, 2, 4, 4), (2, 4, 4, 4), (2, 48), (3, 4, 4)])
def test_wrong_latent_shape_is_refused(prior: StandardGaussian, shape: tuple[int, ...]) -> None:
    with pytest.raises(flowkit.ShapeError, match=r"expected latents of shape \(B, 3, 4, 4\), got"):
        prior.log_prob(torch.zeros(shape))


def test_vector_latents_work() -> None:
    prior = flowkit.build("prior", "gaussian", in_shape=(5,))
    torch.testing.assert_close(prior.log_prob(torch.ones(3, 5)),
                               torch.full((3,), -2.5 - 2.5 * math.log(2 * math.pi)), atol=1e-5, rtol=0)
