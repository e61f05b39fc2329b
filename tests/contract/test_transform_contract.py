"""The Transform contract, for every registered coupling, step and transform (third-party included).

Each part is built with its default Params on ``in_shape = (4, 4, 4)``, without context, with a
spatial context ``(2, 4, 4)`` and with a vector context ``(3,)`` (a class one-hot, a global
latent: every part of these kinds takes both forms), perturbed with `randomize_` (so zero-initialised nets
cannot hide a bug), initialised on data and put in eval mode (dropout in a net makes training-mode
calls random, so forward and inverse would not pair up), then checked: round trip, log-det against the
brute-force Jacobian in both directions, shapes and dtype, row independence, finite gradients
for every parameter, and the context rules. All at `flowkit.testing`'s float64 defaults
(atol 1e-10, rtol 1e-8); the one override is mixlogistic's bisection tolerance (see OVERRIDES).
tests/contract/test_every_part.py runs every kind of part, these included, at tiny sizes.
"""

from __future__ import annotations

import pytest
import torch

import flowkit
from flowkit.build import Builder
from flowkit.plugins import make_plugins
from flowkit.testing import check_gradients, check_transform, randomize_

KINDS = ("coupling", "step", "transform")
IN_SHAPE = (4, 4, 4)
CONTEXT_SHAPE = (2, 4, 4)
VECTOR_SHAPE = (3,)


def _registered() -> list:
    registries = make_plugins().registries
    cases = []
    for kind in KINDS:
        for part in registries[kind]:
            for context_shape in (None, CONTEXT_SHAPE, VECTOR_SHAPE):
                form = {None: "plain", CONTEXT_SHAPE: "context", VECTOR_SHAPE: "vector"}[context_shape]
                label = f"{kind}:{part.name}-{form}"
                cases.append(pytest.param(kind, part.name, context_shape, id=label))
    return cases


CASES = _registered()


@pytest.fixture(scope="module")
def builder() -> Builder:
    return Builder(make_plugins().registries)


#: Params overrides of parts that are exact only to a tolerance of their own: mixlogistic's
#: bisection inverse stops at tol (1e-6 by default), so the contract builds it at 1e-12 and
#: holds it, like every other part, to flowkit.testing's float64 defaults (atol 1e-10, rtol 1e-8).
#: TarFlow's step inverts token by token, x_t = z_t exp(a_t) + b_t, so exp(a) compounds over the
#: 16 tokens of the check: randomize_ on its default net (512 wide, 8 blocks) makes a of order 2
#: and the inverse overflows, a model no training produces. A 16-wide net keeps it invertible.
OVERRIDES = {("coupling", "mixlogistic"): {"tol": 1e-12},
             ("step", "flowpp"): {"coupling": {"use": "mixlogistic", "tol": 1e-12}},
             ("step", "tarflow"): {"net": {"use": "causal_transformer", "width": 16, "depth": 1, "head_dim": 8}}}


def _build(builder: Builder, kind: str, name: str, context_shape, x, context):
    ref = flowkit.ref(kind, name, **OVERRIDES.get((kind, name), {}))
    part = builder(ref, in_shape=IN_SHAPE, context_shape=context_shape)
    assert isinstance(part, flowkit.Transform), f"{kind}:{name} is not a flowkit.Transform"
    part = randomize_(part.double())
    part.initialize(x, context)
    return part.eval()


def _data(context_shape):
    x = 2.0 * torch.randn(2, *IN_SHAPE, dtype=torch.float64) + 0.5
    context = None if context_shape is None else torch.randn(2, *context_shape, dtype=torch.float64)
    return x, context


@pytest.mark.parametrize("kind, name, context_shape", CASES)
def test_transform_contract(builder, kind, name, context_shape):
    x, context = _data(context_shape)
    transform = _build(builder, kind, name, context_shape, x, context)

    # Round trip, both log-dets against the brute-force Jacobian, shapes, the promoted float64
    # log-det dtype, row independence: all at the float64 defaults (atol 1e-10, rtol 1e-8).
    check_transform(transform, x, context)
    z, logabsdet = transform(x, context)
    assert not torch.allclose(z, x), f"{kind}:{name} is the identity after randomize_: the checks above could not fail"
    check_gradients(transform, -(logabsdet - 0.5 * z.pow(2).sum(dim=(1, 2, 3))).mean())


@pytest.mark.parametrize("kind, name, context_shape", CASES)
def test_transform_contract_context_rules(builder, kind, name, context_shape):
    x, context = _data(context_shape)
    transform = _build(builder, kind, name, context_shape, x, context)
    if context is None:
        with pytest.raises(flowkit.ShapeError):
            transform(x, torch.randn(2, *CONTEXT_SHAPE, dtype=torch.float64))
        return
    with pytest.raises(flowkit.ShapeError):
        transform(x)
    with pytest.raises(flowkit.ShapeError):
        transform.inverse(x)
    if kind in ("coupling", "step"):
        # Generic layers (actnorm, invconv) accept a context but do not use it; couplings must.
        z1, _ = transform(x, context)
        z2, _ = transform(x, context + 1.0)
        assert not torch.allclose(z1, z2), f"{kind}:{name} ignores its context"
