"""flowkit.models.preprocess: the fixed maps a layout starts with (Glow's centring, RealNVP's logit)."""

from __future__ import annotations

import math

import pytest
import torch

import flowkit
from flowkit.models import Centre, Logit
from flowkit.testing import check_transform


def test_logit_is_the_transform_contract_with_its_stated_log_det():
    y = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    logit = Logit(0.05)
    check_transform(logit, y)
    z, logabsdet = logit(y)
    p = 0.05 + 0.9 * y
    torch.testing.assert_close(z, torch.log(p / (1 - p)))
    torch.testing.assert_close(logabsdet, (math.log(0.9) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1))


def test_centre_shifts_by_a_half_and_ignores_the_context_it_is_built_for():
    y = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    check_transform(Centre(), y)
    centre = Centre(context_shape=(3,))
    context = torch.randn(2, 3, dtype=torch.float64)
    z, logabsdet = centre(y, context)
    assert torch.equal(z, y - 0.5) and torch.equal(logabsdet, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(flowkit.ShapeError, match="without context"):
        centre(y)


def test_logit_refuses_an_alpha_outside_zero_to_a_half():
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        Logit(0.5)
