"""coupling:mixlogistic: round trips (tails included), log-det against autograd, gradients at extremes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import flowkit
from flowkit.plugins import make_plugins
from flowkit.testing import check_gradients, check_transform, jacobian_logabsdet, randomize_
from flowkit_plugins.couplings.mixlogistic import (
    InverseDidNotConverge,
    invert_logit_mixture_cdf,
    logit_mixture_cdf,
    split_net_output,
)

MODULES = ["flowkit_plugins.couplings.mixlogistic", "flowkit_plugins.nets.gated_resnet"]
NET = {"use": "gated_resnet", "hidden": 8, "blocks": 1, "heads": 2, "dropout": 0.0}


@pytest.fixture(scope="module")
def plugins():
    return make_plugins(entry_points=False, extra=MODULES)


def make(plugins, shape=(2, 4, 4), scale=0.3, **kwargs):
    kwargs.setdefault("net", NET)
    kwargs.setdefault("components", 3)
    # The bisection inverse is exact only to its tol (1e-6 by default); 1e-12 lets check_transform
    # hold the round trip and log-dets to its float64 defaults (atol 1e-10, rtol 1e-8).
    kwargs.setdefault("tol", 1e-12)
    t = flowkit.build("coupling", "mixlogistic", plugins=plugins, in_shape=shape, **kwargs).double()
    return randomize_(t, scale).eval()


def random_mixture(shape, k, spread=3.0, dtype=torch.float64):
    log_pi = F.log_softmax(spread * torch.randn(shape[0], k, *shape[1:], dtype=dtype), dim=1)
    mu = spread * torch.randn(shape[0], k, *shape[1:], dtype=dtype)
    log_s = (2.0 * torch.randn(shape[0], k, *shape[1:], dtype=dtype)).clamp(-7, 7)
    return log_pi, mu, log_s


@pytest.mark.parametrize("mask", ["channel", "checkerboard", "columns"])
@pytest.mark.parametrize("parity", [0, 1])
def test_round_trip_and_logdet_match_autograd_jacobian(plugins, mask, parity):
    t = make(plugins, mask=mask, parity=parity)
    x = 3.0 * torch.randn(2, 2, 4, 4, dtype=torch.float64)
    check_transform(t, x)
    z, _ = t(x)
    assert not torch.allclose(z, x), "the randomized coupling should change its input"


def test_default_tol_round_trip_is_within_that_tol(plugins):
    t = make(plugins, mask="checkerboard", tol=1e-6)
    x = 3.0 * torch.randn(2, 2, 4, 4, dtype=torch.float64)
    # The bisection stops once its bracket is narrower than tol = 1e-6, so x comes back within
    # 1e-6 (not 1e-10); the log-dets are evaluated at x and x_back, and differ by
    # |d logabsdet / dx| * 1e-6 per entry, well inside 1e-5 here.
    check_transform(t, x, atol=1e-6, rtol=0, jacobian=False)
    z, logabsdet = t(x)
    x_back, inv_logabsdet = t.inverse(z)
    assert (x_back - x).abs().max() > 0, "tol = 1e-6 should leave a visible bisection error"
    torch.testing.assert_close(inv_logabsdet, -logabsdet, atol=1e-5, rtol=0)


def test_channel_mask_with_odd_channels(plugins):
    check_transform(make(plugins, shape=(3, 2, 2), mask="channel", parity=1), torch.randn(2, 3, 2, 2, dtype=torch.float64))


@pytest.mark.parametrize("parity", [0, 1])
def test_checkerboard_transforms_only_the_other_colour(plugins, parity):
    t = make(plugins, shape=(1, 4, 4), mask="checkerboard", parity=parity)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    z, _ = t(x)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    conditioning = (rows + cols) % 2 == parity
    torch.testing.assert_close(z[:, 0][:, conditioning], x[:, 0][:, conditioning], atol=0, rtol=0)
    assert (z[:, 0][:, ~conditioning] != x[:, 0][:, ~conditioning]).all()


@pytest.mark.parametrize("parity", [0, 1])
def test_columns_condition_on_the_halves_of_flowpps_released_checkerboard_split(plugins, parity):
    """aravindsrinivas/flowpp flows/flows.py CheckerboardSplit: reshape (B, H, W/2, 2, C) and
    unstack, so (a, b) = (even columns, odd columns); the coupling conditions on a (TupleFlip
    swaps them for the next step, which flowkit's alternating parity does)."""
    t = make(plugins, shape=(1, 4, 4), mask="columns", parity=parity)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    z, _ = t(x)
    this, that = x[..., 0::2], x[..., 1::2]
    cond, trans = (this, that) if parity == 0 else (that, this)
    z_cond, z_trans = (z[..., 0::2], z[..., 1::2]) if parity == 0 else (z[..., 1::2], z[..., 0::2])
    torch.testing.assert_close(z_cond, cond, atol=0, rtol=0)
    assert (z_trans != trans).all()
    # What the net sees is the conditioning half itself, compact: (B, C, H, W/2).
    seen = []
    t.net.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    t(x)
    torch.testing.assert_close(seen[0], cond, atol=0, rtol=0)


def test_round_trip_far_in_the_tails(plugins):
    t = make(plugins, scale=0.5)
    x = torch.tensor([-1e3, -200.0, -50.0, -12.0, 12.0, 50.0, 200.0, 1e3], dtype=torch.float64)
    x = x.repeat(8).view(2, 2, 4, 4)
    z, logabsdet = t(x)
    assert torch.isfinite(z).all() and torch.isfinite(logabsdet).all()
    x_back, inv_logabsdet = t.inverse(z)
    # tol = 1e-12 plus the solver's 4 ulps of |x| (1e3 * 4 * 2.2e-16 = 8.9e-13).
    torch.testing.assert_close(x_back, x, atol=1e-12 + 8 * torch.finfo(torch.float64).eps * 1e3, rtol=0)
    torch.testing.assert_close(inv_logabsdet, -logabsdet, atol=1e-10, rtol=1e-8)


def test_bisection_inverse_is_accurate_for_extreme_mixtures():
    shape = (64, 3, 1, 1)
    log_pi, mu, log_s = random_mixture(shape, 5, spread=6.0)
    x = (torch.rand(shape, dtype=torch.float64) - 0.5) * torch.logspace(-3, 3, 64, dtype=torch.float64).view(-1, 1, 1, 1)
    t, _ = logit_mixture_cdf(x, log_pi, mu, log_s)
    assert torch.isfinite(t).all()
    x_back = invert_logit_mixture_cdf(t, log_pi, mu, log_s, tol=1e-6, max_iter=200)
    allowed = 1e-6 + 8 * torch.finfo(torch.float64).eps * x.abs()
    assert ((x_back - x).abs() <= allowed).all(), (x_back - x).abs().max()


def test_float32_inverse_is_as_accurate_as_the_float32_map():
    # Where narrow components leave F flat, float32 rounding of t alone moves the root by
    # ulp(t) / g'(x): the test is the residual g(x_back) - t, which the solver controls.
    shape = (64, 3, 1, 1)
    log_pi, mu, log_s = random_mixture(shape, 5, spread=6.0, dtype=torch.float32)
    x = (torch.rand(shape) - 0.5) * torch.logspace(-3, 3, 64).view(-1, 1, 1, 1)
    t, _ = logit_mixture_cdf(x, log_pi, mu, log_s)
    x_back = invert_logit_mixture_cdf(t, log_pi, mu, log_s, tol=1e-6, max_iter=200)
    t_back, log_deriv = logit_mixture_cdf(x_back, log_pi, mu, log_s)
    eps = torch.finfo(torch.float32).eps
    slack = 64 * eps * (1 + t.abs()) + log_deriv.exp() * (1e-6 + 8 * eps * x_back.abs())
    assert ((t_back - t).abs() <= slack).all(), ((t_back - t).abs() / slack).max()
    # Where the map is well conditioned the root itself is recovered.
    good = log_deriv > -2
    assert ((x_back - x).abs()[good] <= 1e-4 * (1 + x.abs()[good])).all()


def test_overflowed_targets_come_back_non_finite_and_the_rest_converge():
    # Sampling a trained Wavelet Flow with mixture couplings (2,381 steps, T = 1, seed 1234):
    # one level-2 latent met a component at the log-scale clamp, the inverse took |x| from 56
    # to 2.7e4, and eleven steps later the values had passed float32's range; the next
    # bisection got a NaN bracket and raised, ending the run's evaluation. Such an entry must
    # come back non-finite, so that the run engine counts its image as overflowed.
    log_pi, mu, log_s = random_mixture((6, 2, 1, 1), 3)
    x = torch.randn(6, 2, 1, 1, dtype=torch.float64)
    t, _ = logit_mixture_cdf(x, log_pi, mu, log_s)
    t[0, 0], t[1, 1], t[2, 0] = float("inf"), float("-inf"), float("nan")
    x_back = invert_logit_mixture_cdf(t, log_pi, mu, log_s, tol=1e-9, max_iter=200)
    assert x_back[0, 0] == float("inf") and x_back[1, 1] == float("-inf") and x_back[2, 0].isnan()
    finite = torch.isfinite(t)
    torch.testing.assert_close(x_back[finite], x[finite], atol=1e-8, rtol=0)
    mu[3, :, 0] = float("nan")  # a net that was fed an overflowed value
    x_back = invert_logit_mixture_cdf(t, log_pi, mu, log_s, tol=1e-9, max_iter=200)
    assert x_back[3, 0].isnan() and torch.isfinite(x_back[3, 1])


def test_an_overflowed_sample_leaves_the_others_of_its_batch_exact(plugins):
    t = make(plugins, mask="channel")
    z = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    alone, _ = t.inverse(z[1:])
    z[0, 1, 2, 3] = float("inf")  # in the transformed half of the channel mask
    with torch.no_grad():
        x, _ = t.inverse(z)
    assert not torch.isfinite(x[0]).all()
    torch.testing.assert_close(x[1:], alone.detach(), atol=1e-10, rtol=0)


def test_inverse_that_cannot_converge_raises():
    log_pi, mu, log_s = random_mixture((4, 2, 1, 1), 3)
    t = torch.randn(4, 2, 1, 1, dtype=torch.float64)
    with pytest.raises(InverseDidNotConverge, match="max_iter = 2"):
        invert_logit_mixture_cdf(t, log_pi, mu, log_s, tol=1e-12, max_iter=2)


def test_logit_mixture_cdf_gradcheck():
    log_pi, mu, log_s = random_mixture((2, 1, 2, 2), 3)
    x = 2.0 * torch.randn(2, 1, 2, 2, dtype=torch.float64)
    inputs = [v.clone().requires_grad_() for v in (x, log_pi, mu, log_s)]
    assert torch.autograd.gradcheck(lambda *a: logit_mixture_cdf(*a), inputs)


def test_log_derivative_matches_autograd():
    log_pi, mu, log_s = random_mixture((3, 2, 2, 2), 4)
    x = (5.0 * torch.randn(3, 2, 2, 2, dtype=torch.float64)).requires_grad_()
    t, log_deriv = logit_mixture_cdf(x, log_pi, mu, log_s)
    (grad,) = torch.autograd.grad(t.sum(), x)
    torch.testing.assert_close(log_deriv, grad.log(), atol=1e-10, rtol=1e-10)


def test_identical_components_give_the_identity():
    h = torch.zeros(2, (2 + 3 * 4) * 3, 2, 2, dtype=torch.float64)
    _, _, log_pi, mu, log_s = split_net_output(h, 4)
    x = 4.0 * torch.randn(2, 3, 2, 2, dtype=torch.float64)
    t, log_deriv = logit_mixture_cdf(x, log_pi, mu, log_s)
    torch.testing.assert_close(t, x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(log_deriv, torch.zeros_like(x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("magnitude", [1e2, 1e4])
def test_gradients_are_finite_at_extreme_parameters(magnitude):
    k = 4
    h = (magnitude * torch.randn(2, (2 + 3 * k) * 2, 2, 2, dtype=torch.float32)).requires_grad_()
    x = torch.tensor([-1e4, -30.0, 0.0, 30.0, 1e4, 3.0, -3.0, 1e-3]).repeat(2).view(2, 2, 2, 2).requires_grad_()
    a, b, log_pi, mu, log_s = split_net_output(h, k)
    t, log_deriv = logit_mixture_cdf(x, log_pi, mu, log_s)
    y = t * torch.exp(a) + b
    loss = (y.square().sum() - (log_deriv + a).sum()) * 1e-6
    loss.backward()
    assert torch.isfinite(y).all() and torch.isfinite(log_deriv).all()
    assert torch.isfinite(h.grad).all() and torch.isfinite(x.grad).all()


def test_every_parameter_gets_a_finite_gradient(plugins):
    t = make(plugins, mask="checkerboard")
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    z, logabsdet = t(x)
    check_gradients(t, -(logabsdet - 0.5 * z.square().sum(dim=(1, 2, 3))).mean())


def test_context_is_used_and_checked(plugins):
    t = make(plugins, mask="checkerboard", context_shape=(3, 4, 4))
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    context = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    check_transform(t, x, context)
    assert not torch.allclose(t(x, context)[0], t(x, context + 1.0)[0])
    with pytest.raises(flowkit.ShapeError):
        t(x)
    with pytest.raises(flowkit.ShapeError):
        make(plugins)(x, context)


def test_vector_context_with_a_channel_mask(plugins):
    t = make(plugins, mask="channel", context_shape=(5,))
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    context = torch.randn(2, 5, dtype=torch.float64)
    z, logabsdet = t(x, context)
    x_back, _ = t.inverse(z, context)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)
    brute = jacobian_logabsdet(lambda v, c: t(v, c)[0], x, context)
    torch.testing.assert_close(logabsdet, brute, atol=1e-10, rtol=1e-8)


def test_bad_shapes_are_explained(plugins):
    with pytest.raises(flowkit.ShapeError, match="even width"):
        make(plugins, shape=(2, 4, 3), mask="checkerboard")
    with pytest.raises(flowkit.ShapeError, match="cannot split 1 channel"):
        make(plugins, shape=(1, 4, 4), mask="channel")
    with pytest.raises(flowkit.ShapeError, match=r"expected input of shape \(B, 2, 4, 4\)"):
        make(plugins)(torch.randn(2, 2, 4, 6, dtype=torch.float64))


class _Answers(torch.nn.Module):
    """A net that answers a fixed bfloat16 output, as a net under bf16 autocast would."""

    def __init__(self, h):
        super().__init__()
        self.h = h

    def forward(self, x, context=None):
        return self.h


def test_bf16_autocast_leaves_the_mixture_in_float32(plugins):
    # With the net's (bf16) answer fixed, autocast must change nothing: the CDF, its inverse and
    # the log-det run in float32. Computing them in bf16 would be off by about 1e-2.
    t = flowkit.build("coupling", "mixlogistic", plugins=plugins, in_shape=(2, 4, 4), components=3, net=NET).eval()
    randomize_(t, 0.3)
    x = torch.randn(2, 2, 4, 4)
    cond, _ = t._halves.split(x, t.cond_is_even_col)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = t.net(cond)
    assert h.dtype == torch.bfloat16
    t.net = _Answers(h)
    z32, logabsdet32 = t(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, logabsdet = t(x)
        _, inv_logabsdet = t.inverse(z)
    assert z.dtype == torch.float32 and logabsdet.dtype == torch.float32 and inv_logabsdet.dtype == torch.float32
    torch.testing.assert_close(z, z32, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logabsdet, logabsdet32, atol=1e-6, rtol=1e-6)


@settings(deadline=None, max_examples=25)
@given(
    k=st.integers(1, 6),
    spread=st.floats(0.1, 8.0),
    magnitude=st.floats(1e-2, 1e3),
    seed=st.integers(0, 2**16),
)
# Found by hypothesis: for 87 of the 101 points the logit-CDF is nearly flat (a component of
# weight e^-6.35 and scale e^-7 at 0.10, the others far away), so the inverse lands more than
# 1e-6 from x and can only be held to reproducing t.
@example(k=3, spread=4.0, magnitude=1.0, seed=1647)
def test_mixture_cdf_is_monotone_and_inverts_to_tol(k, spread, magnitude, seed):
    generator = torch.Generator().manual_seed(seed)
    shape = (1, k, 1, 1, 1)
    log_pi = F.log_softmax(spread * torch.randn(shape, generator=generator, dtype=torch.float64), dim=1)
    mu = spread * torch.randn(shape, generator=generator, dtype=torch.float64)
    log_s = (spread * torch.randn(shape, generator=generator, dtype=torch.float64)).clamp(-7, 7)
    x = torch.linspace(-magnitude, magnitude, 101, dtype=torch.float64).view(1, 1, 1, 101)
    t, log_deriv = logit_mixture_cdf(x, log_pi, mu, log_s)
    assert (t.diff(dim=-1) >= 0).all() and torch.isfinite(log_deriv).all()
    x_back = invert_logit_mixture_cdf(t, log_pi, mu, log_s, tol=1e-6, max_iter=200)
    close = (x_back - x).abs() <= 1e-6 + 8 * torch.finfo(torch.float64).eps * x.abs()
    # Between narrow components the CDF is flat to float64 precision, so many x give the same
    # t there (hypothesis found such a case): the inverse must then reproduce t exactly.
    t_back, _ = logit_mixture_cdf(x_back, log_pi, mu, log_s)
    same_t = (t_back - t).abs() <= 1e-12 * t.abs().clamp_min(1.0)
    assert (close | same_t).all()
