"""transform:invconv: the invertible 1x1 convolution, LU-decomposed and plain."""

from __future__ import annotations

import pytest
import torch

import flowkit
from flowkit.plugins import make_plugins
from flowkit.testing import check_gradients, check_transform, randomize_

MODULES = ["flowkit_plugins.transforms.invconv"]


@pytest.fixture(scope="module")
def plugins():
    return make_plugins(entry_points=False, extra=MODULES)


def make(plugins, lu, channels=4, **kwargs):
    t = flowkit.build("transform", "invconv", plugins=plugins, in_shape=(channels, 4, 4), lu=lu, **kwargs)
    return t.double()


@pytest.mark.parametrize("lu", [True, False], ids=["lu", "plain"])
def test_invconv_round_trip_and_brute_force_logdet(plugins, lu):
    t = randomize_(make(plugins, lu))
    check_transform(t, torch.randn(2, 4, 4, 4, dtype=torch.float64))


@pytest.mark.parametrize("lu", [True, False], ids=["lu", "plain"])
def test_invconv_logabsdet_is_pixels_times_slogdet_of_weight(plugins, lu):
    t = randomize_(make(plugins, lu))
    _, logabsdet = t(torch.randn(2, 4, 4, 4, dtype=torch.float64))
    expected = 16 * torch.linalg.slogdet(t.weight_matrix()).logabsdet
    torch.testing.assert_close(logabsdet, expected.detach().expand(2), atol=1e-10, rtol=0)


@pytest.mark.parametrize("lu", [True, False], ids=["lu", "plain"])
def test_invconv_starts_as_a_rotation(plugins, lu):
    w = make(plugins, lu).weight_matrix().detach()
    # The random rotation is drawn when the module is built, in float32, then cast: orthogonal to
    # float32 precision (3e-7 measured). The log-dets stay exact: they come from the stored weight.
    torch.testing.assert_close(w @ w.T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("lu", [True, False], ids=["lu", "plain"])
def test_invconv_inverse_follows_parameter_updates(plugins, lu):
    t = make(plugins, lu)
    z = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    t.inverse(z)
    randomize_(t, scale=0.3)
    torch.testing.assert_close(t.inverse_weight_matrix(), torch.linalg.inv(t.weight_matrix()),
                               atol=1e-10, rtol=0)
    x, _ = t.inverse(z)
    torch.testing.assert_close(t(x)[0], z, atol=1e-10, rtol=0)


def test_invconv_lu_and_plain_agree_on_the_same_weight(plugins):
    lu = randomize_(make(plugins, True))
    plain = make(plugins, False)
    with torch.no_grad():
        plain.weight.copy_(lu.weight_matrix())
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    z_lu, ld_lu = lu(x)
    z_plain, ld_plain = plain(x)
    torch.testing.assert_close(z_lu, z_plain, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld_lu, ld_plain, atol=1e-10, rtol=0)


@pytest.mark.parametrize("lu", [True, False], ids=["lu", "plain"])
def test_invconv_single_channel_is_a_scalar(plugins, lu):
    t = randomize_(make(plugins, lu, channels=1))
    check_transform(t, torch.randn(2, 1, 4, 4, dtype=torch.float64))


@pytest.mark.parametrize("lu", [True, False], ids=["lu", "plain"])
def test_invconv_gradients_are_finite(plugins, lu):
    t = randomize_(make(plugins, lu))
    z, logabsdet = t(torch.randn(2, 4, 4, 4, dtype=torch.float64))
    check_gradients(t, -(logabsdet - 0.5 * z.pow(2).sum((1, 2, 3))).mean())


def test_invconv_checks_context(plugins):
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    with pytest.raises(flowkit.ShapeError, match="without context"):
        make(plugins, True, context_shape=(2, 4, 4))(x)
    t = make(plugins, True, context_shape=(2, 4, 4))
    z, _ = t(x, torch.randn(2, 2, 4, 4, dtype=torch.float64))
    assert z.shape == x.shape
