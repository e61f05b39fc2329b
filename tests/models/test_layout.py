"""The layout walker (flowkit.models.layout): the one walk over steps, squeezes and splits.

Layouts here are built from registered parts at tiny sizes, in float64, initialised on data and
perturbed (`randomize_`), so no step is an identity and no split prior is context-free.
"""

from __future__ import annotations

import math

import pytest
import torch

import flowkit
from flowkit.build import Builder
from flowkit.contracts.transform import Sequential, use_recompute
from flowkit.models import (
    Centre,
    Chain,
    FactorOut,
    LayoutFlow,
    Logit,
    Split,
    Squeeze,
    SqueezeLayer,
    Step,
    Unsqueeze,
)
from flowkit.testing import check_gradients, jacobian_logabsdet, randomize_

TINY_NET = {"use": "glow_cnn", "hidden": 4}
CHANNEL = {"coupling": {"use": "affine", "net": TINY_NET}}
CHECKER = {"coupling": {"use": "affine", "mask": "checkerboard", "net": TINY_NET}}


@pytest.fixture
def build(plugins) -> Builder:
    return Builder(plugins.registries)


def _layout(build: Builder, *, context_shape=None) -> list:
    """Every kind of entry: preprocessing, a checkerboard step at 1 channel, a squeeze, a chain of
    two steps, an unsqueeze and another squeeze (RealNVP's reordering), two splits of one term
    (MaCow's fine split), a split of another term, then the top steps."""
    squeeze = build.ref("decomposition", "squeeze")
    haar = build.ref("decomposition", "haar")
    glow, checker = build.ref("step", "glow", **CHANNEL), build.ref("step", "glow", **CHECKER)
    conditional = build.ref("prior", "conditional_gaussian")
    return [
        Step(Centre(context_shape)), Step(checker), Squeeze(squeeze), Step(Chain((glow, glow))),
        Unsqueeze(squeeze), Squeeze(haar), Step(glow), Split(conditional, term="level1", factor=4),
        Step(glow), Split(conditional, term="level1", factor=3), Squeeze(squeeze), Step(glow),
        Split(build.ref("prior", "gaussian"), term="level2"), Step(Chain((glow,))),
    ]


def _flow(build: Builder, in_shape=(1, 8, 8), **kwargs) -> LayoutFlow:
    flow = LayoutFlow(_layout(build, context_shape=kwargs.get("context_shape")), in_shape=in_shape,
                      prior=build.ref("prior", "learned_gaussian"), build=build, **kwargs).double()
    context = kwargs.get("context_shape")
    batch = torch.rand(32, *in_shape, dtype=torch.float64)
    flow.initialize(batch, None if context is None else torch.randn(32, *context, dtype=torch.float64))
    return randomize_(flow, 0.1)


def test_it_builds_the_layout_into_chains_and_splits_and_tracks_the_shapes(build):
    flow = _flow(build)
    assert [type(m).__name__ for m in flow.layers] == ["Sequential", "FactorOut", "Sequential", "FactorOut",
                                                       "Sequential", "FactorOut", "Sequential"]
    # 1x8x8 -> squeeze 4x4x4 -> unsqueeze 1x8x8 -> haar 4x4x4 -> keep 3, keep 2 -> squeeze 8x2x2 -> keep 4.
    assert [s.out_shape for s in flow.splits()] == [(1, 4, 4), (1, 4, 4), (4, 2, 2)]
    assert [s.keep for s in flow.splits()] == [3, 2, 4]
    assert flow.out_shape == (4, 2, 2) and flow.latent_shapes()[-1] == (4, 2, 2)
    assert flow.part_dims() == {"level1": 32, "level2": 16, "top": 16}
    assert sum(flow.part_dims().values()) == 64
    squeezes = [m for m in flow.modules() if isinstance(m, SqueezeLayer)]
    assert [(m.in_shape, m.out_shape, m.unsqueeze) for m in squeezes] == [
        ((1, 8, 8), (4, 4, 4), False), ((4, 4, 4), (1, 8, 8), True), ((1, 8, 8), (4, 4, 4), False),
        ((2, 4, 4), (8, 2, 2), False)]
    # A Chain is one Sequential inside its chain; path() finds an entry's module.
    assert isinstance(flow.get_submodule(flow.path(3)), Sequential) and flow.path(7) == "layers.1"
    assert isinstance(flow.get_submodule(flow.path(7)), FactorOut)


def test_encode_then_decode_is_the_identity_and_the_log_dets_cancel(build):
    flow = _flow(build)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    latents, logabsdet = flow.encode(x)
    assert [tuple(z.shape[1:]) for z in latents] == flow.latent_shapes()
    back, inv_logabsdet = flow.decode(latents)
    torch.testing.assert_close(back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(inv_logabsdet, -logabsdet, atol=1e-10, rtol=1e-10)


def test_the_log_det_is_the_brute_force_jacobian_of_the_whole_map(build):
    flow = _flow(build)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)

    def flat_latents(v):
        return torch.cat([z.flatten(1) for z in flow.encode(v)[0]], dim=1)

    torch.testing.assert_close(flow.encode(x)[1], jacobian_logabsdet(flat_latents, x), atol=1e-8, rtol=1e-8)


