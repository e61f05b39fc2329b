"""Flow++ against its generative process: z drawn from the prior, mapped to an image, and the
density by the change of variables with the log-det of the inverse taken by brute force.

The class docstring of plugins/models/flowpp.py: ``log p(y) = log N(z) + Σ log|det|`` with
``z`` the latent of the whole flow (logit preprocessing, coupling steps and squeezes) and
no factoring-out. So for ``z ~ prior`` and ``y = f⁻¹(z)``,

    log p(y) = log π(z) - log|det ∂f⁻¹/∂z|,

where the Jacobian of the inverse comes from autograd, not from any log-det the model or
its parts compute. The mixlogistic couplings are built with a bisection tolerance of 1e-12,
so the inverse is exact to float64 round-off.
"""

from __future__ import annotations

import pytest
import torch

import flowkit
from flowkit.testing import jacobian_logabsdet, randomize_

IN_SHAPE = (1, 4, 4)
LAYOUT = ["checkerboard", "checkerboard", "squeeze", "channel"]
COLUMNS_LAYOUT = ["columns", "columns", "squeeze", "channel"]  # the paper preset's split, as released
GATED = {"use": "gated_resnet", "hidden": 8, "blocks": 1, "heads": 2, "dropout": 0.0}
COUPLINGS = {
    "mixlogistic": {"use": "mixlogistic", "components": 3, "tol": 1e-12, "net": GATED},
    "affine": {"use": "affine", "net": GATED},  # the paper's ablation
}


def tiny_model(coupling: str, layout: list[str] = LAYOUT):
    model = flowkit.build("model", "flowpp", in_shape=IN_SHAPE, layout=layout,
                          step={"use": "glow", "coupling": COUPLINGS[coupling]}).double()
    model.initialize(torch.rand(16, *IN_SHAPE, dtype=torch.float64))
    randomize_(model, 0.1)  # zero-initialised output layers would make the couplings identities
    return model.eval()


@pytest.mark.parametrize("layout", [LAYOUT, COLUMNS_LAYOUT], ids=["checkerboard", "columns"])
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_log_prob_is_the_prior_minus_the_brute_force_log_det_of_the_inverse(coupling, layout):
    model = tiny_model(coupling, layout)
    z = model.prior.sample(3)
    y, _ = model.flow.decode([z])

    def inverse(v):
        return model.flow.decode([v.reshape(-1, *z.shape[1:])])[0].flatten(1)

    log_det = jacobian_logabsdet(inverse, z.flatten(1))
    expected = model.prior.log_prob(z) - log_det
    torch.testing.assert_close(model.log_prob(y), expected, atol=1e-10, rtol=1e-8)
    assert model.log_prob_parts(y).keys() == {"total"}


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_encode_finds_the_drawn_latent(coupling):
    model = tiny_model(coupling)
    z = model.prior.sample(2)
    y, _ = model.flow.decode([z])
    found, _ = model.encode(y)
    torch.testing.assert_close(found, z, atol=1e-10, rtol=1e-8)


def test_sample_at_temperature_zero_is_the_image_of_the_prior_mean_unclamped():
    model = tiny_model("mixlogistic")
    expected, _ = model.flow.decode([model.prior.mean(2)])
    torch.testing.assert_close(model.sample(2, temperature=0.0), expected, atol=1e-10, rtol=1e-8)
