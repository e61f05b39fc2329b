"""The Transform contract, for every registered coupling, step and transform (third-party included).

Each part is built with its default Params on ``in_shape = (4, 4, 4)``, without context and
with a spatial context ``(2, 4, 4)``, perturbed with `randomize_` (so zero-initialised nets
cannot hide a bug), initialised on data and put in eval mode (dropout in a net makes training-mode
calls random, so forward and inverse would not pair up), then checked: round trip, log-det against the
brute-force Jacobian in both directions, shapes and dtype, row independence, finite gradients
for every parameter, and the context rules.
"""

from __future__ import annotations

import pytest
import torch

import flowkit
from flowkit.build import Builder
from flowkit.params import PartRef
from flowkit.plugins import make_plugins
from flowkit.testing import check_gradients, check_transform, randomize_

KINDS = ("coupling", "step", "transform")
IN_SHAPE = (4, 4, 4)
CONTEXT_SHAPE = (2, 4, 4)


def _registered() -> list:
    registries = make_plugins().registries
    cases = []
    for kind in KINDS:
        for part in registries[kind]:
            for context_shape in (None, CONTEXT_SHAPE):
                label = f"{kind}:{part.name}-{'context' if context_shape else 'plain'}"
                cases.append(pytest.param(kind, part.name, context_shape, id=label))
    return cases


CASES = _registered()


@pytest.fixture(scope="module")
def builder() -> Builder:
    return Builder(make_plugins().registries)


def _build(builder: Builder, kind: str, name: str, context_shape, x, context):
    part = builder(PartRef(kind, name), in_shape=IN_SHAPE, context_shape=context_shape)
    assert isinstance(part, flowkit.Transform), f"{kind}:{name} is not a flowkit.Transform"
    part = randomize_(part.double())
    part.initialize(x, context)
    return part.eval()


def _data(context_shape):
    x = 2.0 * torch.randn(2, *IN_SHAPE, dtype=torch.float64) + 0.5
    context = None if context_shape is None else torch.randn(2, *context_shape, dtype=torch.float64)
    return x, context


def _brute_force_logabsdet(fn, x):
    # One backward pass per output coordinate serves every row at once: rows are independent
    # (check_transform checks it), so the Jacobian of the batch sum holds each row's own block.
    # flowkit.testing.jacobian_logabsdet goes row by row and cannot slice a context.
    batch, dims = x.shape[0], x[0].numel()
    jac = torch.autograd.functional.jacobian(lambda v: fn(v).reshape(batch, dims).sum(0), x)
    return torch.linalg.slogdet(jac.reshape(dims, batch, dims).transpose(0, 1)).logabsdet


def _check_jacobians(transform, x, context, atol=1e-4, rtol=1e-3):
    z, logabsdet = transform(x, context)
    _, inv_logabsdet = transform.inverse(z, context)
    brute = _brute_force_logabsdet(lambda v: transform(v, context)[0], x)
    torch.testing.assert_close(logabsdet, brute, atol=atol, rtol=rtol,
                               msg=lambda m: f"forward logabsdet != brute-force log|det J|: {m}")
    brute_inv = _brute_force_logabsdet(lambda v: transform.inverse(v, context)[0], z.detach())
    torch.testing.assert_close(inv_logabsdet, brute_inv, atol=atol, rtol=rtol,
                               msg=lambda m: f"inverse logabsdet != brute-force log|det J|: {m}")


@pytest.mark.parametrize("kind, name, context_shape", CASES)
def test_transform_contract(builder, kind, name, context_shape):
    x, context = _data(context_shape)
    transform = _build(builder, kind, name, context_shape, x, context)

    check_transform(transform, x, context, jacobian=False)
    _check_jacobians(transform, x, context)

    z, logabsdet = transform(x, context)
    assert logabsdet.dtype == torch.float64, f"logabsdet is {logabsdet.dtype}, not the promoted float64"
    x_back, inv_logabsdet = transform.inverse(z, context)
    assert x_back.shape == x.shape and inv_logabsdet.shape == (2,)

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
