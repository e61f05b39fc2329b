"""Each `flowkit.testing` check fails on a part that breaks its contract, and says by how much.

A check that passes everything proves nothing: here each one is handed a small part with one
planted defect (a log-det off by 1e-7, a float32 step in a float64 map, a missing log-scale
term, a dequantizer whose log q is 0.05 nats off, a term whose gradient leaks into another
group, ...) next to the correct part, which must pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from flowkit.contracts import DensityModel, Dequantizer, ImageDataset, Prior, Transform
from flowkit.contracts.decomposition import Decomposition
from flowkit.contracts.transform import zeros_logabsdet
from flowkit.testing import (
    check_dataset,
    check_decomposition,
    check_dequantizer,
    check_model,
    check_net,
    check_prior,
    check_transform,
    default_tolerances,
)

# -- transforms -----------------------------------------------------------------------------


class Scale(Transform):
    """z = x * exp(s), per channel; ``defect`` plants one bug."""

    def __init__(self, channels: int, defect: str = "") -> None:
        super().__init__()
        self.s = nn.Parameter(0.3 * torch.randn(channels, 1, 1, dtype=torch.float64))
        self.defect = defect

    def _logabsdet(self, x: Tensor) -> Tensor:
        total = (self.s.expand_as(x[0]).sum() * torch.ones(x.shape[0], dtype=torch.float64))
        return total + (1e-7 if self.defect == "logdet" else 0.0)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.defect == "float32":
            return (x.float() * torch.exp(self.s).float()).double(), self._logabsdet(x)
        z = x * torch.exp(self.s)
        if self.defect == "batch":
            z = z + 1e-6 * x.mean(0, keepdim=True)
        return z, self._logabsdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z * torch.exp(-self.s), -self._logabsdet(z)


@pytest.mark.parametrize("defect, message", [
    ("logdet", "logabsdet"),  # 1e-7 off: passed under the old hidden 100x tolerance (1e-4)
    ("float32", r"inverse\(forward\(x\)\) != x"),  # a float32 step in a float64 map, 1e-7 off
])
def test_check_transform_catches(defect, message):
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    check_transform(Scale(3), x)
    with pytest.raises(AssertionError, match=message):
        check_transform(Scale(3, defect), x)


def test_check_transform_catches_batch_statistics():
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    # Without the round trip, which the batch mean also breaks: the row check alone.
    with pytest.raises(AssertionError, match="depends on other rows"):
        check_transform(Scale(3, "batch"), x, inverse=False, jacobian=False)


def test_tolerances_are_used_as_given():
    assert default_tolerances(torch.float64) == (1e-10, 1e-8)
    assert default_tolerances(torch.float32) == (1e-5, 1e-4)
    # One given: exactly that one, the other 0 (not the dtype's default filled in).
    assert default_tolerances(torch.float64, atol=1e-6) == (1e-6, 0.0)
    assert default_tolerances(torch.float32, rtol=1e-3) == (0.0, 1e-3)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    # A 1e-7 log-det error fails at atol = rtol = 1e-8 and passes when the caller allows 1e-6.
    with pytest.raises(AssertionError):
        check_transform(Scale(3, "logdet"), x, atol=1e-8, rtol=1e-8)
    check_transform(Scale(3, "logdet"), x, atol=1e-6, rtol=0)


class OffInverse(Transform):
    """z = 2x; the inverse is off by ``x_error`` in x or ``logdet_error`` in its log-det."""

    def __init__(self, x_error: float = 0.0, logdet_error: float = 0.0) -> None:
        super().__init__()
        self.x_error, self.logdet_error = x_error, logdet_error

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logabsdet = torch.full((x.shape[0],), x[0].numel() * math.log(2.0), dtype=torch.promote_types(x.dtype, torch.float32))
        return 2 * x, logabsdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, logabsdet = z / 2 + self.x_error, -self.forward(z)[1] + self.logdet_error
        return x, logabsdet


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("defect, message", [
    ({"x_error": 1e-4}, r"inverse\(forward\(x\)\) != x"),  # a round trip off by 1e-4
    ({"x_error": 5e-5}, r"inverse\(forward\(x\)\) != x"),  # an inverse off by 5e-5
    ({"logdet_error": 5e-5}, "inverse logabsdet"),          # the inverse's log-det off by 5e-5
])
def test_an_explicit_atol_is_the_whole_allowance(dtype, defect, message):
    # Values of order 3 and a log-det of order 20: under the float32 default rtol (1e-4) filled
    # in beside atol = 1e-6, each of these errors used to pass.
    x = (3 + torch.rand(2, 3, 2, 2)).to(dtype)
    check_transform(OffInverse(), x, atol=1e-6, jacobian=False)
    with pytest.raises(AssertionError, match=message):
        check_transform(OffInverse(**defect), x, atol=1e-6, jacobian=False)
    # The same part passes only when the caller allows the error, in the units given.
    size = max(defect.values())
    check_transform(OffInverse(**defect), x, atol=2 * size, jacobian=False)


# -- decompositions -------------------------------------------------------------------------


class Subsample(Decomposition):
    """Glow's squeeze layout split into sub-pixel (0, 0) and the rest, times ``gain``."""

    def __init__(self, gain: float = 1.0, orthonormal: bool = True) -> None:
        super().__init__()
        self.gain = gain
        self.orthonormal = orthonormal

    def output_shape(self, in_shape):
        c, h, w = in_shape
        return (c, h // 2, w // 2), (3 * c, h // 2, w // 2)

    def split(self, x):
        b, c, h, w = x.shape
        s = torch.nn.functional.pixel_unshuffle(x * self.gain, 2).view(b, c, 4, h // 2, w // 2)
        return s[:, :, 0], s[:, :, 1:].reshape(b, 3 * c, h // 2, w // 2), zeros_logabsdet(x)

    def merge(self, low, detail):
        b, c, h, w = low.shape
        s = torch.cat([low.unsqueeze(2), detail.view(b, c, 3, h, w)], dim=2).view(b, 4 * c, h, w)
        return torch.nn.functional.pixel_shuffle(s, 2) / self.gain, zeros_logabsdet(low)


def test_check_decomposition_catches_a_gain_with_a_zero_logdet():
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    check_decomposition(Subsample(), x)
    with pytest.raises(AssertionError, match="brute-force"):
        check_decomposition(Subsample(gain=2.0, orthonormal=False), x)


# -- nets -----------------------------------------------------------------------------------


class Conv(nn.Module):
    def __init__(self, defect: str = "") -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 + 3, 5, 3, padding=1).double()
        self.defect = defect

    def forward(self, x, context=None):
        if context is None or self.defect == "ignores context":
            context = torch.zeros(x.shape[0], 3, *x.shape[2:], dtype=x.dtype)
        out = self.conv(torch.cat([x, context], dim=1))
        return out - out.mean(0) if self.defect == "batch norm" else out


@pytest.mark.parametrize("defect, message", [("ignores context", "context"), ("batch norm", "other rows")])
def test_check_net_catches(defect, message):
    x, context = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 3, 4, 4, dtype=torch.float64)
    check_net(Conv(), x, context, out_channels=5)
    with pytest.raises(AssertionError, match=message):
        check_net(Conv(defect), x, context, out_channels=5)


# -- priors ---------------------------------------------------------------------------------


class Diagonal(Prior):
    def __init__(self, defect: str = "") -> None:
        super().__init__()
        self.shape = (2, 2, 2)
        self.loc = nn.Parameter(0.5 * torch.randn(self.shape, dtype=torch.float64))
        self.log_scale = nn.Parameter(0.5 * torch.randn(self.shape, dtype=torch.float64))
        self.defect = defect

    def log_prob(self, z, context=None):
        u = (z - self.loc) * torch.exp(-self.log_scale)
        log_scale = 0 if self.defect == "no log-scale term" else self.log_scale
        return (-0.5 * u.square() - log_scale - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)

    def sample(self, n, context=None, temperature=1.0):
        if self.defect == "ignores temperature" and temperature:
            temperature = 1.0
        scale = torch.exp(self.log_scale) * (1.1 if self.defect == "wide samples" else 1.0)
        return self.loc + temperature * scale * torch.randn(n, *self.shape, dtype=torch.float64)


@pytest.mark.parametrize("defect, message", [
    ("no log-scale term", "log_prob at the mean"),
    ("ignores temperature", "temperature 0.5"),
    ("wide samples", "variance"),
])
def test_check_prior_catches(defect, message):
    check_prior(Diagonal(), diagonal_gaussian=True)
    with pytest.raises(AssertionError, match=message):
        check_prior(Diagonal(defect))


# -- dequantizers ---------------------------------------------------------------------------


class Uniform(Dequantizer):
    def __init__(self, defect: str = "") -> None:
        super().__init__()
        self.defect = defect

    def forward(self, x, n_bits):
        u = torch.rand(x.shape, dtype=torch.float64)
        if self.defect == "reaches the next bin":
            u = torch.where(x == 2**n_bits - 1, torch.ones_like(u), u)
        log_q = torch.zeros(x.shape[0], dtype=torch.float64)
        if self.defect == "log q off by 0.05":
            log_q = log_q + 0.05
        return (x.double() + u) / 2**n_bits, log_q


@pytest.mark.parametrize("defect, message", [
    ("reaches the next bin", r"outside \[0, 1\)|bin"),
    ("log q off by 0.05", "importance sampling"),
])
def test_check_dequantizer_catches(defect, message):
    x = torch.tensor([0.0, 7.0, 3.0, 5.0]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    x[1] = 7
    check_dequantizer(Uniform(), x, 3)
    with pytest.raises(AssertionError, match=message):
        check_dequantizer(Uniform(defect), x, 3)


# -- models ---------------------------------------------------------------------------------


class TwoTerms(DensityModel):
    """A diagonal Gaussian on y: term ``a`` on channel 0, ``b`` on channel 1, own parameters."""

    def __init__(self, defect: str = "") -> None:
        super().__init__()
        self.in_shape = (2, 2, 2)
        self.mean = nn.ParameterDict({k: nn.Parameter(torch.rand(1, 2, 2, dtype=torch.float64)) for k in "ab"})
        self.defect = defect

    def log_prob_terms(self, y: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
        out = {}
        for index, name in enumerate("ab"):
            if name not in names:
                continue
            mean = self.mean[name]
            if self.defect == "gradient leaks" and name == "b":
                mean = mean + 0.1 * self.mean["a"]
            if self.defect == "draws noise":
                mean = mean + 0 * torch.rand(())
            out[name] = -0.5 * (y[:, index : index + 1] - mean).square().flatten(1).sum(1) - 2 * math.log(2 * math.pi)
        return out

    def log_prob_parts(self, y):
        return self.log_prob_terms(y, ["a", "b"])

    def part_dims(self):
        return {"a": 4, "b": 4 if self.defect != "dims" else 3}

    def parameter_groups(self):
        return {name: [self.mean[name]] for name in "ab"}

    def sample(self, n, temperature=1.0):
        mean = torch.cat([self.mean["a"], self.mean["b"]]).detach()
        return mean + temperature * torch.randn(n, *self.in_shape, dtype=torch.float64)


@pytest.mark.parametrize("defect, message", [
    ("dims", "add up to"),
    ("gradient leaks", "reaches"),
    ("draws noise", "random state"),
])
def test_check_model_catches(defect, message):
    y = torch.rand(3, 2, 2, 2, dtype=torch.float64)
    check_model(TwoTerms(), y)
    with pytest.raises(AssertionError, match=message):
        check_model(TwoTerms(defect), y)


# -- datasets -------------------------------------------------------------------------------


def test_check_dataset_catches_values_above_max_value():
    images = np.full((2, 1, 4, 4), 16, dtype=np.uint8)
    check_dataset(ImageDataset("digits", images, images, max_value=16))
    with pytest.raises(AssertionError, match="above max_value"):
        check_dataset(ImageDataset("digits", images + 1, images, max_value=16))


def test_a_dataset_refuses_labels_outside_its_classes_or_of_one_split_only():
    images = np.zeros((2, 1, 2, 2), dtype=np.uint8)
    labels = np.array([0, 1], dtype=np.int64)
    ImageDataset("ok", images, images, train_labels=labels, test_labels=labels, classes=("a", "b"))
    with pytest.raises(ValueError, match=r"train labels range over 0..2, outside the 2 classes"):
        ImageDataset("bad", images, images, train_labels=labels + np.array([0, 1]), test_labels=labels,
                     classes=("a", "b"))
    with pytest.raises(ValueError, match="labels for one split only"):
        ImageDataset("bad", images, images, train_labels=labels, classes=("a", "b"))
    with pytest.raises(ValueError, match="must be int64"):
        ImageDataset("bad", images, images, train_labels=labels.astype(np.uint8), test_labels=labels,
                     classes=("a", "b"))
