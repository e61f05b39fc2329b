"""The MaCow step and its masked convolutional flows: exact inverse, exact log-det, triangular Jacobian."""

from __future__ import annotations

import pytest
import torch

import flowkit
from flowkit.testing import check_gradients, check_transform, randomize_
from flowkit_plugins.steps._masked_conv import DIRECTIONS, MaskedConvFlow, _to_canonical
from flowkit_plugins.steps.macow import MaCowStep

SMALL_GLOW = {"use": "glow", "coupling": {"use": "affine", "net": {"use": "glow_cnn", "hidden": 8}}}


def _mcf(direction: str, kernel=(2, 3), context_shape=None, shape=(2, 4, 4)) -> MaskedConvFlow:
    flow = MaskedConvFlow(shape, direction=direction, kernel=kernel, hidden=0, weight_norm=False,
                          context_shape=context_shape).double()
    randomize_(flow, 0.3)  # the zero last layer would make the flow a plain scaling
    return flow


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("kernel", [(2, 3), (1, 1), (3, 5)])
def test_masked_conv_flow_round_trip_and_logdet_match_brute_force(direction, kernel):
    torch.manual_seed(0)
    check_transform(_mcf(direction, kernel), torch.randn(2, 2, 4, 4, dtype=torch.float64))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_masked_conv_flow_with_context_is_exact_and_uses_the_context(direction):
    torch.manual_seed(1)
    flow = _mcf(direction, context_shape=(3, 4, 4))
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    context = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    check_transform(flow, x, context)
    z, _ = flow(x, context)
    z_other, _ = flow(x, context + 1.0)
    assert (z - z_other).abs().max() > 1e-3


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_masked_conv_flow_jacobian_is_triangular_in_its_direction(direction):
    """Output pixel (i, j) depends on input rows (columns) strictly before it and on itself only."""
    torch.manual_seed(2)
    flow = _mcf(direction, shape=(1, 5, 5))
    x = torch.randn(1, 1, 5, 5, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v)[0], x).reshape(5, 5, 5, 5)
    rows = torch.arange(5)
    # order[i, j] = position of pixel (i, j) in the generation order of this direction
    order = {
        "up": rows.view(5, 1).expand(5, 5),
        "down": (4 - rows).view(5, 1).expand(5, 5),
        "left": rows.view(1, 5).expand(5, 5),
        "right": (4 - rows).view(1, 5).expand(5, 5),
    }[direction]
    for i in range(5):
        for j in range(5):
            later = order >= order[i, j]
            later[i, j] = False
            assert jac[i, j][later].abs().max() == 0, f"pixel {(i, j)} depends on a later pixel"
            assert jac[i, j, i, j] != 0


def test_masked_conv_flow_starts_as_a_sigmoid_two_scaling():
    flow = MaskedConvFlow((3, 4, 4), direction="up", kernel=(2, 3), hidden=0, weight_norm=False)
    x = torch.randn(2, 3, 4, 4)
    z, logabsdet = flow(x)
    torch.testing.assert_close(z, x * torch.sigmoid(torch.tensor(2.0)), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logabsdet, torch.full((2,), 48 * torch.nn.functional.logsigmoid(torch.tensor(2.0)).item()),
                               atol=1e-5, rtol=1e-6)


def _step(in_shape, **params) -> MaCowStep:
    return flowkit.build("step", "macow", in_shape=in_shape, glow=SMALL_GLOW, **params)


@pytest.mark.parametrize("directions", [("up", "down", "left", "right"), ("right", "left")])
def test_macow_step_round_trip_and_logdet_match_brute_force(directions):
    torch.manual_seed(3)
    step = _step((2, 4, 4), units=1, directions=directions).double()
    step.initialize(torch.randn(16, 2, 4, 4, dtype=torch.float64) * 2 + 0.5)
    randomize_(step, 0.1)
    check_transform(step, torch.randn(2, 2, 4, 4, dtype=torch.float64))


