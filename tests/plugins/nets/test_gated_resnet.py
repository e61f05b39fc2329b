"""net:gated_resnet: shapes, context rules, attention against a reference, dropout, dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flowkit
from flowkit.plugins import make_plugins
from flowkit.testing import check_rows_independent, randomize_
from flowkit_plugins.nets.gated_resnet import GatedAttention

SMALL = {"hidden": 8, "blocks": 2, "heads": 2, "dropout": 0.0}


@pytest.fixture(scope="module")
def plugins():
    return make_plugins(entry_points=False, extra=["flowkit_plugins.nets.gated_resnet"])


def make(plugins, in_shape=(3, 6, 4), out_channels=5, **kwargs):
    params = {**SMALL, **kwargs}
    return flowkit.build("net", "gated_resnet", plugins=plugins, in_shape=in_shape, out_channels=out_channels, **params)


@pytest.mark.parametrize("attention", [True, False])
def test_output_shape(plugins, attention):
    net = make(plugins, attention=attention)
    assert net(torch.randn(2, 3, 6, 4)).shape == (2, 5, 6, 4)


@pytest.mark.parametrize("context_shape", [(4, 6, 4), (7,)])
def test_context_is_used(plugins, context_shape):
    net = randomize_(make(plugins, context_shape=context_shape))
    x = torch.randn(2, 3, 6, 4)
    context = torch.randn(2, *context_shape)
    out = net(x, context)
    assert out.shape == (2, 5, 6, 4)
    assert not torch.allclose(out, net(x, context + 1.0))


def test_context_rules(plugins):
    x = torch.randn(2, 3, 6, 4)
    with pytest.raises(flowkit.ShapeError, match="built without context"):
        make(plugins)(x, torch.randn(2, 4, 6, 4))
    net = make(plugins, context_shape=(4, 6, 4))
    with pytest.raises(flowkit.ShapeError, match="called without"):
        net(x)
    with pytest.raises(flowkit.ShapeError, match=r"expected a context of shape \(B, 4, 6, 4\)"):
        net(x, torch.randn(2, 4, 3, 2))
    with pytest.raises(flowkit.ShapeError, match="same height|accepts a context"):
        make(plugins, context_shape=(4, 3, 3))
    with pytest.raises(flowkit.ShapeError, match=r"expected input of shape \(B, 3, 6, 4\)"):
        net(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4))


@pytest.mark.parametrize("attention", [True, False])
def test_only_attention_reaches_beyond_the_receptive_field(plugins, attention):
    # 3x3 convolutions in, per block and out reach 7x7 with one block; attention reaches all.
    net = randomize_(make(plugins, in_shape=(1, 12, 12), blocks=1, attention=attention))
    x = torch.randn(1, 1, 12, 12, requires_grad=True)
    net(x)[0, :, 0, 0].sum().backward()
    far = x.grad[0, 0, 8:, 8:].abs().sum()
    assert (far > 0) == attention


def test_attention_matches_an_explicit_softmax():
    attn = randomize_(GatedAttention(8, heads=2, attention=True, dropout=0.0)).double()
    x = torch.randn(3, 10, 8, dtype=torch.float64)
    pos = torch.randn(10, 8, dtype=torch.float64)
    q, k, v = attn.qkv(x + pos).view(3, 10, 3, 2, 4).unbind(2)
    weights = torch.softmax(torch.einsum("bthd,bshd->bhts", q, k) / 2.0, dim=-1)
    mixed = torch.einsum("bhts,bshd->bthd", weights, v).reshape(3, 10, 8)
    a, b = attn.out(mixed).chunk(2, dim=-1)
    torch.testing.assert_close(attn(x, pos), x + a * torch.sigmoid(b), atol=1e-12, rtol=1e-10)


def test_no_attention_ablation_has_the_same_parameter_count(plugins):
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(make(plugins, attention=True)) == count(make(plugins, attention=False))


def test_dropout_only_in_training(plugins):
    net = randomize_(make(plugins, dropout=0.5))
    x = torch.randn(2, 3, 6, 4)
    assert not torch.allclose(net.train()(x), net(x))
    net.eval()
    torch.testing.assert_close(net(x), net(x), atol=0, rtol=0)


def test_rows_are_independent(plugins):
    net = randomize_(make(plugins)).eval()
    check_rows_independent(net, torch.randn(3, 3, 6, 4))


def test_bf16_autocast_gives_the_float32_output_to_bf16_precision(plugins):
    net = randomize_(make(plugins, context_shape=(4, 6, 4))).eval()
    x, context = torch.randn(2, 3, 6, 4), torch.randn(2, 4, 6, 4)
    reference = net(x, context)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, context)
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa (relative 4e-3 per rounding); measured 1e-2 on outputs of
    # about 2 after a dozen layers.
    assert reference.abs().max() > 0.5, "a near-zero output would make the comparison trivial"
    torch.testing.assert_close(out.float(), reference, atol=5e-2, rtol=5e-2)


def test_output_scale_zero_gives_zero_output(plugins):
    net = make(plugins, init_scale=0.0)
    assert net(torch.randn(2, 3, 6, 4)).abs().max() == 0


def test_every_parameter_gets_a_gradient(plugins):
    net = make(plugins, context_shape=(4, 6, 4))
    F.mse_loss(net(torch.randn(2, 3, 6, 4), torch.randn(2, 4, 6, 4)), torch.randn(2, 5, 6, 4)).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_invalid_params_are_reported(plugins):
    with pytest.raises(flowkit.RecipeError, match="divisible by heads"):
        make(plugins, hidden=10, heads=4)
    with pytest.raises(flowkit.RecipeError, match="dropout"):
        make(plugins, dropout=1.0)
