"""Class conditioning: one path for every model that takes a vector context (flowkit.models.conditional),
guidance through the wrappers the builder puts around nets and priors (flowkit.nn.guidance)."""

from __future__ import annotations

import math

import pytest
import torch

import flowkit
from flowkit.build import Builder
from flowkit.contracts.model import ClassConditional
from flowkit.models import ClassConditioned
from flowkit.nn.guidance import Guidance, GuidedNet, GuidedPrior
from flowkit.plugins import Plugins, make_plugins
from flowkit.testing import randomize_

K = 3
TINY_NET = {"use": "glow_cnn", "hidden": 8}
#: Every built-in model that takes a vector context, at a tiny size.
MODELS = {
    "multiscale": {"levels": 2, "depth": 2, "top_prior": {"use": "learned_gaussian", "ycond": True},
                   "step": {"use": "glow", "coupling": {"use": "affine", "net": TINY_NET}}},
    "wavelet_flow": {"levels": 1, "depth": [2], "hidden": [8], "cond_channels": 4, "cond_depth": 1,
                     "base_step": {"use": "glow", "coupling": {"use": "affine", "mask": "checkerboard"}}},
    "flowpp": {"layout": ["checkerboard", "squeeze", "channel"],
               "step": {"use": "glow", "coupling": {"use": "affine", "net": TINY_NET}}},
    "realnvp": {"scales": 2, "hidden": 4, "checkerboard_step": {"coupling": {"net": {"blocks": 1}}},
                "channel_step": {"coupling": {"net": {"blocks": 1}}}},
    # Guided sampling decodes token by token: every cached call of the causal nets is mixed.
    "tarflow": {"blocks": 2, "patchify": {"use": "patchify", "patch": 2},
                "step": {"net": {"width": 16, "depth": 1, "head_dim": 8}}},
    "jet": {"depth": 3, "patchify": {"use": "patchify", "patch": 2, "order": "space_to_depth"},
            "step": {"coupling": {"net": {"width": 16, "depth": 1, "heads": 2}}}},
}


@pytest.fixture(scope="module")
def plugins() -> Plugins:
    return make_plugins()


def conditioned(plugins: Plugins, name: str, shape=(1, 8, 8)) -> ClassConditioned:
    guidance = Guidance()
    ref = flowkit.ref("model", name, plugins=plugins, **MODELS[name])
    model = Builder(plugins.registries, guidance=guidance)(ref, in_shape=shape, context_shape=(K + 1,)).double()
    return ClassConditioned(model, K, guidance)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_with_a_vector_context_is_class_conditional(plugins: Plugins, name: str) -> None:
    cond = conditioned(plugins, name)
    assert isinstance(cond, ClassConditional)
    y = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    cond.model.initialize(y, cond.one_hot(torch.tensor([0, 1, 2, 3]), y))
    # Zero-initialised projections: at first the class changes nothing (RealNVP's nets take the class
    # broadcast beside the mask channel, as a spatial context, through their first convolution).
    per_class = cond.log_prob_per_class(y)
    if name != "realnvp":
        torch.testing.assert_close(per_class, per_class[:, :1].expand(-1, K), atol=1e-10, rtol=0)
    assert any(isinstance(m, GuidedNet) for m in cond.model.modules())
    assert any(isinstance(m, GuidedPrior) for m in cond.model.modules())
    randomize_(cond.model, 0.05, torch.Generator().manual_seed(0))
    per_class = cond.log_prob_per_class(y)
    assert (per_class.max(1).values - per_class.min(1).values > 1e-6).all(), f"{name}: the class does not reach it"
    torch.testing.assert_close(cond.log_prob(y, torch.tensor([2, 0, 1, 2])), per_class[torch.arange(4), [2, 0, 1, 2]])


@pytest.mark.parametrize("name", list(MODELS))
def test_guidance_zero_is_conditional_sampling_and_more_guidance_moves_the_samples(plugins: Plugins,
                                                                                   name: str) -> None:
    cond = conditioned(plugins, name)
    randomize_(cond.model, 0.05, torch.Generator().manual_seed(0))
    cond.model.eval()
    labels = torch.tensor([0, 1, 2, 1])
    torch.manual_seed(5)
    plain = cond.sample(4, 0.7, labels)
    torch.manual_seed(5)
    guided_0 = cond.sample(4, 0.7, labels, guidance=0.0)
    torch.manual_seed(5)
    guided_2 = cond.sample(4, 0.7, labels, guidance=2.0)
    torch.testing.assert_close(guided_0, plain, atol=0, rtol=0)
    assert not torch.allclose(guided_2, plain), f"{name}: guidance 2 changed nothing"
    assert torch.isfinite(guided_2).all()


