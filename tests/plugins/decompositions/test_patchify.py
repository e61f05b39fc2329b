"""``decomposition:patchify``: TarFlow's unfold order, big_vision's pixel-first order, squeeze at p = 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import flowkit
from flowkit.plugins import make_plugins
from flowkit.testing import check_decomposition


@pytest.fixture(scope="module")
def plugins():
    return make_plugins()


def patchify(plugins, **params):
    return flowkit.build("decomposition", "patchify", plugins=plugins, **params)


@pytest.mark.parametrize("patch", [1, 2, 4, 7])
def test_unfold_order_is_tarflows_patchify(plugins, patch: int) -> None:
    """apple/ml-tarflow Model.patchify: F.unfold(x, p, stride=p).transpose(1, 2), a (B, T, p²C) sequence."""
    x = torch.randn(2, 3, 28, 28)
    s, logabsdet = patchify(plugins, patch=patch).to_channels(x)
    assert s.shape == (2, 3 * patch * patch, 28 // patch, 28 // patch)
    torch.testing.assert_close(s.flatten(2).transpose(1, 2), F.unfold(x, patch, stride=patch).transpose(1, 2),
                               atol=0, rtol=0)
    assert torch.equal(logabsdet, torch.zeros(2))


def test_space_to_depth_order_is_big_visions_einops_patches(plugins) -> None:
    """big_vision jet.py: einops "b (h hp) (w wp) c -> b (h w) (hp wp c)" on NHWC images."""
    x = torch.randn(2, 3, 8, 12)
    s, _ = patchify(plugins, patch=4, order="space_to_depth").to_channels(x)
    nhwc = x.permute(0, 2, 3, 1).numpy()
    b, h, w, c = nhwc.shape
    ref = nhwc.reshape(b, h // 4, 4, w // 4, 4, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // 4) * (w // 4), 16 * c)
    np.testing.assert_array_equal(s.flatten(2).transpose(1, 2).numpy(), ref)


def test_patch_two_is_squeeze_in_glows_order(plugins) -> None:
    x = torch.randn(2, 3, 6, 8)
    squeeze = flowkit.build("decomposition", "squeeze", plugins=plugins)
    for a, b in zip(patchify(plugins, patch=2).split(x), squeeze.split(x), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(patchify(plugins, patch=2).to_channels(x)[0], squeeze.to_channels(x)[0], atol=0, rtol=0)
    flowpp_order = flowkit.build("decomposition", "squeeze", plugins=plugins, order="space_to_depth")
    torch.testing.assert_close(patchify(plugins, patch=2, order="space_to_depth").to_channels(x)[0],
                               flowpp_order.to_channels(x)[0], atol=0, rtol=0)


@pytest.mark.parametrize("order", ["unfold", "space_to_depth"])
@pytest.mark.parametrize("patch", [1, 2, 3, 4])
def test_exact_inverse_and_the_decomposition_contract(plugins, patch: int, order: str) -> None:
    d = patchify(plugins, patch=patch, order=order).double()
    assert d.factor == patch
    check_decomposition(d, torch.randn(2, 2, 12, 12, dtype=torch.float64))
    x = torch.randn(3, 1, 12, 24, dtype=torch.float64)
    s, _ = d.to_channels(x)
    assert torch.equal(d.from_channels(s)[0], x)


def test_a_side_that_is_no_multiple_of_the_patch_is_refused_naming_it(plugins) -> None:
    with pytest.raises(flowkit.ShapeError, match=r"patch = 4.*multiples of 4.*H=30"):
        patchify(plugins, patch=4).to_channels(torch.zeros(1, 1, 30, 28))
    with pytest.raises(flowkit.RecipeError, match="patch"):
        flowkit.ref("decomposition", "patchify", plugins=plugins, patch=0)


def test_a_layout_walker_patchifies_by_its_factor(plugins) -> None:
    """The walker's Squeeze reads the factor: (1, 28, 28) -> (16, 7, 7), and unsqueezes back."""
    from flowkit.build import Builder
    from flowkit.models import LayoutFlow, Squeeze, Unsqueeze

    ref = flowkit.ref("decomposition", "patchify", plugins=plugins, patch=4)
    flow = LayoutFlow([Squeeze(ref)], in_shape=(1, 28, 28), prior=flowkit.ref("prior", "gaussian", plugins=plugins),
                      build=Builder(plugins.registries))
    assert flow.out_shape == (16, 7, 7)
    back = LayoutFlow([Squeeze(ref), Unsqueeze(ref)], in_shape=(1, 28, 28),
                      prior=flowkit.ref("prior", "gaussian", plugins=plugins), build=Builder(plugins.registries))
    assert back.out_shape == (1, 28, 28)
    with pytest.raises(flowkit.ShapeError, match="multiples of 4"):
        LayoutFlow([Squeeze(ref)], in_shape=(1, 30, 28), prior=flowkit.ref("prior", "gaussian", plugins=plugins),
                   build=Builder(plugins.registries))
