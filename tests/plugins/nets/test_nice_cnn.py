"""net:nice_cnn: MaCow's NICEConvBlock (macow/flows/nice.py) with weight normalisation and its
data-dependent init (macow/nnet/weight_norm.py Conv2dWeightNorm.init), checked formula by formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flowkit
from flowkit.plugins import make_plugins
from flowkit.testing import randomize_

MODULES = ["flowkit_plugins.nets.nice_cnn"]


@pytest.fixture(scope="module")
def plugins():
    return make_plugins(entry_points=False, extra=MODULES)


def make(plugins, **kwargs):
    kwargs.setdefault("hidden", 8)
    return flowkit.build("net", "nice_cnn", plugins=plugins, in_shape=(2, 6, 6), out_channels=4, **kwargs)


def test_the_weight_is_g_times_v_over_its_norm_and_starts_at_v(plugins):
    net = make(plugins)
    conv = net.conv1
    norms = conv.weight_v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(conv.weight(), conv.weight_v)  # g = ‖v‖ at construction
    with torch.no_grad():
        conv.weight_g.mul_(torch.linspace(0.5, 2.0, 8).view(-1, 1, 1, 1))
    torch.testing.assert_close(conv.weight(), conv.weight_v * conv.weight_g / norms)
    x = torch.randn(3, 2, 6, 6)
    expected = F.conv2d(F.elu(F.conv2d(F.elu(F.conv2d(x, conv.weight(), conv.bias, padding=1)),
                                       net.conv2.weight(), net.conv2.bias)),
                        net.conv3.weight(), net.conv3.bias, padding=1)
    torch.testing.assert_close(net(x), expected)


def test_initialize_standardises_each_layer_as_the_reference_and_zeroes_the_output(plugins):
    torch.manual_seed(0)
    net = make(plugins)
    x = torch.randn(64, 2, 6, 6) * 3 + 1
    net.initialize(x)
    h1 = net.conv1(x)
    h2 = net.conv2(F.elu(h1))
    for h in (h1, h2):  # Conv2dWeightNorm.init: (out - mean) / (std + 1e-6), std unbiased
        per_channel = h.transpose(0, 1).reshape(8, -1)
        torch.testing.assert_close(per_channel.mean(1), torch.zeros(8), atol=1e-5, rtol=0)
        torch.testing.assert_close(per_channel.std(1), torch.ones(8), atol=1e-4, rtol=0)
    out = net(x)
    assert out.abs().max() == 0  # init_scale 0 for the output layer: the coupling starts at shift 0, scale sigmoid(2)
    loss = net(x).square().sum() + net(x).sum()
    loss.backward()
    assert net.conv3.weight_g.grad.abs().sum() > 0  # g = 0 still learns
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    # Once: a restored or already initialised net keeps its weights.
    g = net.conv1.weight_g.detach().clone()
    net.initialize(torch.randn(64, 2, 6, 6))
    torch.testing.assert_close(net.conv1.weight_g, g, atol=0, rtol=0)
    assert "initialized" in net.state_dict()


def test_a_spatial_context_is_concatenated_and_a_vector_context_starts_at_zero(plugins):
    net = randomize_(flowkit.build("net", "nice_cnn", plugins=plugins, in_shape=(2, 6, 6), out_channels=4,
                                   context_shape=(3, 6, 6), hidden=8))
    x, c = torch.randn(2, 2, 6, 6), torch.randn(2, 3, 6, 6)
    assert net.conv1.weight_v.shape[1] == 5
    assert not torch.allclose(net(x, c), net(x, torch.zeros_like(c)))
    with pytest.raises(flowkit.ShapeError, match="context"):
        net(x)
    vector = flowkit.build("net", "nice_cnn", plugins=plugins, in_shape=(2, 6, 6), out_channels=4,
                           context_shape=(5,), hidden=8)
    plain = flowkit.build("net", "nice_cnn", plugins=plugins, in_shape=(2, 6, 6), out_channels=4, hidden=8)
    plain.load_state_dict({k: v for k, v in vector.state_dict().items() if not k.startswith("vector.")})
    torch.testing.assert_close(vector(x, torch.randn(2, 5)), plain(x))
