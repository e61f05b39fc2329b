"""Contract checks for transforms and decompositions, for flowkit's tests and third-party plugins.

Usage in a plugin's own tests::

    from flowkit.testing import check_transform, randomize_
    t = MyCoupling(...).double(); randomize_(t)
    check_transform(t, torch.randn(2, 4, 4, 4, dtype=torch.float64))

Each check raises ``AssertionError`` with the measured discrepancy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowkit.contracts.decomposition import Decomposition
from flowkit.contracts.transform import Transform


@torch.no_grad()
def randomize_(module: nn.Module, scale: float = 0.1, generator: torch.Generator | None = None) -> nn.Module:
    """Adds noise to every parameter, in place.

    A zero-initialised last convolution makes a coupling the identity, and a test of the
    identity cannot fail: perturb first.
    """
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, dtype=p.dtype, generator=generator).to(p.device))
    return module


def jacobian_logabsdet(fn, x: Tensor, context: Tensor | None = None) -> Tensor:
    """log|det J| per sample by brute force: the full Jacobian of ``fn`` at each row of ``x``.

    ``fn(v, context)`` maps ``(B, ...) -> (B, ...)`` row-wise (``fn(v)`` when ``context`` is
    None); each row is differentiated with its own row of the context. Result shape ``(B,)``.
    """
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        ci = None if context is None else context[i : i + 1]
        row_fn = (lambda v: fn(v)) if context is None else (lambda v, ci=ci: fn(v, ci))
        jac = torch.autograd.functional.jacobian(lambda v: row_fn(v).reshape(-1), xi.reshape(-1).view_as(xi))
        jac = jac.reshape(jac.shape[0], -1)
        out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


def check_transform(
    transform: Transform,
    x: Tensor,
    context: Tensor | None = None,
    *,
    atol: float = 1e-6,
    rtol: float = 1e-5,
    jacobian: bool = True,
    inverse: bool = True,
) -> None:
    """Round trip, log-det against brute force (both directions), shapes, row independence.

    Use float64 inputs on tiny shapes (B=2, C<=4, H=W<=4) for the Jacobian check.
    """
    z, logabsdet = transform(x, context)
    assert z.shape == x.shape, f"forward changed the shape: {tuple(x.shape)} -> {tuple(z.shape)}"
    assert logabsdet.shape == (x.shape[0],), f"logabsdet has shape {tuple(logabsdet.shape)}, not ({x.shape[0]},)"
    assert torch.isfinite(z).all() and torch.isfinite(logabsdet).all(), "forward produced NaN or Inf"
    if inverse:
        x_back, inv_logabsdet = transform.inverse(z, context)
        torch.testing.assert_close(x_back, x, atol=atol * 100, rtol=rtol * 100,
                                   msg=lambda m: f"inverse(forward(x)) != x: {m}")
        torch.testing.assert_close(inv_logabsdet, -logabsdet, atol=atol * 100, rtol=rtol * 100,
                                   msg=lambda m: f"inverse logabsdet != -forward logabsdet: {m}")
    if jacobian:
        brute = jacobian_logabsdet(lambda v, c=None: transform(v, c)[0], x, context)
        torch.testing.assert_close(logabsdet.to(brute.dtype), brute, atol=atol * 100, rtol=rtol * 100,
                                   msg=lambda m: f"forward logabsdet != brute-force log|det J|: {m}")
        if inverse:
            brute_inv = jacobian_logabsdet(lambda v, c=None: transform.inverse(v, c)[0], z.detach(), context)
            torch.testing.assert_close(inv_logabsdet.to(brute_inv.dtype), brute_inv, atol=atol * 100,
                                       rtol=rtol * 100, msg=lambda m: f"inverse logabsdet != brute force: {m}")
    check_rows_independent(lambda v: transform(v, context)[0], x)


def check_rows_independent(fn, x: Tensor) -> None:
    """Output row i depends only on input row i (no batch statistics in the forward pass)."""
    if x.shape[0] < 2:
        return
    x2 = x.clone()
    x2[1:] = x2[1:] + 0.37
    torch.testing.assert_close(fn(x2)[0], fn(x)[0], msg=lambda m: f"row 0 depends on other rows: {m}")


def check_gradients(module: nn.Module, loss: Tensor) -> None:
    """Every trainable parameter receives a finite gradient from ``loss``."""
    module.zero_grad(set_to_none=True)
    loss.backward()
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"parameter {name} received no gradient"
        assert torch.isfinite(p.grad).all(), f"parameter {name} has a non-finite gradient"


def check_decomposition(decomposition: Decomposition, x: Tensor, *, atol: float = 1e-6) -> None:
    """Shapes, perfect reconstruction, and the log-det against brute force."""
    low, detail, logabsdet = decomposition.split(x)
    low_shape, detail_shape = decomposition.output_shape(tuple(x.shape[1:]))
    assert tuple(low.shape[1:]) == tuple(low_shape), f"low has shape {tuple(low.shape)}, expected {low_shape}"
    assert tuple(detail.shape[1:]) == tuple(detail_shape), f"detail has shape {tuple(detail.shape)}, expected {detail_shape}"
    assert logabsdet.shape == (x.shape[0],)
    x_back, merge_logabsdet = decomposition.merge(low, detail)
    torch.testing.assert_close(x_back, x, atol=atol, rtol=0)
    torch.testing.assert_close(merge_logabsdet, -logabsdet, atol=atol, rtol=0)

    def flat_split(v: Tensor) -> Tensor:
        lo, de, _ = decomposition.split(v)
        return torch.cat([lo.reshape(v.shape[0], -1), de.reshape(v.shape[0], -1)], dim=1)

    brute = jacobian_logabsdet(flat_split, x)
    torch.testing.assert_close(logabsdet.to(brute.dtype), brute, atol=atol * 100, rtol=1e-5)
