"""coupling:additive: masks, volume preservation, context, and nflows' additive coupling."""

from __future__ import annotations

import pytest
import torch
from nflows.transforms.coupling import AdditiveCouplingTransform

import flowkit
from flowkit.plugins import make_plugins
from flowkit.testing import check_gradients, check_transform, randomize_

MODULES = ["flowkit_plugins.couplings.additive", "flowkit_plugins.nets.glow_cnn"]


@pytest.fixture(scope="module")
def plugins():
    return make_plugins(entry_points=False, extra=MODULES)


def make(plugins, shape=(4, 4, 4), **kwargs):
    kwargs.setdefault("net", {"use": "glow_cnn", "hidden": 8})
    return flowkit.build("coupling", "additive", plugins=plugins, in_shape=shape, **kwargs).double()


@pytest.mark.parametrize("mask", ["channel", "checkerboard"])
@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("channels", [3, 4])
def test_additive_round_trip_and_zero_logdet(plugins, mask, parity, channels):
    t = randomize_(make(plugins, shape=(channels, 4, 4), mask=mask, parity=parity))
    x = torch.randn(2, channels, 4, 4, dtype=torch.float64)
    check_transform(t, x)
    z, logabsdet = t(x)
    assert not torch.allclose(z, x), "the randomized coupling should change its input"
    torch.testing.assert_close(logabsdet, torch.zeros(2, dtype=torch.float64), atol=0, rtol=0)


def test_additive_is_identity_at_initialisation(plugins):
    t = make(plugins)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(t(x)[0], x, atol=0, rtol=0)


@pytest.mark.parametrize("parity", [0, 1])
def test_additive_channel_mask_keeps_conditioning_half(plugins, parity):
    t = randomize_(make(plugins, parity=parity))
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    z, _ = t(x)
    kept = slice(0, 2) if parity == 0 else slice(2, 4)
    torch.testing.assert_close(z[:, kept], x[:, kept], atol=0, rtol=0)


@pytest.mark.parametrize("parity", [0, 1])
def test_additive_matches_nflows_additive_coupling(plugins, parity):
    ours = randomize_(make(plugins, parity=parity))
    mask = [-1, -1, 1, 1] if parity == 0 else [1, 1, -1, -1]
    reference = AdditiveCouplingTransform(mask, lambda n_in, n_out: ours.net)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    z, logabsdet = ours(x)
    z_ref, logabsdet_ref = reference(x)
    torch.testing.assert_close(z, z_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(logabsdet, logabsdet_ref.to(logabsdet.dtype), atol=1e-12, rtol=0)


def test_additive_context_changes_output(plugins):
    t = randomize_(make(plugins, context_shape=(2, 4, 4)))
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    context = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    z1, _ = t(x, context)
    z2, _ = t(x, context + 1.0)
    assert not torch.allclose(z1, z2)
    check_transform(t, x, context, jacobian=False)


def test_additive_built_with_context_raises_without(plugins):
    t = make(plugins, context_shape=(2, 4, 4))
    with pytest.raises(flowkit.ShapeError, match="without context"):
        t(torch.randn(2, 4, 4, 4, dtype=torch.float64))


def test_additive_single_channel_channel_mask_suggests_checkerboard(plugins):
    with pytest.raises(flowkit.ShapeError, match="checkerboard"):
        make(plugins, shape=(1, 4, 4))


def test_additive_gradients_are_finite(plugins):
    t = randomize_(make(plugins, mask="checkerboard"))
    z, logabsdet = t(torch.randn(2, 4, 4, 4, dtype=torch.float64))
    check_gradients(t, -(logabsdet - 0.5 * z.pow(2).sum((1, 2, 3))).mean())