def test_the_terms_add_the_log_dets_of_their_chains_then_their_splits_then_the_top_prior(build):
    """Additivity, walked by hand over the built modules: term t = Σ log|det| of its chains (in
    order) + Σ log p(z | h) of its splits; the last term also the top prior."""
    flow = _flow(build)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    expected: dict[str, torch.Tensor] = {}
    terms = [s.term for s in flow.splits()] + ["top"]
    h, chain_index, split_terms = x, 0, []
    for module in flow.layers:
        if isinstance(module, FactorOut):
            kept, out = h[:, : module.keep], h[:, module.keep:]
            split_terms.append((module.term, module.prior.log_prob(out, kept if module.prior.context_shape else None)))
            h = kept
            continue
        for transform in module.transforms:
            h, logabsdet = transform(h)
            term = terms[chain_index]
            expected[term] = expected.get(term, 0) + logabsdet
        chain_index += 1
    for term, log_p in split_terms:
        expected[term] = expected[term] + log_p
    expected["top"] = expected["top"] + flow.prior.log_prob(h)
    parts = flow.log_prob_parts(x)
    assert list(parts) == list(flow.part_dims()) == ["level1", "level2", "top"]
    for term in parts:
        torch.testing.assert_close(parts[term], expected[term], atol=1e-10, rtol=1e-10)
    _, logabsdet = flow.encode(x)
    priors = sum(log_p for _, log_p in split_terms) + flow.prior.log_prob(h)
    torch.testing.assert_close(sum(parts.values()), logabsdet + priors, atol=1e-10, rtol=1e-10)


def test_log_prob_is_the_latent_density_minus_the_log_det_of_decode(build):
    """The density of the generative pass (`decode_with_density`) is the one `log_prob_parts` adds up."""
    flow = _flow(build)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    latents, _ = flow.encode(x)
    back, log_prob, logabsdet = flow.decode_with_density(latents)
    torch.testing.assert_close(back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(sum(flow.log_prob_parts(x).values()), log_prob - logabsdet, atol=1e-9, rtol=1e-10)


def test_initialize_sets_every_actnorm_from_the_output_of_what_comes_before(build):
    flow = LayoutFlow(_layout(build), in_shape=(1, 8, 8), prior=build.ref("prior", "gaussian"), build=build)
    actnorms = [m for m in flow.modules() if type(m).__name__ == "ActNorm"]
    assert actnorms and not any(bool(a.initialized) for a in actnorms)
    x = torch.rand(64, 1, 8, 8) * 0.3 + 0.6
    flow.initialize(x)
    assert all(bool(a.initialized) for a in actnorms)
    # The actnorm of the step after the split sees the kept channels, standardised.
    kept, _ = flow.splits()[0].split(_through(flow, x, upto=1))
    first = flow.chains()[1].transforms[0].transforms[0]
    z, _ = first(kept)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)


def _through(flow: LayoutFlow, x, upto: int):
    """x through the first ``upto`` chains, splits taken."""
    h = x
    for module in flow.layers[: 2 * upto - 1]:
        h = module.split(h)[0] if isinstance(module, FactorOut) else module(h)[0]
    return h


def test_sampling_draws_each_factored_out_part_from_its_prior_given_the_generated_part(build):
    flow = _flow(build)
    with torch.no_grad():
        flow.prior.loc.copy_(0.3 * torch.randn_like(flow.prior.loc))
    x0 = flow.sample(2, temperature=0.0)
    latents, _ = flow.encode(x0)
    torch.testing.assert_close(latents[-1], flow.prior.mean(2), atol=1e-8, rtol=1e-8)
    h = latents[-1]
    for split, z in zip(reversed(flow.splits()), reversed(latents[:-1]), strict=True):
        kept = _kept_before(flow, x0, split)
        torch.testing.assert_close(z, split.draw(kept, 0.0), atol=1e-8, rtol=1e-8)
    assert h.shape == (2, 4, 2, 2)
    torch.manual_seed(0)
    hot = flow.sample(64, temperature=1.0)
    torch.manual_seed(0)
    cold = flow.sample(64, temperature=0.3)
    assert hot.std(0).mean() > cold.std(0).mean()


def _kept_before(flow: LayoutFlow, x, split: FactorOut):
    h = x
    for module in flow.layers:
        if module is split:
            return module.split(h)[0]
        h = module.split(h)[0] if isinstance(module, FactorOut) else module(h)[0]
    raise AssertionError("split not found")


