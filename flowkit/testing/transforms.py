"""Contract checks of transforms (couplings, steps), decompositions and nets."""

from __future__ import annotations


import torch
from torch import Tensor, nn

from flowkit.contracts.decomposition import Decomposition
from flowkit.contracts.transform import Transform
from flowkit.testing._common import check_gradients, _check_logabsdet, check_rows_independent, _close, default_tolerances, jacobian_logabsdet, _unchanged


def check_transform(
    transform: Transform,
    x: Tensor,
    context: Tensor | None = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    jacobian: bool = True,
    inverse: bool = True,
) -> None:
    """Round trip, log-det against brute force (both directions), shapes, dtype, row independence.

    Use float64 inputs on tiny shapes (B=2, C<=4, H=W<=4) for the Jacobian check. ``atol`` and
    ``rtol`` apply as given to every comparison (``None``: `default_tolerances` of ``x.dtype``).
    """
    atol, rtol = default_tolerances(x.dtype, atol, rtol)
    x_before = x.clone()
    z, logabsdet = transform(x, context)
    _unchanged(x_before, x, "forward")
    assert z.shape == x.shape, f"forward changed the shape: {tuple(x.shape)} -> {tuple(z.shape)}"
    _check_logabsdet(logabsdet, x, "forward")
    assert torch.isfinite(z).all() and torch.isfinite(logabsdet).all(), "forward produced NaN or Inf"
    if inverse:
        z_before = z.clone()
        x_back, inv_logabsdet = transform.inverse(z, context)
        _unchanged(z_before, z, "inverse")
        _check_logabsdet(inv_logabsdet, z, "inverse")
        _close(x_back, x, atol, rtol, "inverse(forward(x)) != x")
        _close(inv_logabsdet, -logabsdet, atol, rtol, "inverse logabsdet != -forward logabsdet")
    if jacobian:
        brute = jacobian_logabsdet(lambda v, c=None: transform(v, c)[0], x, context)
        _close(logabsdet.to(brute.dtype), brute, atol, rtol, "forward logabsdet != brute-force log|det J|")
        if inverse:
            brute_inv = jacobian_logabsdet(lambda v, c=None: transform.inverse(v, c)[0], z.detach(), context)
            _close(inv_logabsdet.to(brute_inv.dtype), brute_inv, atol, rtol,
                   "inverse logabsdet != brute-force log|det J|")
    check_rows_independent(lambda v, c=None: transform(v, c), x, context, atol=atol, rtol=rtol)


# -- decompositions -------------------------------------------------------------------------


