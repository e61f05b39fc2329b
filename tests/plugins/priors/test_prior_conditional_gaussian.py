"""The conditional Gaussian prior: N(0, I) at init, the density against torch, sampling, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import flowkit
from flowkit.testing import check_gradients, check_prior, randomize_
from flowkit_plugins.priors.conditional_gaussian import ConditionalGaussian

SHAPE = (3, 4, 4)
# (context shape, hidden): image and vector contexts, with and without a hidden layer.
CASES = [((2, 4, 4), 0), ((2, 4, 4), 8), ((5,), 0), ((5,), 16)]
IDS = ["image", "image-hidden", "vector", "vector-hidden"]


def _build(context_shape: tuple[int, ...], hidden: int) -> ConditionalGaussian:
    return flowkit.build("prior", "conditional_gaussian", in_shape=SHAPE, context_shape=context_shape,
                         hidden=hidden).double()


def _inputs(context_shape: tuple[int, ...], batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, *SHAPE, generator=generator, dtype=torch.float64)
    context = torch.randn(batch, *context_shape, generator=generator, dtype=torch.float64)
    return z, context


@pytest.mark.parametrize(("context_shape", "hidden"), CASES, ids=IDS)
def test_at_init_it_is_the_standard_gaussian(context_shape: tuple[int, ...], hidden: int) -> None:
    prior = _build(context_shape, hidden)
    z, context = _inputs(context_shape)
    expected = flowkit.build("prior", "gaussian", in_shape=SHAPE).double().log_prob(z)
    torch.testing.assert_close(prior.log_prob(z, context), expected, atol=1e-12, rtol=0)
    assert torch.equal(prior.mean(3, context), torch.zeros(3, *SHAPE, dtype=torch.float64))


def _by_hand(prior: ConditionalGaussian, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, log_scale) from the prior's weights and the architecture its docstring states:
    3x3 convolutions (padding 1) for an image context, linear layers for a vector, a ReLU after
    the hidden layer; the first C outputs are the mean (vector: the first D, then reshaped)."""
    layers = list(prior.net) if isinstance(prior.net, torch.nn.Sequential) else [prior.net]
    weights = [m for m in layers if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    h = context
    for index, layer in enumerate(weights):
        if context.dim() == 4:
            h = F.conv2d(h, layer.weight, layer.bias, padding=1)
        else:
            h = F.linear(h, layer.weight, layer.bias)
        if index < len(weights) - 1:
            h = F.relu(h)
    if context.dim() == 4:
        return h[:, : SHAPE[0]], h[:, SHAPE[0] :]
    d = math.prod(SHAPE)
    return h[:, :d].reshape(-1, *SHAPE), h[:, d:].reshape(-1, *SHAPE)


@pytest.mark.parametrize(("context_shape", "hidden"), CASES, ids=IDS)
def test_log_prob_matches_torch_normal_with_the_mean_and_scale_computed_by_hand(
    context_shape: tuple[int, ...], hidden: int
) -> None:
    prior = randomize_(_build(context_shape, hidden), scale=0.3, generator=torch.Generator().manual_seed(1))
    z, context = _inputs(context_shape)
    mean, log_scale = _by_hand(prior, context)
    assert log_scale.abs().max() > 0.05, "the test needs a non-trivial scale"
    reference = torch.distributions.Normal(mean, log_scale.exp()).log_prob(z).flatten(1).sum(1)
    logp = prior.log_prob(z, context)
    assert logp.shape == (3,) and logp.dtype == torch.float64
    torch.testing.assert_close(logp, reference, atol=1e-10, rtol=1e-10)


def test_image_context_goes_through_a_3x3_convolution() -> None:
    prior = randomize_(_build((2, 4, 4), 0), scale=0.3, generator=torch.Generator().manual_seed(2))
    _, context = _inputs((2, 4, 4))
    out = F.conv2d(context, prior.net.weight, prior.net.bias, padding=1)
    mean, log_scale = prior.parameters_of(context)
    torch.testing.assert_close(mean, out[:, :3], atol=1e-12, rtol=0)
    torch.testing.assert_close(log_scale, out[:, 3:], atol=1e-12, rtol=0)


@pytest.mark.parametrize(("context_shape", "hidden"), CASES, ids=IDS)
def test_samples_have_the_hand_computed_mean_and_temperature_times_the_scale(
    context_shape: tuple[int, ...], hidden: int
) -> None:
    prior = randomize_(_build(context_shape, hidden), scale=0.3, generator=torch.Generator().manual_seed(3))
    _, context = _inputs(context_shape)
    mean, log_scale = _by_hand(prior, context)
    torch.testing.assert_close(prior.sample(3, context, temperature=0.0), mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(prior.mean(3, context), mean, atol=1e-12, rtol=0)
    # 4000 draws for the first context: per element, (s - mean) / (0.7 sigma) has mean 0 and
    # variance 1, within 6 standard errors (1/sqrt(n) and sqrt(2/n)).
    n = 4000
    repeated = context[:1].expand(n, *context.shape[1:])
    with torch.no_grad():
        u = (prior.sample(n, repeated, temperature=0.7) - mean[:1]) / (0.7 * log_scale[:1].exp())
    assert u.shape == (n, *SHAPE)
    assert u.mean(0).abs().max() < 6 / math.sqrt(n)
    assert (u.square().mean(0) - 1).abs().max() < 6 * math.sqrt(2 / n)


@pytest.mark.parametrize(("context_shape", "hidden"), CASES, ids=IDS)
def test_every_parameter_gets_a_finite_gradient(context_shape: tuple[int, ...], hidden: int) -> None:
    prior = randomize_(_build(context_shape, hidden), scale=0.3, generator=torch.Generator().manual_seed(5))
    z, context = _inputs(context_shape)
    check_gradients(prior, -prior.log_prob(z, context).mean())
    assert all(p.grad.abs().sum() > 0 for p in prior.parameters())


def test_the_context_changes_the_density() -> None:
    prior = randomize_(_build((2, 4, 4), 0), scale=0.3, generator=torch.Generator().manual_seed(6))
    z, context = _inputs((2, 4, 4))
    assert not torch.allclose(prior.log_prob(z, context), prior.log_prob(z, context + 1.0))


def test_log_prob_is_float32_for_bfloat16_latents() -> None:
    prior = flowkit.build("prior", "conditional_gaussian", in_shape=SHAPE, context_shape=(2, 4, 4))
    z = torch.randn(2, *SHAPE).to(torch.bfloat16)
    logp = prior.log_prob(z, torch.randn(2, 2, 4, 4))
    assert logp.dtype == torch.float32
    constant = 24 * math.log(2 * math.pi)
    torch.testing.assert_close(logp, -0.5 * z.float().square().flatten(1).sum(1) - constant, atol=1e-4, rtol=0)


def test_image_context_accepts_another_spatial_size_of_the_latents() -> None:
    prior = _build((2, 4, 4), 0)
    z = torch.zeros(1, 3, 8, 6, dtype=torch.float64)
    logp = prior.log_prob(z, torch.zeros(1, 2, 8, 6, dtype=torch.float64))
    torch.testing.assert_close(logp, torch.tensor([-72 * math.log(2 * math.pi)], dtype=torch.float64),
                               atol=1e-10, rtol=0)


def test_built_without_context_is_refused() -> None:
    with pytest.raises(flowkit.ShapeError, match="needs a context"):
        flowkit.build("prior", "conditional_gaussian", in_shape=SHAPE)


@pytest.mark.parametrize("context_shape", [(2, 2, 4), (2, 4, 8), (2, 4), (1, 2, 4, 4)])
def test_context_shape_that_does_not_fit_is_refused(context_shape: tuple[int, ...]) -> None:
    with pytest.raises(flowkit.ShapeError, match=r"context shape|image context"):
        flowkit.build("prior", "conditional_gaussian", in_shape=SHAPE, context_shape=context_shape)


def test_negative_hidden_is_a_recipe_error() -> None:
    with pytest.raises(flowkit.RecipeError, match="hidden = -1 is negative"):
        flowkit.build("prior", "conditional_gaussian", in_shape=SHAPE, context_shape=(5,), hidden=-1)


def test_calls_without_a_fitting_context_are_refused() -> None:
    prior = _build((2, 4, 4), 0)
    z, context = _inputs((2, 4, 4))
    with pytest.raises(flowkit.ShapeError, match="called without context"):
        prior.log_prob(z)
    with pytest.raises(flowkit.ShapeError, match="called without context"):
        prior.sample(3)
    with pytest.raises(flowkit.ShapeError, match=r"context of shape \(B, 2, 4, 4\), got \(3, 1, 4, 4\)"):
        prior.log_prob(z, context[:, :1])
    with pytest.raises(flowkit.ShapeError, match=r"context of shape \(B, 2, 4, 4\), got \(3, 2, 2, 2\)"):
        prior.log_prob(z, context[:, :, :2, :2])
    with pytest.raises(flowkit.ShapeError, match="batch size 3 but 2 latents"):
        prior.sample(2, context)
    with pytest.raises(flowkit.ShapeError, match="batch size 3 but 2 latents"):
        prior.log_prob(z[:2], context)
    with pytest.raises(flowkit.ShapeError, match="batch size 3 but 4 latents"):
        prior.mean(4, context)
    with pytest.raises(flowkit.ShapeError, match=r"expected latents of shape \(B, 3, 4, 4\)"):
        prior.log_prob(z[:, :2], context)


def test_vector_context_requires_the_exact_latent_shape() -> None:
    prior = _build((5,), 0)
    with pytest.raises(flowkit.ShapeError, match=r"expected latents of shape \(B, 3, 4, 4\)"):
        prior.log_prob(torch.zeros(2, 3, 4, 2, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(flowkit.ShapeError, match=r"context of shape \(B, 5\), got \(2, 4\)"):
        prior.log_prob(torch.zeros(2, *SHAPE, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64))


@pytest.mark.parametrize(("context_shape", "hidden"), CASES, ids=IDS)
def test_contract_check_with_every_kind_of_context(context_shape: tuple[int, ...], hidden: int) -> None:
    # Its normaliser against the curvature of its own log_prob, its samples' spread, rows, gradients.
    prior = randomize_(_build(context_shape, hidden), scale=0.3, generator=torch.Generator().manual_seed(7))
    _, context = _inputs(context_shape)
    check_prior(prior, context, diagonal_gaussian=True)
