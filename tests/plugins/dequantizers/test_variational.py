"""dequantizer:variational: y in the right bin, log q a normalised density, its steps assembled as copies."""

from __future__ import annotations

import pytest
import torch

import flowkit
from flowkit.plugins import make_plugins
from flowkit.testing import randomize_

MODULES = [
    "flowkit_plugins.dequantizers.variational", "flowkit_plugins.couplings.mixlogistic",
    "flowkit_plugins.nets.gated_resnet", "flowkit_plugins.transforms.actnorm", "flowkit_plugins.transforms.invconv",
    "flowkit_plugins.steps.glow",
]
NET = {"use": "gated_resnet", "hidden": 8, "blocks": 1, "heads": 2, "dropout": 0.0}


@pytest.fixture(scope="module")
def plugins():
    return make_plugins(entry_points=False, extra=MODULES)


def make(plugins, in_shape=(2, 4, 4), coupling=None, step=None, **kwargs):
    coupling = {"use": "mixlogistic", "components": 3, "net": NET, **(coupling or {})}
    params = {"steps": 2, "step": {"use": "glow", "coupling": coupling, **(step or {})}, "context_channels": 4,
              "context_blocks": 1, "dropout": 0.0, **kwargs}
    return flowkit.build("dequantizer", "variational", plugins=plugins, in_shape=in_shape, **params)


def images(n=4, shape=(2, 4, 4), n_bits=3):
    return torch.randint(0, 2**n_bits, (n, *shape), dtype=torch.uint8)


def test_y_lies_in_the_bin_of_x(plugins):
    deq = randomize_(make(plugins))
    x = images()
    y, log_q = deq(x, 3)
    assert y.shape == x.shape and log_q.shape == (4,) and log_q.dtype == torch.float32
    assert (y >= 0).all() and (y < 1).all()
    torch.testing.assert_close(torch.floor(y * 8).to(torch.uint8), x, atol=0, rtol=0)
    assert torch.isfinite(log_q).all()


def test_top_bin_stays_below_one(plugins):
    deq = make(plugins)
    with torch.no_grad():
        deq.flow.transforms[-1].transforms[-1].net.conv_out.bias.fill_(40.0)  # sigmoid rounds to 1
    y, _ = deq(torch.full((2, 2, 4, 4), 255, dtype=torch.uint8), 8)
    assert (y < 1).all()


def test_log_q_agrees_with_the_inverse_flow(plugins):
    deq = randomize_(make(plugins)).double().eval()
    x = images()
    y, log_q = deq(x, 3)
    u = y * 8 - x.double()
    torch.testing.assert_close(deq.log_prob_noise(u, x, 3), log_q, atol=1e-6, rtol=1e-6)


def test_density_integrates_to_one_on_a_two_pixel_toy(plugins):
    # One channel, 1 x 2 pixels: the smallest image a checkerboard coupling can split, so
    # q(u | x) is a density on the unit square; a midpoint rule on a 200 x 200 grid.
    deq = randomize_(make(plugins, in_shape=(1, 1, 2)), scale=0.3).double().eval()
    n = 200
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    u = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), dim=-1).reshape(-1, 1, 1, 2)
    for value in ([0, 5], [7, 2]):
        x = torch.tensor(value, dtype=torch.uint8).view(1, 1, 1, 2).expand(len(u), 1, 1, 2)
        with torch.no_grad():
            total = deq.log_prob_noise(u, x, 3).exp().mean()
        assert abs(total.item() - 1.0) < 5e-3, total.item()


def test_every_parameter_gets_a_gradient(plugins):
    deq = randomize_(make(plugins))
    y, log_q = deq(images(), 3)
    (y.square().sum() + log_q.sum()).backward()
    for name, p in deq.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_checkpointing_gives_the_same_gradients(plugins):
    torch.manual_seed(1)
    plain = randomize_(make(plugins))
    ckpt = make(plugins, checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = images()
    grads = []
    for deq in (plain, ckpt):
        torch.manual_seed(2)
        y, log_q = deq(x, 3)
        deq.zero_grad()
        (y.sum() + log_q.sum()).backward()
        grads.append([p.grad.clone() for p in deq.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_initialize_sets_actnorm_from_data(plugins):
    deq = make(plugins)
    deq.initialize(images(16), 3)
    actnorms = [m for m in deq.modules() if type(m).__name__ == "ActNorm"]
    assert actnorms and all(bool(m.initialized) for m in actnorms)


def test_channel_mask_and_no_invconv(plugins):
    deq = randomize_(make(plugins, coupling={"mask": "channel"}, step={"invconv": "none", "actnorm": False}))
    assert [type(m).__name__ for m in deq.flow.transforms[0].transforms] == ["MixLogisticCoupling"]
    x = images()
    y, log_q = deq(x, 3)
    torch.testing.assert_close(torch.floor(y * 8).to(torch.uint8), x, atol=0, rtol=0)


def test_steps_are_copies_with_alternating_parity(plugins):
    deq = make(plugins, steps=3)
    couplings = [step.transforms[-1] for step in deq.flow.transforms]
    assert [c.parity for c in couplings] == [0, 1, 0]
    assert {c.mask_kind for c in couplings} == {"checkerboard"}


def test_a_parity_set_by_hand_is_refused(plugins):
    with pytest.raises(flowkit.RecipeError, match=r"coupling\.parity = 1 cannot be set.*alternates step by step"):
        make(plugins, coupling={"parity": 1})


def test_wrong_image_shape_is_reported(plugins):
    with pytest.raises(flowkit.ShapeError, match=r"\(B, 2, 4, 4\)"):
        make(plugins)(images(shape=(1, 4, 4)), 3)


def test_y_stays_in_the_bin_of_x_where_the_sigmoid_rounds_up_in_float32(plugins):
    # x + sigmoid(h) rounds to x + 1 in float32 for large x at h >= ~12: y must not leave x's bin.
    deq = make(plugins)
    with torch.no_grad():
        deq.flow.transforms[-1].transforms[-1].net.conv_out.bias.fill_(16.0)
    x = torch.tensor([0, 1, 128, 200, 254, 255], dtype=torch.uint8).repeat(32).view(4, 2, 4, 6)[..., :4]
    y, _ = deq(x, 8)
    torch.testing.assert_close(torch.floor(y * 256).to(torch.uint8), x, atol=0, rtol=0)
