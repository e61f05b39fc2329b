"""``net:causal_transformer`` and ``net:vit``: shapes, zero-initialised outputs, the key/value cache."""

from __future__ import annotations

import pytest
import torch

import flowkit
from flowkit.nn.transformer import KVCache
from flowkit.plugins import make_plugins
from flowkit.testing import randomize_


@pytest.fixture(scope="module")
def plugins():
    return make_plugins()


def test_the_causal_transformer_starts_at_its_output_bias_and_has_tarflows_layers(plugins) -> None:
    net = flowkit.build("net", "causal_transformer", plugins=plugins, in_shape=(4, 2, 3), out_channels=8, width=128,
                        depth=2)
    assert torch.equal(net.proj_out.weight, torch.zeros(8, 128))  # the reference zeroes the weight only
    out = net(torch.randn(2, 4, 2, 3))
    torch.testing.assert_close(out, net.proj_out.bias[None, :, None, None].expand(2, 8, 2, 3))
    assert net.blocks[0].attention.heads == 2  # width / head_dim = 128 / 64
    # proj_in, pos_embed, per block 12 w^2 + 13 w, proj_out: transformer_flow.MetaBlock's parameters.
    w = 128
    assert sum(p.numel() for p in net.parameters()) == (4 * w + w) + 6 * w + 2 * (12 * w * w + 13 * w) + (w * 8 + 8)


@pytest.mark.parametrize("context_shape", [None, (3, 2, 3), (5,)])
def test_decoding_with_a_cache_in_any_chunks_equals_the_full_pass(plugins, context_shape) -> None:
    net = flowkit.build("net", "causal_transformer", plugins=plugins, in_shape=(4, 2, 3), out_channels=6, width=16,
                        depth=2, head_dim=8, context_shape=context_shape).double()
    randomize_(net)
    x = torch.randn(2, 4, 2, 3, dtype=torch.float64)
    c = None if context_shape is None else torch.randn(2, *context_shape, dtype=torch.float64)
    full = net(x, c).flatten(2)
    for cuts in ([1, 1, 1, 1, 1, 1], [2, 4], [6]):
        cache, start, outs = KVCache(), 0, []
        for n in cuts:
            ctx = c.flatten(2)[..., start:start + n] if c is not None and c.dim() == 4 else c
            outs.append(net(x.flatten(2)[..., start:start + n], ctx, cache=cache))
            start += n
        torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=1e-12, rtol=0)
    with pytest.raises(flowkit.ShapeError, match="positions"):
        net(x.flatten(2)[..., :1], c if c is None or c.dim() == 2 else c.flatten(2)[..., :1], cache=cache)


def test_the_vit_starts_at_zero_and_maps_patches_back_to_their_pixels(plugins) -> None:
    net = flowkit.build("net", "vit", plugins=plugins, in_shape=(3, 4, 6), out_channels=5, width=16, heads=2, patch=2)
    x = torch.randn(2, 3, 4, 6)
    assert torch.equal(net(x), torch.zeros(2, 5, 4, 6))  # Jet's final_proj: zero kernel and bias
    randomize_(net)
    # A pixel's output depends on its own patch's pixels through the head, so moving one pixel moves
    # all four outputs of its patch (and, through attention, the others too).
    out = net(x)
    x2 = x.clone()
    x2[:, :, 0, 0] += 1.0
    assert (net(x2) - out)[:, :, :2, :2].abs().amin() > 0
    with pytest.raises(flowkit.ShapeError, match="position embedding fixes H, W"):
        net(torch.randn(2, 3, 8, 6))


def test_the_vit_has_big_visions_encoder_parameters(plugins) -> None:
    """Jet's DNN at patch 1: init_proj (k/2 E + E), posemb (n E), per block 12 E² + 13 E, the encoder
    norm (2E), final_proj (E k + k): as docs/baselines/fidelity.md derives it."""
    e, half, n, depth = 32, 8, 12, 2
    net = flowkit.build("net", "vit", plugins=plugins, in_shape=(half, 3, 4), out_channels=2 * half, width=e,
                        depth=depth, heads=4)
    assert sum(p.numel() for p in net.parameters()) == (half * e + e) + n * e + depth * (12 * e * e + 13 * e) + 2 * e + (
        e * 2 * half + 2 * half)
