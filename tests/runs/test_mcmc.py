"""Annealed sampling by MCMC: the target against closed forms, NUTS against known moments, and
the errors a user can meet."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import Tensor
from torch.distributions import Normal

import flowkit
from flowkit.contracts.model import Generated, LatentLevel, LatentLevels
from flowkit.errors import FlowkitError
from flowkit.runs.mcmc import (
    MCMCSettings, annealed_log_target, annealed_sample, check_can_anneal, nuts, require_latent_levels,
)


DTYPE = torch.float64


class ToyFlow:
    """A 2-D flow x = b + map(z), z ~ N(0, I), with every density in closed form; one level."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.a = torch.tensor([0.5, 2.0], dtype=DTYPE)
        self.b = torch.tensor([1.0, -1.0], dtype=DTYPE)
        self.L = torch.tensor([[1.0, 0.0], [1.2, 0.5]], dtype=DTYPE)  # correlated Gaussian

    def to_x(self, z: Tensor) -> Tensor:
        return self.b + (self.a * torch.sinh(z) if self.kind == "sinh" else z @ self.L.T)

    def logabsdet(self, z: Tensor) -> Tensor:
        if self.kind == "sinh":
            return torch.log(self.a * torch.cosh(z)).sum(-1)
        return torch.log(torch.diagonal(self.L)).sum().expand(len(z))

    def log_prob_x(self, x: Tensor) -> Tensor:
        """log p(x), computed on the data side: z(x) and |dz/dx| (sinh only)."""
        u = (x - self.b) / self.a
        return (Normal(0.0, 1.0).log_prob(torch.asinh(u)) - torch.log(self.a) - 0.5 * torch.log1p(u**2)).sum(-1)

    def latent_levels(self) -> list[str]:
        return ["x"]

    def latent_level(self, name: str, given: Tensor | None, n: int) -> LatentLevel:
        def generate(z: Tensor) -> Generated:
            return Generated(self.to_x(z), Normal(0.0, 1.0).log_prob(z).sum(-1), self.logabsdet(z))

        return LatentLevel(name, (2,), lambda temperature: temperature * torch.randn(n, 2, dtype=DTYPE), generate)


def sinh_target_moments(temperature: float, sign: float = 1.0) -> tuple[Tensor, Tensor]:
    """Mean and variance of z under γ·log N(z) + sign·(1 − γ)·log|det ∂x/∂z|, by quadrature
    (sign = −1: the target with the log-det's sign flipped)."""
    flow, gamma = ToyFlow("sinh"), 1.0 / temperature**2
    z = torch.linspace(-8, 8, 20001, dtype=DTYPE)[:, None]
    log_weights = gamma * Normal(0.0, 1.0).log_prob(z) + sign * (1 - gamma) * torch.log(flow.a * torch.cosh(z))
    weights = torch.softmax(log_weights, 0)
    mean = (weights * z).sum(0)
    return mean, (weights * (z - mean) ** 2).sum(0)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_annealed_target_is_the_density_raised_to_gamma_pulled_back(temperature: float) -> None:
    flow, gamma = ToyFlow("sinh"), 1.0 / temperature**2
    z = 1.5 * torch.randn(16, 2, dtype=DTYPE)
    log_target = annealed_log_target(flow.latent_level("x", None, 16), gamma)(z)
    by_hand = gamma * Normal(0.0, 1.0).log_prob(z).sum(-1) + (1 - gamma) * torch.log(flow.a * torch.cosh(z)).sum(-1)
    torch.testing.assert_close(log_target, by_hand, atol=1e-12, rtol=1e-12)
    # The same target seen from the data side: π(z)·|dz/dx| = p(x)^γ, exactly (no constant left).
    torch.testing.assert_close(log_target - flow.logabsdet(z), gamma * flow.log_prob_x(flow.to_x(z)),
                               atol=1e-10, rtol=1e-10)
    if temperature == 1.0:  # the model's own latent density: plain sampling's distribution
        torch.testing.assert_close(log_target, Normal(0.0, 1.0).log_prob(z).sum(-1), atol=1e-12, rtol=0)


