"""net:realnvp_resnet: RealNVP's coupling resnet (tensorflow/models research/real_nvp), actnorm for batch norm."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import flowkit
from flowkit.testing import check_net, randomize_


def make(in_shape=(3, 8, 8), out_channels=6, context_shape=None, **params):
    params = {"hidden": 8, "blocks": 2, **params}
    return flowkit.build("net", "realnvp_resnet", in_shape=in_shape, out_channels=out_channels,
                         context_shape=context_shape, **params).double()


def _conv(layer, x):
    return F.conv2d(x, layer.weight_v * (layer.weight_g if layer.weight_g is not None else 1)
                    / layer.weight_v.flatten(1).norm(dim=1).view(-1, 1, 1, 1), layer.bias, padding=layer.padding)


def _norm(actnorm, x):
    return (x + actnorm.bias) * torch.exp(actnorm.log_scale)


def test_the_forward_pass_is_the_reference_resnet_written_out():
    """resnet(): h_in, skip_in, residual blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3 + identity) each
    with a skip 1x1 summed into the output, BN-ReLU-conv1x1 out; BN here is actnorm."""
    net = randomize_(make(in_gain=2.0, context_shape=(1, 8, 8)))
    x, mask = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.rand(4, 1, 8, 8, dtype=torch.float64)
    u = 2.0 * _norm(net.norm_in, x)
    h = _conv(net.conv_in, torch.cat([F.relu(u), F.relu(-u), mask], dim=1))
    out = _conv(net.skip_in, h)
    for block in net.blocks:
        r = _conv(block["conv_a"], F.relu(_norm(block["norm_a"], h)))
        h = h + _conv(block["conv_b"], F.relu(_norm(block["norm_b"], r)))
        out = out + _conv(block["skip"], h)
    expected = _conv(net.conv_out, F.relu(_norm(net.norm_out, out)))
    torch.testing.assert_close(net(x, mask), expected, atol=1e-12, rtol=1e-12)


def reference_resnet_parameters(dim_in: int, dim: int, dim_out: int, blocks: int) -> tuple[int, int]:
    """Trainable variables of the reference's resnet() (skip = 1, no bottleneck, batch norm on):
    (total, batch-norm betas); conv_layer has a bias where `bias`, a magnitude where `scale`."""
    total = 9 * dim_in * dim + dim + (dim * dim + 2 * dim)  # h_in (bias), skip_in (bias, magnitude)
    total += blocks * (dim + 9 * dim * dim + dim + 9 * dim * dim + 2 * dim + dim * dim + 2 * dim)
    total += dim + dim * dim_out + 2 * dim_out  # bn_pre_out, out (bias, magnitude)
    return total, blocks * 2 * dim + dim


@pytest.mark.parametrize(("channels", "context", "dim", "blocks"), [(3, 1, 64, 8), (6, 0, 16, 2), (12, 1, 8, 1)])
def test_the_layers_are_the_references_with_one_more_parameter_per_normalised_channel(channels, context, dim, blocks):
    net = make((channels, 4, 4), 2 * channels, (context, 4, 4) if context else None, hidden=dim, blocks=blocks)
    reference, betas = reference_resnet_parameters(2 * channels + context, dim, 2 * channels, blocks)
    # The coupling's own input batch norm (bn_in: C betas) is this net's norm_in.
    reference, betas = reference + channels, betas + channels
    assert sum(p.numel() for p in net.parameters()) == reference + betas


def test_weight_normalisation_starts_as_the_reference_initialisers():
    net = make(hidden=16)
    for layer, c_in, gain in [(net.conv_in, 6, False), (net.skip_in, 16, True), (net.blocks[0]["conv_a"], 16, False),
                              (net.blocks[0]["conv_b"], 16, True), (net.conv_out, 16, True)]:
        bound = math.sqrt(2.0 / c_in)
        assert layer.weight_v.abs().max() <= bound
        fan_in = layer.weight_v[0].numel()
        if gain:
            torch.testing.assert_close(layer.weight_g.flatten(), torch.full((layer.weight_v.shape[0],), bound * math.sqrt(
                fan_in / 12), dtype=torch.float64))
        else:
            assert layer.weight_g is None
            torch.testing.assert_close(layer.weight().flatten(1).norm(dim=1), torch.ones(layer.weight_v.shape[0],
                                                                                      dtype=torch.float64))
    assert net.blocks[0]["conv_a"].bias is None and net.conv_in.bias is not None


def test_initialize_standardises_every_actnorm_on_the_batch():
    net = make()
    x = 3.0 * torch.randn(64, 3, 8, 8, dtype=torch.float64) + 1.0
    net.initialize(x)
    norms = [m for m in net.modules() if type(m).__name__ == "ActNorm"]
    assert len(norms) == 1 + 2 * 2 + 1 and all(bool(m.initialized) for m in norms)
    u = _norm(net.norm_in, x)
    torch.testing.assert_close(u.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(u.std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("context_shape", [None, (2, 8, 8), (5,)])
def test_net_contract(context_shape):
    net = randomize_(make(context_shape=context_shape))
    context = None if context_shape is None else torch.randn(3, *context_shape, dtype=torch.float64)
    check_net(net, torch.randn(3, 3, 8, 8, dtype=torch.float64), context, out_channels=6)


def test_a_net_without_residual_blocks_is_refused():
    with pytest.raises(flowkit.RecipeError, match="blocks = 0"):
        make(blocks=0)
