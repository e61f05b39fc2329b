"""step:realnvp: RealNVP's coupling layer, the coupling then actnorm where the reference normalises by batch."""

from __future__ import annotations

import torch

import flowkit
from flowkit.testing import check_transform, randomize_

NET = {"use": "realnvp_resnet", "hidden": 8, "blocks": 1}


def test_the_step_is_the_coupling_then_actnorm_initialised_on_its_output():
    step = flowkit.build("step", "realnvp", in_shape=(4, 4, 4), coupling={"net": NET}).double()
    coupling, actnorm = step.transforms
    assert type(coupling).__name__ == "AffineCoupling" and coupling.scale_fn == "scaled_tanh"
    assert type(actnorm).__name__ == "ActNorm"
    x = 2.0 * torch.randn(64, 4, 4, 4, dtype=torch.float64) + 1.0
    step.initialize(x)
    z, logabsdet = step(x)
    # The normalisation RealNVP's batch norm does on the first batch, actnorm does once, from data.
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-5,
                               rtol=0)
    inner, inner_logabsdet = coupling(x)
    torch.testing.assert_close(logabsdet, inner_logabsdet + actnorm(inner)[1])
    randomize_(step)
    check_transform(step, x[:2])


def test_without_actnorm_the_step_is_the_coupling():
    step = flowkit.build("step", "realnvp", in_shape=(4, 4, 4), coupling={"net": NET}, actnorm=False)
    assert [type(t).__name__ for t in step.transforms] == ["AffineCoupling"]