def test_nuts_with_the_authors_settings_finds_the_annealed_sinh_flow() -> None:
    # From a start far off (z = 2), 10 adaptation + 30 iterations on 300 independent 2-D chains.
    torch.manual_seed(0)
    flow, temperature, n = ToyFlow("sinh"), 0.7, 300
    z, report = nuts(annealed_log_target(flow.latent_level("x", None, n), 1 / temperature**2),
                     torch.full((n, 2), 2.0, dtype=DTYPE), MCMCSettings())
    mean, variance = sinh_target_moments(temperature)
    _, wrong_sign_variance = sinh_target_moments(temperature, sign=-1.0)
    assert (variance - wrong_sign_variance).abs().min() > 0.3  # the check below tells the two apart
    torch.testing.assert_close(z.mean(0), mean, atol=0.15, rtol=0)
    torch.testing.assert_close(z.var(0), variance, atol=0, rtol=0.25)
    assert report.dims == 2 and report.divergences == 0 and report.gradient_evals > 40


def ks_statistic(a: Tensor, b: Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic of 1-D samples."""
    points = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, points, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, points, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


def test_at_temperature_one_the_chain_leaves_the_models_distribution_unchanged() -> None:
    torch.manual_seed(2)
    flow, n = ToyFlow("sinh"), 400
    level = flow.latent_level("x", None, n)
    z, _ = nuts(annealed_log_target(level, 1.0), level.draw(1.0), MCMCSettings())
    chain, fresh = flow.to_x(z), flow.to_x(level.draw(1.0))
    critical = 1.95 * math.sqrt(2 / n)  # two-sample KS at level 0.001
    for dim in range(2):
        assert ks_statistic(chain[:, dim], fresh[:, dim]) < critical
    # The test can fail: the same chain on the latent density to the power 4 (std 1/2) is caught.
    z, _ = nuts(lambda z: 4 * annealed_log_target(level, 1.0)(z), level.draw(1.0), MCMCSettings())
    assert max(ks_statistic(flow.to_x(z)[:, dim], fresh[:, dim]) for dim in range(2)) > critical


def test_nuts_recovers_a_correlated_gaussian_and_adapts_to_the_target_acceptance() -> None:
    torch.manual_seed(1)
    flow, temperature, n = ToyFlow("affine"), 0.8, 300
    z, report = nuts(annealed_log_target(flow.latent_level("x", None, n), 1 / temperature**2),
                     torch.full((n, 2), 3.0, dtype=DTYPE), MCMCSettings(warmup=50, samples=20))
    x = flow.to_x(z)
    # An affine map: the annealed target is N(b, T² L Lᵀ).
    torch.testing.assert_close(x.mean(0), flow.b, atol=0.15, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), temperature**2 * flow.L @ flow.L.T, atol=0.25, rtol=0)
    assert 0.45 < report.accept_prob < 0.85, report


def test_adaptation_starts_at_the_given_step() -> None:
    # pyro would search a step first; with no adaptation iterations the step stays as given.
    flow = ToyFlow("affine")
    level = flow.latent_level("x", None, 4)
    _, report = nuts(annealed_log_target(level, 1.0), level.draw(1.0), MCMCSettings(warmup=0, samples=2, step=0.0123))
    assert report.step_size == 0.0123
    _, adapted = nuts(annealed_log_target(level, 1.0), level.draw(1.0), MCMCSettings(warmup=5, samples=2, step=0.0123))
    assert adapted.step_size != 0.0123


def test_a_seed_gives_the_same_samples() -> None:
    flow, settings = ToyFlow("sinh"), MCMCSettings(warmup=3, samples=3, max_depth=4)
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        draws.append(annealed_sample(flow, 5, 0.8, settings)[0])
    assert torch.equal(draws[0], draws[1])


def test_a_model_without_latent_levels_is_named_in_the_error() -> None:
    model = flowkit.build("model", "flowpp", in_shape=(1, 4, 4), layout=["checkerboard"])
    assert not isinstance(model, LatentLevels)
    with pytest.raises(FlowkitError, match="model flowpp cannot be sampled by MCMC.*wavelet_flow and multiscale"):
        require_latent_levels(model, "flowpp")


def test_bad_temperatures_and_settings_are_refused() -> None:
    with pytest.raises(FlowkitError, match="temperatures > 0.*got 0"):
        check_can_anneal([0.7, 0.0])
    with pytest.raises(FlowkitError, match="--mcmc-samples = 0 must be >= 1; --mcmc-step = -1"):
        MCMCSettings(samples=0, step=-1.0)


def test_missing_pyro_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "pyro" or m.startswith("pyro.")]:
        monkeypatch.setitem(sys.modules, name, None)  # import pyro... raises ImportError
    monkeypatch.setitem(sys.modules, "pyro", None)
    with pytest.raises(FlowkitError, match=r"needs pyro-ppl.*pip install -e '\.\[mcmc\]'"):
        check_can_anneal([1.0])

