"""Tolerances, perturbation and brute-force helpers shared by the contract checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


#: Default ``(atol, rtol)`` per dtype; see the module docstring for why.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float16: (1e-2, 1e-2),
}

#: How many standard errors a Monte Carlo estimate may be off before a check fails. Six
#: gives a false alarm about once in 10^9 runs for a normal estimate, while a wrong scale or
#: normaliser is off by hundreds of standard errors at the sample sizes used here.
SIGMAS = 6.0


def default_tolerances(dtype: torch.dtype, atol: float | None = None, rtol: float | None = None) -> tuple[float, float]:
    """``(atol, rtol)`` for a check on ``dtype`` data.

    Neither given: the defaults of ``dtype`` (`TOLERANCES`). Either or both given: exactly
    those, the other one 0. ``check_transform(t, x, atol=1e-6)`` then allows an error of 1e-6
    and no more: with the float32 default rtol of 1e-4 filled in, an inverse off by 1e-4 on
    values of order one would pass a check that says 1e-6.
    """
    if atol is None and rtol is None:
        return TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    return (0.0 if atol is None else atol), (0.0 if rtol is None else rtol)


def _close(actual: Tensor, expected: Tensor, atol: float, rtol: float, what: str) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


@torch.no_grad()
def randomize_(module: nn.Module, scale: float = 0.1, generator: torch.Generator | None = None) -> nn.Module:
    """Adds noise to every parameter, in place.

    A zero-initialised last convolution makes a coupling the identity, and a test of the
    identity cannot fail: perturb first.
    """
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, dtype=p.dtype, generator=generator).to(p.device))
    return module


def jacobian_logabsdet(fn: Callable[..., Tensor], x: Tensor, context: Tensor | None = None) -> Tensor:
    """log|det J| per sample by brute force: the full Jacobian of ``fn`` at each row of ``x``.

    ``fn(v, context)`` maps ``(B, ...) -> (B, ...)`` row-wise (``fn(v)`` when ``context`` is
    None); each row is differentiated with its own row of the context. Result shape ``(B,)``.
    """
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].detach()
        ci = None if context is None else context[i : i + 1]
        row_fn = (lambda v: fn(v)) if context is None else (lambda v, ci=ci: fn(v, ci))
        jac = torch.autograd.functional.jacobian(lambda v: row_fn(v).reshape(-1), xi)
        jac = jac.reshape(jac.shape[0], -1)
        if jac.shape[0] != jac.shape[1]:
            raise AssertionError(f"the map is not square: {jac.shape[1]} inputs give {jac.shape[0]} outputs")
        out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


def _rows(out: Any) -> list[Tensor]:
    """The tensors of a function's output: a tensor, a tuple/list of them, or a dict's values."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [v for v in out.values() if isinstance(v, Tensor)]
    return [v for v in out if isinstance(v, Tensor)]


def check_rows_independent(
    fn: Callable[..., Any], x: Tensor, context: Tensor | None = None, *, atol: float | None = None,
    rtol: float | None = None,
) -> None:
    """Output row i depends only on input row i (and context row i): no batch statistics.

    ``fn(x)`` (or ``fn(x, context)``) returns a tensor, a tuple of tensors or a dict of them,
    each with leading dimension B. Row 0 is compared while the other rows change, then the
    last row while the others change.
    """
    if x.shape[0] < 2:
        return
    atol, rtol = default_tolerances(x.dtype if x.is_floating_point() else torch.float32, atol, rtol)

    def call(v: Tensor, c: Tensor | None) -> list[Tensor]:
        return _rows(fn(v) if context is None else fn(v, c))

    base = call(x, context)
    for keep in (0, x.shape[0] - 1):
        others = torch.ones(x.shape[0], dtype=torch.bool)
        others[keep] = False
        x2 = x.clone()
        x2[others] = x2[others] + (0.37 if x.is_floating_point() else 1)
        c2 = None
        if context is not None:
            c2 = context.clone()
            c2[others] = c2[others] + 0.37
        for index, (a, b) in enumerate(zip(call(x2, c2), base, strict=True)):
            torch.testing.assert_close(
                a[keep], b[keep], atol=atol, rtol=rtol,
                msg=lambda m, keep=keep, index=index: f"output {index}, row {keep} depends on other rows: {m}")


def check_gradients(module: nn.Module, loss: Tensor) -> None:
    """Every trainable parameter receives a finite, non-``None`` gradient from ``loss``."""
    module.zero_grad(set_to_none=True)
    loss.backward()
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"parameter {name} received no gradient"
        bad = (~torch.isfinite(p.grad)).sum().item()
        assert bad == 0, f"parameter {name} has {bad} non-finite gradient entries"


def _check_logabsdet(logabsdet: Tensor, x: Tensor, what: str) -> None:
    assert logabsdet.shape == (x.shape[0],), f"{what} logabsdet has shape {tuple(logabsdet.shape)}, not ({x.shape[0]},)"
    expected = torch.promote_types(x.dtype, torch.float32)
    assert logabsdet.dtype == expected, f"{what} logabsdet is {logabsdet.dtype}, not the promoted {expected}"


def _unchanged(before: Tensor, after: Tensor, what: str) -> None:
    assert torch.equal(before, after), f"{what} modified its input in place"


# -- transforms, couplings, steps -----------------------------------------------------------
