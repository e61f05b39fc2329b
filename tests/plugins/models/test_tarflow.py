"""``model:tarflow``: the layout (to [-1, 1), patchify, blocks of alternating order), its density as
a sum, and the reference's nvp switch with its second-moment buffer used for sampling only."""

from __future__ import annotations

import math

import pytest
import torch

import flowkit
from flowkit.plugins import make_plugins
from flowkit.testing import randomize_

NET = {"width": 16, "depth": 1, "head_dim": 8}


@pytest.fixture(scope="module")
def plugins():
    return make_plugins()


def tarflow(plugins, **params):
    return flowkit.build("model", "tarflow", plugins=plugins, in_shape=(1, 8, 8), blocks=3,
                         patchify={"use": "patchify", "patch": 2}, step={"net": NET}, **params).double()


def test_blocks_alternate_the_token_order_and_share_the_nvp_switch(plugins) -> None:
    ref = flowkit.ref("model", "tarflow", plugins=plugins, blocks=4, nvp=False)
    derived = ref.to_toml()["derived"]
    assert derived["step.order"] == ["identity", "flip", "identity", "flip"] and derived["step.nvp"] is False
    steps = [m for m in tarflow(plugins).modules() if type(m).__name__ == "TarFlowStep"]
    assert [s.flip for s in steps] == [False, True, False]


def test_the_density_is_the_prior_plus_every_log_det_summed_with_the_map_to_minus_one_one(plugins) -> None:
    model = tarflow(plugins)
    randomize_(model, 0.05, torch.Generator().manual_seed(0))
    model.eval()
    y = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    (z,), logabsdet = model.encode(y)
    assert z.shape == (3, 4, 4, 4)
    steps = [m for m in model.modules() if type(m).__name__ == "TarFlowStep"]
    h = 2 * y - 1  # Rescale
    h = torch.nn.functional.unfold(h, 2, stride=2).reshape(3, 4, 4, 4)  # patchify: tokens of 4 features
    total = torch.full((3,), 64 * math.log(2), dtype=torch.float64)
    for s in steps:
        h, ld = s(h)
        total = total + ld
    torch.testing.assert_close(z, h)
    torch.testing.assert_close(logabsdet, total)
    gaussian = -0.5 * z.square().flatten(1).sum(1) - 0.5 * 64 * math.log(2 * math.pi)
    torch.testing.assert_close(model.log_prob(y), gaussian + total)


def test_without_nvp_the_second_moment_is_tracked_in_training_and_used_for_sampling_only(plugins) -> None:
    model = tarflow(plugins, nvp=False)
    randomize_(model, 0.05, torch.Generator().manual_seed(0))
    y = torch.rand(8, 1, 8, 8, dtype=torch.float64)
    assert torch.equal(model.var, torch.ones(4, 4, 4, dtype=torch.float64))
    model.eval()
    before = model.log_prob(y)
    model.train()
    model.log_prob(y).sum().backward()
    (z,), _ = model.encode(y)
    expected = torch.ones_like(model.var).lerp(z.detach().square().mean(0), 0.1)
    torch.testing.assert_close(model.var, expected)  # the reference's VAR_LR = 0.1
    assert "var" in model.state_dict()
    model.eval()
    torch.testing.assert_close(model.log_prob(y), before)  # no density term
    with torch.no_grad():
        model.var.fill_(4.0)
        torch.manual_seed(0)
        wide = model.sample(2, 1.0)
        torch.manual_seed(0)
        latent = model.flow.draw_top(2, 1.0)
        torch.testing.assert_close(wide, model.decode([2.0 * latent]))


def test_with_nvp_the_buffer_stays_one(plugins) -> None:
    model = tarflow(plugins)
    model.train()
    model.log_prob(torch.rand(4, 1, 8, 8, dtype=torch.float64)).sum().backward()
    assert torch.equal(model.var, torch.ones_like(model.var))