def check_decomposition(
    decomposition: Decomposition, x: Tensor, *, atol: float | None = None, rtol: float | None = None
) -> None:
    """Shapes, perfect reconstruction, the log-det against brute force, the space-to-depth view.

    Checks `split`/`merge` and `to_channels`/`from_channels`: shapes against `output_shape`,
    both round trips, merge's log-det minus split's, both log-dets against the brute-force
    Jacobian; for an ``orthonormal`` decomposition, zero log-dets and preserved norms; rows
    independent; inputs unchanged.
    """
    atol, rtol = default_tolerances(x.dtype, atol, rtol)
    batch, channels, height, width = x.shape
    x_before = x.clone()
    low, detail, logabsdet = decomposition.split(x)
    _unchanged(x_before, x, "split")
    low_shape, detail_shape = decomposition.output_shape(tuple(x.shape[1:]))
    assert tuple(low.shape[1:]) == tuple(low_shape), f"low has shape {tuple(low.shape)}, expected {low_shape}"
    assert tuple(detail.shape[1:]) == tuple(detail_shape), f"detail has shape {tuple(detail.shape)}, expected {detail_shape}"
    assert low.shape[0] == detail.shape[0] == batch, "split changed the batch size"
    _check_logabsdet(logabsdet, x, "split")
    x_back, merge_logabsdet = decomposition.merge(low, detail)
    _check_logabsdet(merge_logabsdet, low, "merge")
    _close(x_back, x, atol, rtol, "merge(split(x)) != x")
    _close(merge_logabsdet, -logabsdet, atol, rtol, "merge logabsdet != -split logabsdet")

    def flat_split(v: Tensor) -> Tensor:
        lo, de, _ = decomposition.split(v)
        return torch.cat([lo.reshape(v.shape[0], -1), de.reshape(v.shape[0], -1)], dim=1)

    brute = jacobian_logabsdet(flat_split, x)
    _close(logabsdet.to(brute.dtype), brute, atol, rtol, "split logabsdet != brute-force log|det J|")

    s, s_logabsdet = decomposition.to_channels(x)
    _unchanged(x_before, x, "to_channels")
    expected_s = (batch, low_shape[0] + detail_shape[0], low_shape[1], low_shape[2])
    assert tuple(s.shape) == expected_s, f"to_channels gave shape {tuple(s.shape)}, expected {expected_s}"
    _check_logabsdet(s_logabsdet, x, "to_channels")
    x_back, from_logabsdet = decomposition.from_channels(s)
    _close(x_back, x, atol, rtol, "from_channels(to_channels(x)) != x")
    _close(from_logabsdet, -s_logabsdet, atol, rtol, "from_channels logabsdet != -to_channels logabsdet")
    brute = jacobian_logabsdet(lambda v: decomposition.to_channels(v)[0], x)
    _close(s_logabsdet.to(brute.dtype), brute, atol, rtol, "to_channels logabsdet != brute-force log|det J|")

    if decomposition.orthonormal:
        zeros = torch.zeros_like(logabsdet)
        _close(logabsdet, zeros, atol, rtol, "an orthonormal split has a non-zero logabsdet")
        norm_in = x.square().flatten(1).sum(1)
        norm_out = low.square().flatten(1).sum(1) + detail.square().flatten(1).sum(1)
        _close(norm_out, norm_in, atol, rtol, "an orthonormal split changed ||x||^2")
    check_rows_independent(decomposition.split, x, atol=atol, rtol=rtol)
    check_rows_independent(decomposition.to_channels, x, atol=atol, rtol=rtol)


# -- nets -----------------------------------------------------------------------------------


def check_net(
    net: nn.Module, x: Tensor, context: Tensor | None = None, *, out_channels: int,
    atol: float | None = None, rtol: float | None = None,
) -> None:
    """A conditioner ``net(x, context) -> (B, out_channels, H, W)``.

    Checks the shape and dtype, that the output depends on ``x`` (and on ``context`` when one
    is given: a silently ignored context is a common bug), row independence, and a finite
    gradient for every parameter. Runs in eval mode (dropout off), then restores the mode.
    Perturb with `randomize_` first: a zero last layer makes the output constant.
    """
    atol, rtol = default_tolerances(x.dtype, atol, rtol)
    was_training = net.training
    net.eval()
    try:
        x_before = x.clone()
        out = net(x, context)
        _unchanged(x_before, x, "the net")
        expected = (x.shape[0], out_channels, *x.shape[2:])
        assert tuple(out.shape) == expected, f"the net gave shape {tuple(out.shape)}, expected {expected}"
        assert out.dtype == x.dtype, f"the net gave {out.dtype} for {x.dtype} inputs"
        assert torch.isfinite(out).all(), "the net produced NaN or Inf"
        moved = (net(x + 0.5, context) - out).abs().max().item()
        assert moved > 0, "the net's output does not depend on its input (randomize_ it first)"
        if context is not None:
            moved = (net(x, context + 0.5) - out).abs().max().item()
            assert moved > 0, "the net's output does not depend on its context"
        check_rows_independent(lambda v, c=None: net(v, c), x, context, atol=atol, rtol=rtol)
        check_gradients(net, net(x, context).square().mean())
    finally:
        net.train(was_training)


# -- priors ---------------------------------------------------------------------------------