def test_guidance_needs_classes_and_a_guided_build(plugins: Plugins) -> None:
    cond = conditioned(plugins, "multiscale")
    with pytest.raises(flowkit.ShapeError, match='away from "no class"'):
        cond.sample(2, 1.0, None, guidance=1.0)
    unwrapped = ClassConditioned(cond.model, K)
    with pytest.raises(flowkit.ShapeError, match="not built for guidance"):
        unwrapped.sample(2, 1.0, 0, guidance=1.0)
    with pytest.raises(flowkit.ShapeError, match="classes 0..2 or 3"):
        cond.one_hot(torch.tensor([4]), torch.zeros(()))


def test_a_model_that_takes_no_vector_context_is_refused_by_name(plugins: Plugins) -> None:
    ref = flowkit.ref("model", "vae_flow", plugins=plugins, latent_dim=2, encoder_hidden=[4], prior="gaussian",
                      decoder={"use": "multiscale", "levels": 1, "depth": 1})
    with pytest.raises(flowkit.ShapeError, match='model "vae_flow" .*takes no context'):
        Builder(plugins.registries, guidance=Guidance())(ref, in_shape=(1, 8, 8), context_shape=(K + 1,))


def test_known_class_conditional_density_its_marginal_and_the_bayes_classifier(plugins: Plugins) -> None:
    """A mixture of Gaussians, one component per class: a one-level multiscale flow whose step is the
    identity (no actnorm or channel mixing; an additive coupling with its zero last layer) and whose top
    prior is Glow's ycond learned Gaussian with each class's mean and scale set by hand. Then
    log p(y | c) is log N(squeeze(y - 1/2); mu_c, sigma_c), computed here independently."""
    ref = flowkit.ref("model", "multiscale", plugins=plugins, levels=1, depth=1,
                      step={"use": "glow", "actnorm": False, "invconv": "none",
                            "coupling": {"use": "additive", "net": TINY_NET}},
                      top_prior={"use": "learned_gaussian", "ycond": True, "per": "channel"})
    model = Builder(plugins.registries)(ref, in_shape=(1, 2, 2), context_shape=(K + 1,)).double()
    cond = ClassConditioned(model, K)
    prior = model.flow.prior
    mu = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [0.0, 0.5, 0.0, -0.5], [1.0, 1.0, 0.8, 1.2]], dtype=torch.float64)
    log_sigma = torch.tensor([[0.0] * 4, [-0.5] * 4, [0.3] * 4], dtype=torch.float64)
    with torch.no_grad():  # W c adds (mu_c, log sigma_c) per channel of the 4-channel squeezed latent
        prior.ycond.weight.zero_()
        prior.ycond.weight[:4, :K] = mu.T
        prior.ycond.weight[4:, :K] = log_sigma.T
    # Data from the mixture, with p(c) not uniform.
    p_c = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    n = 4000
    true_c = torch.multinomial(p_c, n, replacement=True, generator=gen)
    z = mu[true_c] + log_sigma[true_c].exp() * torch.randn(n, 4, generator=gen, dtype=torch.float64)
    # The flow's inverse (uncentre, unsqueeze; the identity coupling) of z, under any context.
    y = model.decode([z.view(n, 4, 1, 1)], cond.one_hot(true_c, z))
    per_class = cond.log_prob_per_class(y)
    normal = torch.distributions.Normal(mu[None], log_sigma.exp()[None])
    expected = normal.log_prob(z[:, None, :]).sum(-1)  # (n, K)
    torch.testing.assert_close(per_class, expected, atol=1e-9, rtol=1e-9)
    log_p_c = p_c.log()
    torch.testing.assert_close(cond.log_marginal(per_class, log_p_c), torch.logsumexp(expected + log_p_c, 1),
                               atol=1e-9, rtol=1e-9)
    # The Bayes classifier of the true model is the Bayes-optimal classifier: its accuracy on a
    # sample is the Bayes-optimal accuracy E[max_c p(c | y)] up to sampling error.
    accuracy = (cond.bayes_classify(per_class, log_p_c) == true_c).double().mean()
    optimal = torch.softmax(expected + log_p_c, 1).max(1).values.mean()
    stderr = math.sqrt(float(optimal * (1 - optimal)) / n)
    assert abs(float(accuracy - optimal)) < 4 * stderr, (float(accuracy), float(optimal))
