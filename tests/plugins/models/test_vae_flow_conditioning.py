"""The vector context that conditions the VAE-flow's decoder on z, for every registered part of
every kind that must accept one (`flowkit.kinds.KINDS[kind].contexts`), third-party included:
so any coupling or net conditions a VAE-flow's decoder.

Each part is built with a vector context of 3 dimensions, perturbed with `randomize_` (zero
projections would hide a context that is ignored), and checked by its kind's flowkit.testing
check with that context. Nets also keep the convention of `flowkit.contracts.context`: the
projection of z starts at zero, so a fresh conditioned net computes what the same net without
context computes.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import flowkit
from flowkit.build import Builder
from flowkit.contracts.context import VectorContext, context_form
from flowkit.kinds import KINDS
from flowkit.plugins import make_plugins
from flowkit.testing import check_net, check_prior, check_transform, randomize_

VECTOR = (3,)
IN_SHAPE = (4, 4, 4)
#: mixlogistic's bisection inverse is exact to its tol: built at 1e-12 for the float64 checks
#: (alone, and as the default coupling of the flowpp step). TarFlow's step is an exponential
#: affine map whose default net (512 wide, 8 blocks) perturbed by randomize_ gives a ~ 100: a small
#: net, as the contract tests build it, keeps its inverse within float64.
OVERRIDES = {("coupling", "mixlogistic"): {"tol": 1e-12},
             ("step", "flowpp"): {"coupling": {"use": "mixlogistic", "tol": 1e-12}},
             ("step", "tarflow"): {"net": {"use": "causal_transformer", "width": 16, "depth": 1, "head_dim": 8}}}


def _cases(kinds: tuple[str, ...]) -> list:
    registries = make_plugins().registries
    return [pytest.param(kind, part.name, id=f"{kind}:{part.name}")
            for kind in kinds if "vector" in KINDS[kind].contexts for part in registries[kind]]


@pytest.fixture(scope="module")
def builder() -> Builder:
    return Builder(make_plugins().registries)


def _ref(kind: str, name: str) -> Any:
    return flowkit.ref(kind, name, **OVERRIDES.get((kind, name), {}))


@pytest.mark.parametrize("kind, name", _cases(("coupling", "step", "transform")))
def test_transform_takes_a_vector_context(builder: Builder, kind: str, name: str) -> None:
    x = 2.0 * torch.randn(2, *IN_SHAPE, dtype=torch.float64) + 0.5
    z = torch.randn(2, *VECTOR, dtype=torch.float64)
    part = randomize_(builder(_ref(kind, name), in_shape=IN_SHAPE, context_shape=VECTOR).double())
    part.initialize(x, z)
    part.eval()
    check_transform(part, x, z)
    if kind in ("coupling", "step"):  # generic layers (actnorm, invconv) accept a context and ignore it
        assert not torch.allclose(part(x, z)[0], part(x, z + 1.0)[0]), f"{kind}:{name} ignores a vector context"


@pytest.mark.parametrize("kind, name", _cases(("net",)))
def test_net_takes_a_vector_context_through_a_zero_initialised_projection(builder: Builder, kind: str,
                                                                            name: str) -> None:
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    z = torch.randn(3, *VECTOR, dtype=torch.float64)
    plain = randomize_(builder(_ref(kind, name), in_shape=(2, 4, 4), context_shape=None, out_channels=5).double())
    conditioned = builder(_ref(kind, name), in_shape=(2, 4, 4), context_shape=VECTOR, out_channels=5).double()
    missing, unexpected = conditioned.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected, f"net:{name} with a vector context lacks weights of the plain net: {unexpected}"
    assert missing, f"net:{name} with a vector context has no weights of its own for it"
    plain.eval(), conditioned.eval()
    for context in (z, 10 * z):
        torch.testing.assert_close(conditioned(x, context), plain(x), atol=1e-12, rtol=1e-10,
                                   msg=lambda m: f"net:{name}: a fresh projection of z is not zero: {m}")
    randomize_(conditioned)
    check_net(conditioned, x, z, out_channels=5)


@pytest.mark.parametrize("kind, name", _cases(("prior",)))
def test_conditional_prior_takes_a_vector_context(builder: Builder, kind: str, name: str) -> None:
    prior = builder(_ref(kind, name), in_shape=(2, 4, 4), context_shape=VECTOR).double()
    if prior.context_shape is None:
        pytest.skip(f"prior:{name} is unconditional")
    randomize_(prior, 0.3)
    check_prior(prior, torch.randn(3, *VECTOR, dtype=torch.float64))


def test_context_forms_and_their_errors() -> None:
    assert context_form(None, IN_SHAPE, "p") is None
    assert context_form((5,), IN_SHAPE, "p") == "vector"
    assert context_form((5, 4, 4), IN_SHAPE, "p") == "spatial"
    for bad in ((5, 2, 2), (5, 4), (0,)):
        with pytest.raises(flowkit.ShapeError, match=r"part accepts a context of shape \(Cc,\)"):
            context_form(bad, IN_SHAPE, "part")


def test_vector_context_projection_starts_at_zero_and_learns() -> None:
    projection = VectorContext(3, 6)
    z = torch.randn(2, 3)
    out = projection(z)
    assert out.shape == (2, 6, 1, 1) and not out.any()
    out.sum().backward()
    assert projection.linear.weight.grad.abs().sum() > 0
