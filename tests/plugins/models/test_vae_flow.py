"""The vae_flow model: its ELBO against hand computations, its importance weights, the split of
an image into global and local latents and back, and flowkit.testing's model contract."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import flowkit
from flowkit.contracts.model import DensityModel, LatentVariable
from flowkit.testing import check_model, jacobian_logabsdet, randomize_
from flowkit_plugins.dequantizers.uniform import UniformDequantizer
from flowkit_plugins.models._latent_prior import FlowPrior
from flowkit_plugins.models.multiscale import Multiscale
from flowkit_plugins.models.vae_flow import VAEFlow

SHAPE = (1, 8, 8)
DECODER = {"use": "multiscale", "levels": 2, "depth": 2,
           "step": {"use": "glow", "coupling": {"use": "affine", "net": {"use": "glow_cnn", "hidden": 8}}}}


def tiny(prior: str = "gaussian", latent_dim: int = 3, **params) -> VAEFlow:  # noqa: ANN003
    model = flowkit.build("model", "vae_flow", in_shape=SHAPE, latent_dim=latent_dim, encoder_hidden=[4],
                          encoder_out_channels=2, prior=prior, prior_hidden=8, decoder=DECODER, **params)
    return model.double()


def images(batch: int) -> torch.Tensor:
    x = torch.randint(0, 32, (batch, *SHAPE)).double()
    return (x + torch.rand_like(x)) / 32


def trained_like(model: VAEFlow) -> VAEFlow:
    """Data-dependent init, then every parameter perturbed: q(z | y) differs from p(z) and from
    image to image, and z changes the decoder (zero projections would hide both)."""
    model.initialize(images(16))
    randomize_(model, 0.1)
    return model.eval()


def test_the_model_is_a_latent_variable_model_whose_terms_are_the_decoders_and_the_kl() -> None:
    model = tiny()
    assert isinstance(model, LatentVariable) and isinstance(model.decoder, Multiscale)
    assert model.part_dims() == {"level1": 32, "top": 32, "kl": 0}
    assert list(model.log_prob_parts(images(2))) == ["level1", "top", "kl"]


def test_latent_dim_zero_is_the_decoder_alone() -> None:
    alone = flowkit.build("model", "vae_flow", in_shape=SHAPE, latent_dim=0, decoder=DECODER)
    assert isinstance(alone, Multiscale) and not isinstance(alone, LatentVariable)
    assert alone.context_shape is None


def test_kl_term_is_the_closed_form_kl_of_two_diagonal_gaussians() -> None:
    model = trained_like(tiny("gaussian"))
    y = images(4)
    mu, logvar = model.posterior(y)
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(1)
    assert float(expected.detach().min()) > 0.01  # a posterior away from the prior, or the check is empty
    torch.testing.assert_close(-model.log_prob_parts(y)["kl"], expected, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("prior", ["gaussian", "flow"])
def test_elbo_is_the_expected_decoder_log_likelihood_minus_the_kl(prior: str) -> None:
    """By hand: z ~ q(z | y) drawn here with torch.distributions, log p(y | z) from the decoder,
    and the KL from torch.distributions (Gaussian prior) or log q - log p at the draws (flow
    prior); the model's mean ELBO over as many of its own draws must agree within 6 standard errors."""
    model = trained_like(tiny(prior))
    draws = 400
    y = images(1).expand(draws, *SHAPE).contiguous()
    with torch.no_grad():
        mu, logvar = model.posterior(y)
        q = Normal(mu, (0.5 * logvar).exp())
        z = q.sample()
        log_p_y_given_z = torch.stack(list(model.decoder.log_prob_parts(y, z).values())).sum(0)
        if prior == "gaussian":
            kl = kl_divergence(q, Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(1)
        else:
            kl = q.log_prob(z).sum(1) - model.prior.log_prob(z)
        by_hand = log_p_y_given_z - kl
        elbo = model.log_prob(y)
    error = math.sqrt((by_hand.var() + elbo.var()) / draws)
    assert abs(float(by_hand.mean() - elbo.mean())) < 6 * error, (float(by_hand.mean()), float(elbo.mean()), error)


def test_flow_prior_is_a_normalised_density_with_an_exact_inverse() -> None:
    torch.manual_seed(0)
    prior = FlowPrior(4, steps=2, hidden=8).double()
    prior.initialize(torch.randn(64, 4, dtype=torch.float64) * 2 + 1)
    randomize_(prior, 0.3)
    z = torch.randn(3, 4, dtype=torch.float64)
    eps, logabsdet = prior(z)
    torch.testing.assert_close(prior.inverse(eps), z, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(logabsdet, jacobian_logabsdet(lambda v: prior(v)[0], z), atol=1e-10, rtol=1e-8)
    expected = Normal(0.0, 1.0).log_prob(eps).sum(1) + logabsdet
    torch.testing.assert_close(prior.log_prob(z), expected, atol=1e-10, rtol=1e-8)


def test_an_image_splits_into_global_and_local_latents_and_back() -> None:
    model = trained_like(tiny("flow"))
    y = images(3)
    for temperature in (0.0, 1.0):
        z = model.encode_global(y, temperature)
        local = model.encode_local(y, z)
        torch.testing.assert_close(model.decode(local, z), y, atol=1e-9, rtol=1e-9)
    mu, _ = model.posterior(y)
    torch.testing.assert_close(model.encode_global(y, 0.0), mu)


def test_changing_z_changes_the_decoder() -> None:
    model = trained_like(tiny())
    y = images(2)
    z = torch.randn(2, 3, dtype=torch.float64)
    a = model.decoder.log_prob_parts(y, z)["top"]
    b = model.decoder.log_prob_parts(y, z + 1.0)["top"]
    assert (a - b).abs().min() > 1e-6
    local = model.encode_local(y, z)
    assert (model.decode(local, z) - model.decode(local, z + 1.0)).abs().max() > 1e-6


def test_a_fresh_model_is_the_unconditional_decoder_and_q_is_the_prior() -> None:
    """Zero-initialised projections of z: a fresh model's decoder computes, for any z, what the
    same decoder built without z computes (weights shared, everything else perturbed), and the
    zero-initialised encoder head makes q(z | y) = N(0, I), a KL of 0."""
    model = tiny("gaussian").eval()
    alone = flowkit.build("model", "vae_flow", in_shape=SHAPE, latent_dim=0, decoder=DECODER).double().eval()
    randomize_(alone, 0.1)
    missing, unexpected = model.decoder.load_state_dict(alone.state_dict(), strict=False)
    assert not unexpected and missing and all(".vector." in key for key in missing)
    y = images(3)
    for z in (torch.zeros(3, 3, dtype=torch.float64), 5 * torch.randn(3, 3, dtype=torch.float64)):
        conditioned = model.decoder.log_prob_parts(y, z)
        for name, term in alone.log_prob_parts(y).items():
            torch.testing.assert_close(conditioned[name], term, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(model.log_prob_parts(y)["kl"], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("prior", ["gaussian", "flow"])
def test_vae_flow_honours_the_model_contract(prior: str) -> None:
    check_model(trained_like(tiny(prior)), images(4))


class _BiasedWeights(VAEFlow):
    """log_joint_sample off by one nat: no longer an importance weight whose mean is the ELBO."""

    def log_joint_sample(self, y: torch.Tensor) -> torch.Tensor:
        return super().log_joint_sample(y) + 1.0


def test_the_latent_variable_contract_check_can_fail() -> None:
    model = trained_like(tiny())
    model.__class__ = _BiasedWeights
    with pytest.raises(AssertionError, match="mean of log_joint_sample"):
        check_model(model, images(4))


def test_importance_weighted_bound_rises_with_k_towards_a_known_likelihood() -> None:
    """A toy with a known likelihood: the decoder ignores z (its projections of z are zero), so
    log p(y) is the decoder's exact log-density; q(z | y) = N(1, 1.5^2 I) against p(z) = N(0, I)
    (wider than the prior, so the weights p/q are bounded). Then the ELBO is log p(y) - KL
    exactly, and the k-sample bound rises with k towards log p(y)."""
    model = tiny("gaussian", latent_dim=2)
    model.initialize(images(16))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("encoder.head") and ".vector." not in name:
                p.add_(0.1 * torch.randn_like(p))
        model.encoder.head.bias.copy_(torch.tensor([1.0, 1.0, math.log(2.25), math.log(2.25)]))
    model.eval()
    y = images(1)
    with torch.no_grad():
        exact = float(torch.stack(list(model.decoder.log_prob_parts(y, torch.zeros(1, 2).double()).values())).sum())
        kl = 2 * 0.5 * (1.0 + 2.25 - math.log(2.25) - 1.0)
        torch.testing.assert_close(model.log_prob(y), torch.tensor([exact - kl], dtype=torch.float64))
        repeats = 200
        weights = model.log_joint_sample(y.expand(repeats * 64, *SHAPE).contiguous()).view(repeats, 64)
    bounds = {k: torch.logsumexp(weights[:, :k], dim=1) - math.log(k) for k in (1, 8, 64)}
    means = {k: float(v.mean()) for k, v in bounds.items()}
    errors = {k: float(v.std()) / math.sqrt(repeats) for k, v in bounds.items()}
    assert abs(means[1] - (exact - kl)) < 6 * errors[1]                # k = 1: the ELBO in expectation
    assert means[1] < means[8] < means[64] < exact + 6 * errors[64]    # tighter with k, never above log p(y)
    assert exact - means[64] < 0.25 * kl                               # and most of the KL gap is closed


class _ConstantLatentModel(DensityModel, LatentVariable):
    """log_prob 0 and importance weights 5: which one the objective uses is visible."""

    in_shape = (1, 2, 2)

    def log_prob_parts(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"total": torch.zeros(len(y), dtype=torch.float64)}

    def part_dims(self) -> dict[str, int]:
        return {"total": 4}

    def log_joint_sample(self, y: torch.Tensor) -> torch.Tensor:
        return torch.full((len(y),), 5.0, dtype=torch.float64)


def test_the_objectives_importance_weighted_estimate_uses_the_models_weights() -> None:
    from flowkit.runs.objective import Objective

    objective = Objective(_ConstantLatentModel(), UniformDequantizer(flowkit.NoParams()), n_bits=3, num_dims=4)
    x = torch.randint(0, 8, (2, 1, 2, 2))
    offset = 4 * 3 * math.log(2.0)
    torch.testing.assert_close(objective.iw_log_likelihood(x, 4), torch.full((2,), 5.0 - offset, dtype=torch.float64))


def test_a_decoder_that_takes_no_context_is_refused_with_the_key() -> None:
    # Declared: vae_flow itself takes no vector context (asked before anything is built).
    with pytest.raises(flowkit.ShapeError, match='model.decoder.use = "vae_flow" cannot be the decoder.*takes no '
                                                 "vector context"):
        flowkit.build("model", "vae_flow", in_shape=SHAPE, decoder={"use": "vae_flow"})
    # Takes a vector context (a class) but has no latents to map images to and back.
    checkerboard = {"use": "glow", "coupling": {"use": "affine", "mask": "checkerboard"}}
    with pytest.raises(flowkit.ShapeError, match='model.decoder.use = "wavelet_flow" cannot be the decoder'):
        flowkit.build("model", "vae_flow", in_shape=SHAPE,
                      decoder={"use": "wavelet_flow", "levels": 1, "base_step": checkerboard})


def test_bad_params_are_refused_naming_the_key() -> None:
    with pytest.raises(flowkit.RecipeError, match="latent_dim = -1"):
        flowkit.build("model", "vae_flow", in_shape=SHAPE, latent_dim=-1)
    with pytest.raises(flowkit.RecipeError, match="latent_dim = 1 leaves nothing to couple"):
        flowkit.build("model", "vae_flow", in_shape=SHAPE, latent_dim=1, prior="flow")
