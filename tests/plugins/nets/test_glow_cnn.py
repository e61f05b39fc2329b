"""net:glow_cnn: shapes, zero-initialised output, context handling, options."""

from __future__ import annotations

import pytest
import torch

import flowkit
from flowkit.plugins import make_plugins
from flowkit.testing import check_rows_independent, randomize_

MODULES = ["flowkit_plugins.nets.glow_cnn", "flowkit_plugins.transforms.actnorm"]


@pytest.fixture(scope="module")
def plugins():
    return make_plugins(entry_points=False, extra=MODULES)


def make(plugins, shape=(2, 4, 4), out_channels=6, **kwargs):
    kwargs.setdefault("hidden", 8)
    net = flowkit.build("net", "glow_cnn", plugins=plugins, in_shape=shape, out_channels=out_channels, **kwargs)
    return net.double()


def test_glow_cnn_output_is_zero_at_initialisation(plugins):
    net = make(plugins)
    out = net(torch.randn(2, 2, 4, 4, dtype=torch.float64))
    assert out.shape == (2, 6, 4, 4)
    assert bool((out == 0).all())


@pytest.mark.parametrize("blocks", [0, 2])
@pytest.mark.parametrize("actnorm", [False, True])
def test_glow_cnn_is_row_independent_after_randomize(plugins, blocks, actnorm):
    net = randomize_(make(plugins, blocks=blocks, actnorm=actnorm))
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    net.initialize(x)
    assert net(x).shape == (3, 6, 4, 4)
    check_rows_independent(net, x)
    assert len(net.blocks) == blocks


@pytest.mark.parametrize("context_shape", [(3, 4, 4), (5,)], ids=["spatial", "vector"])
def test_glow_cnn_context_changes_output(plugins, context_shape):
    net = randomize_(make(plugins, context_shape=context_shape))
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    context = torch.randn(2, *context_shape, dtype=torch.float64)
    assert not torch.allclose(net(x, context), net(x, context + 1.0))
    # A spatial context is concatenated to the input; a vector one is projected onto the hidden features.
    assert net.conv_in.in_channels == 2 + (context_shape[0] if len(context_shape) == 3 else 0)


def test_glow_cnn_context_errors(plugins):
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(flowkit.ShapeError, match="same height and width"):
        make(plugins, context_shape=(3, 2, 2))
    with pytest.raises(flowkit.ShapeError, match="without"):
        make(plugins, context_shape=(3, 4, 4))(x)
    with pytest.raises(flowkit.ShapeError, match="built without context"):
        make(plugins)(x, torch.zeros(2, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(flowkit.ShapeError, match=r"\(B, 3, 4, 4\)"):
        make(plugins, context_shape=(3, 4, 4))(x, torch.zeros(2, 1, 4, 4, dtype=torch.float64))


def test_glow_cnn_actnorm_initialisation_normalises_hidden_layers(plugins):
    net = make(plugins, actnorm=True)
    assert net.conv_in.bias is None and net.conv_mid.bias is None
    x = 4 * torch.randn(8, 2, 4, 4, dtype=torch.float64) + 2
    net.initialize(x)
    h = net.norms[0](net.conv_in(x))[0]
    torch.testing.assert_close(h.mean((0, 2, 3)), torch.zeros(8, dtype=torch.float64), atol=1e-9, rtol=0)


def test_glow_cnn_output_scale_is_optional(plugins):
    assert make(plugins).logs is not None
    assert make(plugins, output_scale=False).logs is None
    with torch.no_grad():
        net = randomize_(make(plugins))
        x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
        net.logs.fill_(0.5)
        scaled = net(x)
        net.logs.zero_()
        torch.testing.assert_close(scaled, net(x) * torch.exp(torch.tensor(1.5, dtype=torch.float64)),
                                   atol=1e-12, rtol=1e-12)


def test_glow_cnn_rejects_bad_params(plugins):
    with pytest.raises(flowkit.RecipeError, match="hidden"):
        make(plugins, hidden=0)
    with pytest.raises(flowkit.RecipeError, match="blocks"):
        make(plugins, blocks=-1)


def _unfolded(net, x):
    """The net computed layer by layer, as written in Glow: conv -> actnorm -> ReLU -> conv -> actnorm
    -> ReLU -> conv -> * exp(3 logs); the reference for the folded convolutions."""
    h = x
    for conv, norm in ((net.conv_in, net.norms[0]), (net.conv_mid, net.norms[1])):
        h = torch.relu(norm(conv(h))[0])
    out = net.conv_out(h)
    return out * torch.exp(3.0 * net.logs) if net.logs is not None else out


@pytest.mark.parametrize("edge_bias", [False, True])
@pytest.mark.parametrize("output_scale", [False, True])
def test_glow_cnn_folded_actnorm_and_output_scale_equal_the_layer_by_layer_net(plugins, edge_bias, output_scale):
    net = make(plugins, actnorm=True, edge_bias=edge_bias, output_scale=output_scale)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    net.initialize(x)
    randomize_(net, scale=0.5)  # trained-like values for every weight, actnorm and logs included
    x.requires_grad_(True)
    folded, reference = net(x), _unfolded(net, x)
    assert not torch.equal(reference, torch.zeros_like(reference))
    torch.testing.assert_close(folded, reference, rtol=1e-12, atol=1e-12)
    # and the same gradients, for the parameters the fold reads differently (actnorm, logs)
    weights = torch.randn_like(reference)
    grads = torch.autograd.grad((folded * weights).sum(), [x, *net.parameters()])
    expected = torch.autograd.grad((reference * weights).sum(), [x, *net.parameters()])
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
