"""``step:tarflow``: TarFlow's autoregressive affine flow over the tokens of a patch grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from flowkit import PartRef, ShapeError, hookimpl, param, part_field
from flowkit.contracts.transform import Transform, logdet_dtype
from flowkit.nn.transformer import KVCache

Shape = tuple[int, ...]
Order = Literal["identity", "flip"]
#: The Jacobi iterate's clamp (TarFlowStep's docstring): far beyond any token a flow of images
#: decodes to, far below where float32's LayerNorm overflows.
JACOBI_BOUND = 1e4


@dataclass(frozen=True, kw_only=True)
class TarFlowStepParams:
    order: Order = param(
        "identity", "the token order the step is autoregressive in: identity (raster, t = h W + w) or flip (reversed); "
        "TarFlow alternates them block by block (model:tarflow derives it)")
    nvp: bool = param(True, "affine, scale exp(-a) and shift (TarFlow's nvp = True), or shift only (nvp = False: "
                            "volume preserving)")
    net: PartRef = part_field("net", "causal_transformer",
                              "the causal net giving each token's (a, b) from the tokens before it")


class TarFlowStep(Transform):
    r"""One TarFlow block (apple/ml-tarflow ``transformer_flow.py``, ``MetaBlock``): an
    autoregressive affine flow over the ``T = H W`` tokens of its input ``(B, D, H, W)``
    (raster order, reversed with ``order = "flip"``), each token a vector of D features.

    With ``h`` the causal net's output (`flowkit_plugins`' ``net:causal_transformer``: at token
    t it sees tokens ``<= t``), shifted by one token so that position t gets the output of
    position ``t - 1`` and position 0 gets zeros, ``(a_t, b_t) = h_{t-1}`` (``nvp = False``:
    ``a = 0``) and

    .. math::

        z_t = (x_t - b_t)\,e^{-a_t},\qquad \log|\det \partial z / \partial x| = -\sum_{t,d} a_{t,d}.

    The reference returns ``-a.mean()`` over tokens and features, a log-det per dimension; flowkit
    sums (its densities are per image). The Jacobian is triangular in token order, so this sum is
    exact.

    Inverse (``x_t = z_t e^{a_t} + b_t``, where ``(a_t, b_t)`` need ``x_{<t}``), solved as the
    step's ``solver`` says (`flowkit.contracts.transform.InverseSolver`; `sequential_inverse`):

    - ``"sequential"``: token by token, the net run on the one token decoded last with a
      key/value cache of the earlier ones (`flowkit.nn.transformer.KVCache`): T - 1 net calls, exact.
      The reference writes the decoded tokens into its input in place; here the input is left
      unchanged (the tokens are collected and stacked).
    - ``"jacobi"``: ``x ← z e^{a(x)} + b(x)`` for all tokens at once, from ``x = z``, until no
      entry moves by more than ``tol`` or after ``max_iter`` iterations (0: T; the iterate is exact
      after T - 1, since token t is exact after t iterations). ``last_iterations`` says how many ran.
      Each iterate is clamped to ``±JACOBI_BOUND``: tokens not yet converged are garbage, and on a
      trained model their ``e^{a}`` overflows; one inf becomes NaN in its token's LayerNorm and
      attention's ``0 · NaN`` then spreads it to every token, converged ones included. Clamping
      leaves the fixed point alone wherever the exact inverse lies within the bound.

    Guidance: the net is called as any net is (`flowkit.nn.guidance.GuidedNet` wraps it in a
    class-conditional build), cached calls included, so each token's ``(a, b)`` is mixed
    ``h_c + w (h_c - h_u)``: the reference's ``guide_what = "ab"`` with constant guidance.
    """

    sequential_inverse = True

    def __init__(self, params: TarFlowStepParams, *, in_shape: Shape, context_shape: Shape | None = None,
                 build: Any) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ShapeError(f"TarFlowStep expects in_shape = (D, H, W) (a patch grid), got {tuple(in_shape)}.")
        self.in_shape = tuple(int(s) for s in in_shape)
        self.context_shape = None if context_shape is None else tuple(int(s) for s in context_shape)
        self.flip, self.nvp = params.order == "flip", params.nvp
        features = self.in_shape[0]
        self.net = build(params.net, in_shape=self.in_shape, context_shape=self.context_shape,
                         out_channels=(2 if self.nvp else 1) * features)
        self.last_iterations = 0

    # -- tokens, in the step's order ---------------------------------------------------------------
    def _ordered(self, x: Tensor) -> Tensor:
        # Reversing the raster order of an H x W grid is flipping both axes.
        return x.flip((2, 3)) if self.flip else x

    def _net_context(self, context: Tensor | None) -> Tensor | None:
        return self._ordered(context) if context is not None and context.dim() == 4 else context

    def _affine(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(a, b)`` of every token, ``(B, D, T)``, from the net's output (B, out, ...) shifted by one token."""
        h = h.flatten(2)
        h = torch.cat([torch.zeros_like(h[..., :1]), h[..., :-1]], dim=2)
        if self.nvp:
            a, b = h.chunk(2, dim=1)
            return a, b
        return torch.zeros_like(h), h

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            d, h, w = self.in_shape
            raise ShapeError(f"TarFlowStep expects input of shape (B, {d}, {h}, {w}), got {tuple(x.shape)}.")

    # -- data to latent ------------------------------------------------------------------------------
    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(x, context)
        self._check(x)
        dtype = logdet_dtype(x)
        xs = self._ordered(x)
        a, b = self._affine(self.net(xs, self._net_context(context)).to(dtype))
        z = (xs.flatten(2).to(dtype) - b) * torch.exp(-a)
        return self._ordered(z.reshape(x.shape).to(x.dtype)), -a.sum(dim=(1, 2))

    # -- latent to data ------------------------------------------------------------------------------
    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(z, context)
        self._check(z)
        if self.solver.method == "jacobi":
            return self._jacobi(z, context)
        return self._sequential(z, context)

    def _sequential(self, z: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        dtype = logdet_dtype(z)
        zs = self._ordered(z).flatten(2).to(dtype)  # (B, D, T)
        ctx = self._net_context(context)
        ctx_tokens = ctx.flatten(2) if ctx is not None and ctx.dim() == 4 else None
        cache = KVCache()
        decoded = [zs[..., 0]]  # token 0 has a = b = 0
        logabsdet = torch.zeros(z.shape[0], dtype=dtype, device=z.device)
        for t in range(zs.shape[2] - 1):
            step_ctx = ctx_tokens[..., t : t + 1] if ctx_tokens is not None else ctx
            h = self.net(decoded[t][..., None].to(z.dtype), step_ctx, cache=cache).to(dtype)[..., 0]
            a, b = h.chunk(2, dim=1) if self.nvp else (torch.zeros_like(h), h)
            decoded.append(zs[..., t + 1] * torch.exp(a) + b)
            logabsdet = logabsdet + a.sum(dim=1)
        x = torch.stack(decoded, dim=2).reshape(z.shape)
        return self._ordered(x.to(z.dtype)), logabsdet

    def _jacobi(self, z: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        dtype = logdet_dtype(z)
        zs = self._ordered(z).flatten(2).to(dtype)
        ctx = self._net_context(context)
        x = zs
        a = torch.zeros_like(zs)
        iterations = self.solver.max_iter or zs.shape[2]
        self.last_iterations = 0
        for _ in range(iterations):
            a, b = self._affine(self.net(x.reshape(z.shape).to(z.dtype), ctx).to(dtype))
            moved = (zs * torch.exp(a) + b).clamp(-JACOBI_BOUND, JACOBI_BOUND)  # NaN stays NaN: a real fault
            change = float((moved - x).detach().abs().max())
            x = moved
            self.last_iterations += 1
            if change <= self.solver.tol:
                break
        return self._ordered(x.reshape(z.shape).to(z.dtype)), a.sum(dim=(1, 2))

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, order={'flip' if self.flip else 'identity'}, nvp={self.nvp}"


@hookimpl
def flowkit_register_steps(register: Any) -> None:
    register("tarflow", TarFlowStep, params=TarFlowStepParams,
             summary="TarFlow's autoregressive affine block over patch tokens: causal transformer, shift by one, "
                     "z = (x - b) exp(-a); inverse sequential (key/value cache) or Jacobi")