def test_macow_step_layout_follows_the_reference_unit():
    step = _step((4, 8, 8), units=2)
    names = [type(t).__name__ for t in step.transforms]
    unit = ["ActNorm", "MaskedConvFlow", "MaskedConvFlow", "ActNorm", "MaskedConvFlow", "MaskedConvFlow"]
    assert names == unit * 2 + ["GlowStep"]
    directions = [t.direction for t in step.transforms if isinstance(t, MaskedConvFlow)]
    assert directions == ["up", "down", "left", "right"] * 2
    kernels = {t.kernel for t in step.transforms if isinstance(t, MaskedConvFlow)}
    assert kernels == {(2, 3)}


def test_macow_step_float32_round_trip_on_a_realistic_size_is_within_float32_tolerances():
    torch.manual_seed(4)
    step = flowkit.build("step", "macow", in_shape=(12, 16, 16))
    x = torch.randn(2, 12, 16, 16)
    step.initialize(x)
    randomize_(step, 0.02)
    with torch.no_grad():
        z, logabsdet = step(x)
        x_back, inverse_logabsdet = step.inverse(z)
    # Measured: 1.7e-6 and 2.7e-4 (on a log-det of 165, a sum of 3072 float32 terms); the
    # autoregressive inverse does not amplify the round-off beyond float32's own.
    torch.testing.assert_close(x_back, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inverse_logabsdet, -logabsdet, atol=0, rtol=1e-5)


def test_macow_step_gives_every_parameter_a_gradient():
    torch.manual_seed(5)
    step = _step((4, 4, 4), units=1)
    x = torch.randn(3, 4, 4, 4)
    step.initialize(x)
    randomize_(step, 0.05)
    z, logabsdet = step(x)
    check_gradients(step, (0.5 * z.square().flatten(1).sum(1) - logabsdet).mean())


@pytest.mark.parametrize(
    "bad", [{"kernel": [2, 2]}, {"kernel": [0, 3]}, {"kernel": [2, 3, 1]}, {"units": 0}, {"directions": ["up", "diagonal"]}]
)
def test_macow_params_refuse_invalid_values(bad):
    with pytest.raises(flowkit.RecipeError):
        flowkit.build("step", "macow", in_shape=(4, 4, 4), **bad)


# -- the reference's weight-normalised masked convolutions (macow/flows/conv.py MCFBlock) -----------
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_weight_normalised_masked_conv_flow_initialises_as_the_reference_and_stays_exact(direction):
    """ShiftedConv2d/Conv2dWeightNorm.init on the first batch: the masked convolution's output
    standardised per channel (unbiased std), the 1x1 output layer at init_scale 0, so the flow
    starts as x * sigmoid(2); once initialised (and trained) it is still exactly invertible with
    the brute-force log-det."""
    torch.manual_seed(0)
    flow = MaskedConvFlow((3, 6, 6), direction=direction, kernel=(2, 3), hidden=0, weight_norm=True).double()
    x = torch.randn(32, 3, 6, 6, dtype=torch.float64) * 2 + 1
    flow.initialize(x)
    hidden = flow.conv(flow._shifted(_to_canonical(x, direction))).transpose(0, 1).reshape(12, -1)
    torch.testing.assert_close(hidden.mean(1), torch.zeros(12, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(hidden.std(1), torch.ones(12, dtype=torch.float64), atol=1e-5, rtol=0)
    z, logabsdet = flow(x)
    sigmoid_2 = torch.sigmoid(torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(z, x * sigmoid_2)
    torch.testing.assert_close(logabsdet, torch.full((32,), 108 * sigmoid_2.log().item(), dtype=torch.float64))
    assert bool(flow.initialized) and "initialized" in flow.state_dict()
    g = flow.conv.weight_g.detach().clone()
    flow.initialize(x * 3)  # once: a restored flow keeps its weights
    torch.testing.assert_close(flow.conv.weight_g, g, atol=0, rtol=0)
    check_transform(randomize_(flow, 0.3), torch.randn(2, 3, 4, 5, dtype=torch.float64))