def test_the_latent_level_generates_what_it_draws_with_its_density(build):
    flow = _flow(build)
    level = flow.latent_level("latent", 3)
    assert level.shape == (64,)
    torch.manual_seed(1)
    z = level.draw(0.8)
    torch.manual_seed(1)
    images = flow.sample(3, temperature=0.8)
    generated = level.generate(z)
    torch.testing.assert_close(generated.out, images, atol=1e-10, rtol=0)  # the same draws, the same images
    latents, _ = flow.encode(images)
    torch.testing.assert_close(torch.cat([v.flatten(1) for v in latents], 1), z, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(sum(flow.log_prob_parts(images).values()), generated.log_prob - generated.logabsdet,
                               atol=1e-8, rtol=1e-10)


def test_split_priors_are_built_before_the_steps_that_lead_to_them(build):
    order = []

    def recording(ref, **shape):
        order.append(f"{ref.kind}:{ref.use}")
        return build(ref, **shape)

    recording.ref = build.ref
    squeeze, glow = build.ref("decomposition", "squeeze"), build.ref("step", "glow", **CHANNEL)
    prior = build.ref("prior", "conditional_gaussian")
    layout = [Step(build.ref("step", "glow", **CHECKER)), Squeeze(squeeze), Step(glow), Step(glow),
              Split(prior, term="a"), Step(glow), Split(prior, term="a", factor=2)]
    LayoutFlow(layout, in_shape=(1, 4, 4), prior=build.ref("prior", "gaussian"), build=recording)
    assert order == ["step:glow", "decomposition:squeeze", "prior:conditional_gaussian", "step:glow", "step:glow",
                     "prior:conditional_gaussian", "step:glow", "prior:gaussian"]


def test_a_vector_context_reaches_every_step_and_the_squeezes_ignore_it(build):
    flow = _flow(build, context_shape=(3,))
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    context = torch.randn(2, 3, dtype=torch.float64)
    latents, _ = flow.encode(x, context)
    torch.testing.assert_close(flow.decode(latents, context)[0], x, atol=1e-10, rtol=0)
    randomize_(flow, 0.1)  # the context projections start at zero
    assert not torch.allclose(flow.encode(x, context)[0][0], flow.encode(x, context + 1)[0][0])
    with pytest.raises(flowkit.ShapeError, match="without context"):
        flow.encode(x)


def test_checkpointing_and_recompute_give_the_plain_values_and_gradients(build, plugins):
    flow = _flow(build)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    loss = -sum(flow.log_prob_parts(x).values()).mean()
    grads = torch.autograd.grad(loss, list(flow.parameters()))
    for switch in ("checkpoint", "recompute"):
        if switch == "checkpoint":
            flow.checkpoint = True
        else:
            flow.checkpoint = False
            use_recompute(flow)
        again = -sum(flow.log_prob_parts(x).values()).mean()
        torch.testing.assert_close(again, loss, atol=1e-12, rtol=1e-12)
        for got, expected in zip(torch.autograd.grad(again, list(flow.parameters())), grads, strict=True):
            torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-7)
    check_gradients(flow, -sum(flow.log_prob_parts(x).values()).mean())


def test_preprocessing_is_a_step_whose_log_det_counts(build):
    layout = [Step(Logit(0.05)), Squeeze(build.ref("decomposition", "squeeze")),
              Step(build.ref("step", "glow", **CHANNEL))]
    flow = LayoutFlow(layout, in_shape=(1, 4, 4), prior=build.ref("prior", "gaussian"), build=build).double()
    randomize_(flow, 0.1)
    y = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    (z,), logabsdet = flow.encode(y)
    brute = jacobian_logabsdet(lambda v: flow.encode(v)[0][0].flatten(1), y)
    torch.testing.assert_close(logabsdet, brute, atol=1e-8, rtol=1e-8)
    assert flow.part_dims() == {"top": 16}
    torch.testing.assert_close(flow.decode([z])[0], y, atol=1e-10, rtol=0)


@pytest.mark.parametrize(("layout", "match"), [
    (lambda b: [Step(b.ref("step", "glow", **CHECKER)), Squeeze(b.ref("decomposition", "squeeze")),
                Squeeze(b.ref("decomposition", "squeeze"))], "layout entry 2 squeezes a \\(4, 3, 3\\) input"),
    (lambda b: [Squeeze(b.ref("decomposition", "squeeze")), Split(b.ref("prior", "gaussian"), "l", factor=3)],
     "factors out the last C // 3 of C = 4 channels"),
    (lambda b: [Unsqueeze(b.ref("decomposition", "squeeze"))], "divisible by 4"),
])
def test_a_layout_that_does_not_fit_the_shape_is_refused(build, layout, match):
    with pytest.raises(flowkit.ShapeError, match=match):
        LayoutFlow(layout(build), in_shape=(1, 6, 6), prior=build.ref("prior", "gaussian"), build=build, name="t")


def test_wrong_images_are_refused_with_the_models_name(build):
    flow = LayoutFlow([Step(Centre())], in_shape=(1, 4, 4), prior=build.ref("prior", "gaussian"), build=build,
                      name="mymodel")
    with pytest.raises(flowkit.ShapeError, match=r"mymodel expected images of shape \(B, 1, 4, 4\)"):
        flow.log_prob_parts(torch.rand(2, 1, 8, 8))
    assert math.prod(flow.out_shape) == 16
