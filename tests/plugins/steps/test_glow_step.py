"""step:glow: actnorm -> invconv -> coupling, built by reference."""

from __future__ import annotations

import pytest
import torch

import flowkit
from flowkit.plugins import make_plugins
from flowkit.testing import check_gradients, check_transform, jacobian_logabsdet, randomize_

MODULES = [
    "flowkit_plugins.steps.glow", "flowkit_plugins.transforms.actnorm", "flowkit_plugins.transforms.invconv",
    "flowkit_plugins.couplings.affine", "flowkit_plugins.couplings.additive", "flowkit_plugins.nets.glow_cnn",
]
NET = {"use": "glow_cnn", "hidden": 8}


@pytest.fixture(scope="module")
def plugins():
    return make_plugins(entry_points=False, extra=MODULES)


def make(plugins, shape=(4, 4, 4), coupling=None, **kwargs):
    coupling = {"use": "affine", "net": NET} if coupling is None else coupling
    step = flowkit.build("step", "glow", plugins=plugins, in_shape=shape, coupling=coupling, **kwargs)
    return step.double()


def ready(step, x, context=None):
    randomize_(step)
    step.initialize(3 * x + 1, context)
    return step


@pytest.mark.parametrize("invconv", ["lu", "plain", "reverse", "none"])
@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_glow_step_round_trip_and_brute_force_logdet(plugins, invconv, coupling):
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    step = ready(make(plugins, coupling={"use": coupling, "net": NET}, invconv=invconv), x)
    check_transform(step, x)


def test_glow_step_parts_in_order(plugins):
    names = [type(t).__name__ for t in make(plugins).transforms]
    assert names == ["ActNorm", "InvConv1x1", "AffineCoupling"]
    names = [type(t).__name__ for t in make(plugins, actnorm=False, invconv="none").transforms]
    assert names == ["AffineCoupling"]
    assert not make(plugins, invconv="plain").transforms[1].lu


def test_glow_step_logabsdet_is_the_sum_of_its_parts_brute_force_logdets(plugins):
    # Each part's log|det| from its own autograd Jacobian at the input it sees, so neither the
    # parts' log-dets nor the step's accumulation is trusted: log-dets of a composition add up.
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    step = ready(make(plugins), x)
    total = torch.zeros(2, dtype=torch.float64)
    h = x
    for part in step.transforms:
        total = total + jacobian_logabsdet(lambda v, part=part: part(v)[0], h)
        h = part(h)[0].detach()
    z, logabsdet = step(x)
    torch.testing.assert_close(z, h, atol=1e-12, rtol=0)
    torch.testing.assert_close(logabsdet, total, atol=1e-10, rtol=1e-8)


def test_glow_step_initialize_normalises_actnorm_output(plugins):
    step = make(plugins)
    x = 5 * torch.randn(16, 4, 4, 4, dtype=torch.float64) - 2
    step.initialize(x)
    h, _ = step.transforms[0](x)
    torch.testing.assert_close(h.mean((0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("invconv", ["lu", "none"])
def test_glow_step_single_channel_with_checkerboard(plugins, invconv):
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    coupling = {"use": "affine", "mask": "checkerboard", "net": NET}
    step = ready(make(plugins, shape=(1, 4, 4), coupling=coupling, invconv=invconv), x)
    check_transform(step, x)


def test_glow_step_single_channel_with_channel_mask_names_checkerboard(plugins):
    with pytest.raises(flowkit.ShapeError, match="checkerboard"):
        make(plugins, shape=(1, 4, 4))


def test_glow_step_passes_context_to_coupling(plugins):
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    context = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    step = ready(make(plugins, context_shape=(2, 4, 4)), x, context)
    assert not torch.allclose(step(x, context)[0], step(x, context - 1.0)[0])
    with pytest.raises(flowkit.ShapeError, match="without context"):
        step(x)
    check_transform(step, x, context)


def test_glow_step_gradients_are_finite(plugins):
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    step = ready(make(plugins), x)
    z, logabsdet = step(x)
    check_gradients(step, -(logabsdet - 0.5 * z.pow(2).sum((1, 2, 3))).mean())


def test_glow_step_unknown_invconv_lists_choices(plugins):
    with pytest.raises(flowkit.RecipeError, match='"reverse"'):
        make(plugins, invconv="lu_decomposed")
