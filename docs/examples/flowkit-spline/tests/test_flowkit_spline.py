"""flowkit-spline's own tests: the coupling contract from `flowkit.testing`, the one-channel
(checkerboard) case, the identity at initialisation, and the recipe in this folder.

Run them from this folder or from a flowkit checkout (flowkit's pyproject.toml lists this
folder in testpaths): ``pytest docs/examples/flowkit-spline/tests``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import flowkit
from flowkit.build import Builder
from flowkit.plugins import make_plugins
from flowkit.testing import check_gradients, check_model, check_transform, randomize_

HERE = Path(__file__).resolve().parents[1]
TINY_NET = {"use": "glow_cnn", "hidden": 8}
#: (mask, in_shape): channel halves need C >= 2; a checkerboard works on one channel (and odd sizes,
#: like the 7x7 base of Wavelet Flow on MNIST).
CASES = [("channel", (4, 4, 4)), ("channel", (3, 4, 4)), ("checkerboard", (1, 5, 5)), ("checkerboard", (2, 4, 4))]


@pytest.fixture(scope="module")
def plugins():  # noqa: ANN201
    return make_plugins()


def spline(plugins, mask: str, in_shape: tuple[int, ...], **kwargs):  # noqa: ANN001, ANN201
    return flowkit.build("coupling", "spline", plugins=plugins, in_shape=in_shape, mask=mask, net=TINY_NET, **kwargs)


def test_the_entry_point_registers_spline(plugins) -> None:  # noqa: ANN001
    part = plugins.registries.part("coupling", "spline")
    assert (part.plugin, part.distribution, part.version) == ("spline", "flowkit-spline", "0.1.0")
    assert not plugins.broken


@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("mask, in_shape", CASES)
@pytest.mark.parametrize("conditional", [False, True])
def test_contract_in_float64(plugins, mask, in_shape, parity, conditional) -> None:  # noqa: ANN001
    context_shape = (2, *in_shape[1:]) if conditional else None
    coupling = spline(plugins, mask, in_shape, parity=parity, context_shape=context_shape).double()
    # glow_cnn's last layer starts at zero, which makes every spline the identity: perturb first.
    randomize_(coupling, scale=0.3)
    x = 2 * torch.randn(2, *in_shape, dtype=torch.float64)  # some entries beyond bound = 3: the linear tails
    context = torch.randn(2, *context_shape, dtype=torch.float64) if conditional else None
    # Round trip, both log-dets against the brute-force Jacobian, rows independent, at the float64
    # defaults (atol 1e-10, rtol 1e-8).
    check_transform(coupling, x, context)
    z, logabsdet = coupling(x, context)
    check_gradients(coupling, (z.square().flatten(1).sum(1) / 2 - logabsdet).mean())
    if conditional:
        assert not torch.allclose(coupling(x, context + 1)[0], z), "the context is ignored"


@pytest.mark.parametrize("mask, in_shape", CASES)
def test_contract_in_float32_at_its_default_tolerances(plugins, mask, in_shape) -> None:  # noqa: ANN001
    coupling = spline(plugins, mask, in_shape)
    randomize_(coupling)  # moderate weights: float32 round-off is ~1e-6 here (atol 1e-5, rtol 1e-4)
    check_transform(coupling, torch.randn(2, *in_shape), jacobian=True)


@pytest.mark.parametrize("mask, in_shape", CASES)
def test_a_zero_net_makes_the_identity(plugins, mask, in_shape) -> None:  # noqa: ANN001
    # The knot-slope offset: without it a zero net gives slopes of 0.69, not 1.
    coupling = spline(plugins, mask, in_shape).double()
    x = torch.randn(3, *in_shape, dtype=torch.float64)
    z, logabsdet = coupling(x)
    torch.testing.assert_close(z, x, atol=1e-14, rtol=0)
    torch.testing.assert_close(logabsdet, torch.zeros(3, dtype=torch.float64), atol=1e-13, rtol=0)


@pytest.mark.parametrize("parity", [0, 1])
def test_checkerboard_leaves_the_conditioning_pixels_exactly(plugins, parity) -> None:  # noqa: ANN001
    coupling = spline(plugins, "checkerboard", (1, 5, 5), parity=parity).double()
    randomize_(coupling, scale=0.3)
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    z, _ = coupling(x)
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    conditioning = (rows + cols) % 2 == parity
    assert torch.equal(z[:, :, conditioning], x[:, :, conditioning])
    assert (z[:, :, ~conditioning] - x[:, :, ~conditioning]).abs().min() > 0


def test_channel_mask_needs_two_channels(plugins) -> None:  # noqa: ANN001
    with pytest.raises(flowkit.ShapeError, match='use mask = "checkerboard"'):
        spline(plugins, "channel", (1, 7, 7))


@pytest.mark.parametrize("values, message", [({"bins": 1}, "bins = 1"), ({"bound": 0.0}, "bound = 0.0"),
                                             ({"mask": "rows"}, "Allowed")])
def test_bad_params_are_recipe_errors(plugins, values, message) -> None:  # noqa: ANN001
    with pytest.raises(flowkit.RecipeError, match=message):
        spline(plugins, values.pop("mask", "channel"), (4, 4, 4), **values)


def test_the_wavelet_flow_recipe_builds_and_passes_the_model_contract(plugins) -> None:  # noqa: ANN001
    recipe = flowkit.load_recipe(HERE / "wavelet_flow_spline.toml", plugins.registries, preset="smoke")
    uses = {recipe.model.params.step.params.coupling.use, recipe.model.params.base_step.params.coupling.use}
    assert uses == {"spline"}
    # MNIST: the base flow sees one channel, so its couplings use the checkerboard.
    assert recipe.model.params.base_step.params.coupling.params.mask == "checkerboard"
    model = Builder(plugins.registries)(recipe.model, in_shape=(1, 28, 28)).double()
    y = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    model.initialize(y)
    randomize_(model, scale=0.05)
    check_model(model, y)
