"""The objective: bits/dim of the whole image or of one term, and the importance-weighted estimate,
against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from flowkit import DensityModel, Dequantizer
from flowkit.runs.objective import Objective


class _Box(DensityModel):
    """The uniform density on [0, 1)^2 (one channel, 1 x 2 pixels): log p = 0, as two terms."""

    in_shape = (1, 1, 2)

    def log_prob_parts(self, y):
        zero = torch.zeros(y.shape[0], dtype=torch.float64)
        return {"a": zero, "b": zero}

    def part_dims(self):
        return {"a": 1, "b": 1}


class _Fixed(Dequantizer):
    """Returns preset log q values in turn, with y the centre of x's bin."""

    def __init__(self, log_qs) -> None:
        super().__init__()
        self.log_qs = list(log_qs)

    def forward(self, x, n_bits):
        return (x.double() + 0.5) / 2**n_bits, self.log_qs.pop(0)


def test_bits_per_dim_of_the_uniform_box_is_n_bits_plus_log_q():
    # log p = 0 on [0, 1)^2, 3 bits: bpd = (0 + 2 * 3 log 2 + log q) / (2 log 2) = 3 + log q / (2 log 2).
    objective = Objective(_Box(), _Fixed([torch.tensor([0.0, -1.0])]), n_bits=3, num_dims=2)
    loss, terms = objective.loss(torch.zeros(2, 1, 1, 2, dtype=torch.uint8))
    assert set(terms) == {"a", "b"}
    assert loss.item() == pytest.approx(3.0 + (-0.5) / (2 * math.log(2)), abs=1e-12)


def test_iw_estimate_against_a_hand_computed_log_mean_exp():
    log_qs = [[0.1, -2.0], [0.5, 1.0], [-0.3, 0.0]]
    x = torch.zeros(2, 1, 1, 2, dtype=torch.uint8)
    objective = Objective(_Box(), _Fixed([torch.tensor(q, dtype=torch.float64) for q in log_qs]), n_bits=3, num_dims=2)
    estimate = objective.iw_log_likelihood(x, 3)
    offset = 2 * 3 * math.log(2)
    for i in range(2):
        by_hand = math.log(sum(math.exp(-q[i] - offset) for q in log_qs) / 3)
        assert estimate[i].item() == pytest.approx(by_hand, abs=1e-12)
        elbo = sum(-q[i] - offset for q in log_qs) / 3
        assert estimate[i].item() >= elbo  # Jensen: the k-sample bound is at least the ELBO


def test_iw_estimate_needs_a_sample():
    with pytest.raises(ValueError, match="must be >= 1"):
        Objective(_Box(), _Fixed([]), n_bits=3, num_dims=2).iw_log_likelihood(torch.zeros(1, 1, 1, 2), 0)


def test_terms_alone_need_a_model_with_independent_terms():
    with pytest.raises(TypeError, match="no terms that can be computed alone"):
        Objective(_Box(), _Fixed([]), n_bits=3, num_dims=2).terms(torch.zeros(1, 1, 1, 2), ["a"])


def test_saturate_counts_images_with_a_non_finite_value_and_maps_every_value_into_the_unit_interval():
    from flowkit.runs.sampling import saturate

    inf, nan = float("inf"), float("nan")
    y = torch.tensor([[0.5, 0.25], [inf, 0.5], [-inf, nan], [-0.5, 1.5]]).view(4, 1, 1, 2)
    out, overflowed = saturate(y)
    assert overflowed == 2  # rows 1 and 2; row 3 is finite, merely out of range
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
    assert out.flatten(1).tolist() == [[0.5, 0.25], [below_one, 0.5], [0.0, below_one], [0.0, below_one]]
