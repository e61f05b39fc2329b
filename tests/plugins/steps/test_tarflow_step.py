"""``step:tarflow``: TarFlow's autoregressive block; its exact inverses (sequential with a key/value
cache, Jacobi), its log-det, its causality, guidance of its cached calls, and what recompute says."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import flowkit
from flowkit.build import Builder
from flowkit.contracts.transform import InverseSolver, use_inverse_solver, use_recompute
from flowkit.nn.guidance import Guidance, GuidedNet
from flowkit.nn.transformer import KVCache
from flowkit.plugins import make_plugins
from flowkit.testing import jacobian_logabsdet, randomize_

ROOT = Path(__file__).resolve().parents[3]
NET = {"use": "causal_transformer", "width": 16, "depth": 2, "head_dim": 8}


@pytest.fixture(scope="module")
def plugins():
    return make_plugins()


def step(plugins, shape=(3, 3, 4), context_shape=None, builder=None, **params):
    build = builder or Builder(plugins.registries)
    ref = flowkit.ref("step", "tarflow", plugins=plugins, net=NET, **params)
    part = build(ref, in_shape=shape, context_shape=context_shape).double()
    randomize_(part, 0.1, torch.Generator().manual_seed(0))
    return part


def test_forward_is_z_equals_x_minus_b_times_exp_minus_a_with_the_nets_output_shifted_by_one_token(plugins):
    s = step(plugins)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    z, logabsdet = s(x)
    h = s.net(x).flatten(2)  # (B, 2D, T): token t's output
    a, b = h.chunk(2, dim=1)
    tokens = x.flatten(2)
    # Token 0 is unchanged; token t uses the output of token t - 1.
    torch.testing.assert_close(z.flatten(2)[..., 0], tokens[..., 0])
    expected = (tokens[..., 1:] - b[..., :-1]) * torch.exp(-a[..., :-1])
    torch.testing.assert_close(z.flatten(2)[..., 1:], expected)
    torch.testing.assert_close(logabsdet, -a[..., :-1].sum(dim=(1, 2)))


@pytest.mark.parametrize("order", ["identity", "flip"])
@pytest.mark.parametrize("nvp", [True, False])
def test_the_sequential_inverse_with_its_cache_is_exact_and_leaves_its_input_alone(plugins, order: str, nvp: bool):
    s = step(plugins, order=order, nvp=nvp)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    z, logabsdet = s(x)
    z_before = z.clone()
    x_back, inverse_logabsdet = s.inverse(z)
    assert torch.equal(z, z_before), "the inverse wrote into its input (the reference does)"
    torch.testing.assert_close(x_back, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(inverse_logabsdet, -logabsdet, atol=1e-12, rtol=0)


def test_the_cached_decoding_equals_decoding_without_a_cache(plugins):
    """The same token-by-token solve, each token's (a, b) from a full pass over the tokens decoded so
    far (no cache, O(T²) work per token): the cache changes nothing but the cost."""
    s = step(plugins)
    z = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    cached, _ = s.inverse(z)
    tokens = z.flatten(2).clone()
    for t in range(1, tokens.shape[2]):
        a, b = s._affine(s.net(tokens.reshape(z.shape)))
        tokens[..., t] = z.flatten(2)[..., t] * torch.exp(a[..., t]) + b[..., t]
    torch.testing.assert_close(cached, tokens.reshape(z.shape), atol=1e-12, rtol=0)


@pytest.mark.parametrize("context_shape", [None, (2, 3, 4), (5,)])
def test_log_det_equals_the_brute_force_jacobian_both_ways(plugins, context_shape):
    s = step(plugins, order="flip", context_shape=context_shape)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    c = None if context_shape is None else torch.randn(2, *context_shape, dtype=torch.float64)
    z, logabsdet = s(x, c)
    torch.testing.assert_close(logabsdet, jacobian_logabsdet(lambda v, c=None: s(v, c)[0], x, c), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(s.inverse(z, c)[1], jacobian_logabsdet(lambda v, c=None: s.inverse(v, c)[0], z, c),
                               atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("order", ["identity", "flip"])
def test_the_affine_parameters_at_a_token_have_no_gradient_from_that_token_or_later_ones(plugins, order: str):
    """Causality: (a_t, b_t) depend on the tokens before t in the step's order only, so z_t on x_{<= t}."""
    s = step(plugins, order=order)
    x = torch.randn(1, 3, 3, 4, dtype=torch.float64)
    flip = order == "flip"
    T = 12

    def params(v):
        ordered = v.flip((2, 3)) if flip else v
        a, b = s._affine(s.net(ordered))
        return torch.cat([a, b], dim=1)[0]  # (2D, T) in the step's order

    jac = torch.autograd.functional.jacobian(params, x)  # (2D, T, 1, D, H, W)
    jac = jac.reshape(6, T, 3, T)  # input tokens in raster order
    if flip:
        jac = jac.flip(3)  # input tokens in the step's order
    for t in range(T):
        assert jac[:, t, :, t:].abs().max() == 0, f"token {t}'s (a, b) depend on tokens >= {t}"
        if t > 0:
            assert jac[:, t, :, t - 1].abs().max() > 0, f"token {t}'s (a, b) ignore token {t - 1}"


def test_the_jacobi_iteration_reaches_the_sequential_result_within_its_tolerance(plugins):
    s = step(plugins, shape=(4, 4, 4))
    z = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    exact, exact_logabsdet = s.inverse(z)
    for tol in (1e-3, 1e-8, 0.0):
        with use_inverse_solver(InverseSolver("jacobi", tol=tol), s) as touched:
            approx, logabsdet = s.inverse(z)
        assert touched == 1 and s.solver == InverseSolver()  # put back afterwards
        assert 1 <= s.last_iterations <= 16
        # The last update moved no value by more than tol; on a contracting map the error is of that order.
        assert (approx - exact).abs().max() <= max(10 * tol, 1e-12), (tol, (approx - exact).abs().max())
        torch.testing.assert_close(logabsdet, exact_logabsdet, atol=max(1e3 * tol, 1e-10), rtol=0)
    with use_inverse_solver(InverseSolver("jacobi", tol=0.0, max_iter=2), s):
        s.inverse(z)
    assert s.last_iterations == 2


class _PoisoningNet(torch.nn.Module):
    """a_{t+1} = 100 sum_{s<=t} x_s, b = 0, through a lower-triangular matmul: like attention, a
    non-finite later token reaches earlier ones as 0 * inf = NaN."""

    def forward(self, x, context=None):
        tokens = x.flatten(2)  # (B, 1, T)
        mixed = tokens @ torch.tril(torch.ones(tokens.shape[2], tokens.shape[2], dtype=x.dtype)).T
        return torch.cat([100 * mixed, torch.zeros_like(mixed)], dim=1).reshape(x.shape[0], 2, *x.shape[2:])


def test_a_jacobi_iterate_that_overflows_does_not_poison_the_converged_tokens(plugins):
    s = step(plugins, shape=(1, 1, 3)).float()
    s.net = _PoisoningNet()
    # Exact: x0 = -1, x1 = 3 e^-100 ~ 0, x2 = e^(100 (x0 + x1)) ~ 0; the first iterate from x = z has
    # x2 = e^(100 (z0 + z1)) = e^200 = inf in float32.
    z = torch.tensor([[[[-1.0, 3.0, 1.0]]]])
    x1 = 3 * math.exp(-100)
    exact = torch.tensor([[[[-1.0, x1, math.exp(100 * (-1 + x1))]]]])
    with use_inverse_solver(InverseSolver("jacobi", tol=0.0), s):
        approx, logabsdet = s.inverse(z)
    torch.testing.assert_close(approx, exact)
    torch.testing.assert_close(logabsdet, torch.tensor([-200.0]))  # a1 + a2 = -100 + 100 (x0 + x1)


def test_guidance_mixes_the_nets_cached_calls_too(plugins):
    """A class-conditional build wraps the causal net: a cached call on a doubled batch returns
    h_c + w (h_c - h_u) for both halves, as a full pass does."""
    guidance = Guidance()
    s = step(plugins, context_shape=(4,), builder=Builder(plugins.registries, guidance=guidance))
    assert isinstance(s.net, GuidedNet)
    x = torch.randn(2, 3, 12, dtype=torch.float64).repeat(2, 1, 1)
    context = torch.eye(4, dtype=torch.float64)[[0, 1, 3, 3]]
    plain = s.net.net(x[..., :1], context, cache=KVCache())
    with guidance.guiding(2.0):
        mixed = s.net(x[..., :1], context, cache=KVCache())
    cond, uncond = plain.chunk(2)
    torch.testing.assert_close(mixed, torch.cat([cond + 2.0 * (cond - uncond)] * 2))


def test_recompute_is_refused_for_steps_that_invert_position_by_position(plugins):
    s = step(plugins)
    assert type(s).sequential_inverse
    with pytest.raises(flowkit.ShapeError, match=r"position by position.*TarFlowStep"):
        use_recompute(torch.nn.ModuleList([s]))
    from flowkit.runs.session import build_session

    recipe = flowkit.load_recipe(ROOT / "recipes" / "tarflow.toml", preset="smoke", overrides=["train.memory=recompute"])
    with pytest.raises(flowkit.RecipeError, match=r'train.memory = "recompute".*position by position.*train.memory = "store"'):
        build_session(recipe, plugins)


def test_shift_only_blocks_are_volume_preserving(plugins):
    s = step(plugins, nvp=False)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    z, logabsdet = s(x)
    assert torch.equal(logabsdet, torch.zeros(2, dtype=torch.float64))
    assert s.net.out_channels == 3
