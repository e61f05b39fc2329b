"""``coupling:mixlogistic``: Flow++'s logistic-mixture CDF coupling (Ho et al. 2019, section 3.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from flowkit import FlowkitError, PartRef, ShapeError, Transform, hookimpl, param, part_field
from flowkit.contracts.transform import logdet_dtype
from flowkit.nn.coupling import CompactHalves
from flowkit.nn.masks import SPATIAL_MASKS

Shape = tuple[int, ...]
MaskKind = Literal["channel", "checkerboard", "columns"]

#: Bounds on the log-scale of each logistic component. The lower one is Flow++'s (-7); the
#: upper one keeps exp(log_s) * t finite in the inverse's bracket.
MIN_LOG_SCALE = -7.0
MAX_LOG_SCALE = 7.0


class InverseDidNotConverge(FlowkitError):
    """The bisection inverse of a mixture CDF did not reach its tolerance within max_iter."""

    exit_code = 1


@dataclass(frozen=True, kw_only=True)
class MixLogisticParams:
    mask: MaskKind = param(
        "checkerboard", "channel: halves of the channels; checkerboard: the pixels with (i + j) % 2 == parity condition; "
        "columns: the columns j with j % 2 == parity condition (Flow++'s released CheckerboardSplit)"
    )
    parity: int = param(0, "which half is transformed (0 or 1); alternate it between steps")
    components: int = param(32, "logistic mixture components K (Flow++ uses 32)")
    tol: float = param(1e-6, "absolute tolerance of the bisection inverse (float32 adds a few ulps of |x|)")
    max_iter: int = param(100, "iteration limit of the bisection inverse; not converging raises")
    net: PartRef = part_field("net", "gated_resnet", "conditioner predicting the 2 + 3K parameters per entry")

    def __post_init__(self) -> None:
        if self.parity not in (0, 1):
            raise ValueError(f"parity = {self.parity} must be 0 or 1.")
        if self.components < 1:
            raise ValueError(f"components = {self.components} must be >= 1.")
        if not self.tol > 0 or self.max_iter < 1:
            raise ValueError(f"tol = {self.tol} must be > 0 and max_iter = {self.max_iter} >= 1.")


# --- the elementwise map, in log space ---------------------------------------------------


def split_net_output(h: Tensor, components: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(a, b, log_pi, mu, log_s)`` from a net output ``(B, (2 + 3K) * Ct, H, W)``.

    Channel ``j * Ct + c`` holds parameter ``j`` of entry channel ``c``. ``a = tanh(.)`` bounds
    the log-scale of the outer affine map to [-1, 1] as Flow++ does; mixture tensors come back
    as ``(B, K, Ct, H, W)``.
    """
    batch, channels, height, width = h.shape
    k = components
    h = h.view(batch, 2 + 3 * k, channels // (2 + 3 * k), height, width)
    a = torch.tanh(h[:, 0])
    b = h[:, 1]
    log_pi = F.log_softmax(h[:, 2 : 2 + k], dim=1)
    mu = h[:, 2 + k : 2 + 2 * k]
    log_s = h[:, 2 + 2 * k :].clamp(MIN_LOG_SCALE, MAX_LOG_SCALE)
    return a, b, log_pi, mu, log_s


def logit_mixture_cdf(x: Tensor, log_pi: Tensor, mu: Tensor, log_s: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(σ⁻¹(F(x)), log dσ⁻¹(F(x))/dx)`` for the mixture CDF ``F = Σ_k π_k σ((x - μ_k) / s_k)``.

    Everything stays in log space: ``σ⁻¹(F) = log F - log(1 - F)`` with both logs taken by
    logsumexp over ``log π_k + log σ(±u_k)``, so F is never rounded to 0 or 1 and the result is
    finite for every finite input, however far in the tails. The log-derivative is
    ``log f - log F - log(1 - F)`` with ``log f = logsumexp(log π - log s + log σ(u) + log σ(-u))``.

    ``x`` is ``(B, Ct, H, W)``, the mixture tensors ``(B, K, Ct, H, W)``.
    """
    u = (x.unsqueeze(1) - mu) * torch.exp(-log_s)
    log_sig_pos = F.logsigmoid(u)
    log_sig_neg = F.logsigmoid(-u)
    log_cdf = torch.logsumexp(log_pi + log_sig_pos, dim=1)
    log_sf = torch.logsumexp(log_pi + log_sig_neg, dim=1)
    log_pdf = torch.logsumexp(log_pi - log_s + log_sig_pos + log_sig_neg, dim=1)
    return log_cdf - log_sf, log_pdf - log_cdf - log_sf


def _logit_cdf_only(x: Tensor, log_pi: Tensor, mu: Tensor, log_s: Tensor) -> Tensor:
    u = (x.unsqueeze(1) - mu) * torch.exp(-log_s)
    return torch.logsumexp(log_pi + F.logsigmoid(u), dim=1) - torch.logsumexp(log_pi + F.logsigmoid(-u), dim=1)


@torch.no_grad()
def invert_logit_mixture_cdf(
    target: Tensor, log_pi: Tensor, mu: Tensor, log_s: Tensor, *, tol: float, max_iter: int
) -> Tensor:
    """The ``x`` with ``σ⁻¹(F(x)) = target``, by vectorised bisection on an exact bracket.

    ``σ⁻¹(F(x))`` lies between ``min_k u_k`` and ``max_k u_k`` (F is a convex combination of
    the component CDFs and σ⁻¹ is increasing), so the root lies in
    ``[min_k(μ_k + s_k t), max_k(μ_k + s_k t)]``: no bracket search, and every step halves it.
    Stops when every bracket is narrower than ``tol`` plus 4 ulps of ``|x|`` (float32 cannot
    resolve 1e-6 at |x| > 8); the returned midpoint is then within half that of the root.
    Raises `InverseDidNotConverge` after ``max_iter`` halvings.

    An entry whose bracket is not finite (its target already overflowed in the step after it,
    or its mixture came from a net fed such a value) has no root to find: it comes back as
    the bracket's midpoint, ±inf or NaN, and the rest converge as usual. The sample it belongs
    to is then an overflowed one, which the run engine saturates and counts as it does for
    every model; raising here made one such sample end a run's evaluation.
    """
    ends = mu + torch.exp(log_s) * target.unsqueeze(1)
    lo, hi = ends.amin(dim=1), ends.amax(dim=1)
    overflowed = ~(torch.isfinite(lo) & torch.isfinite(hi))
    eps = torch.finfo(target.dtype).eps
    for i in range(max_iter):
        mid = 0.5 * (lo + hi)
        above = _logit_cdf_only(mid, log_pi, mu, log_s) > target
        hi = torch.where(above, mid, hi)
        lo = torch.where(above, lo, mid)
        # A host sync every 4 halvings only: sampling, not the training hot path.
        if i % 4 == 3 or i == max_iter - 1:
            slack = tol + 4 * eps * torch.maximum(lo.abs(), hi.abs())
            if bool(((hi - lo <= slack) | overflowed).all()):
                return 0.5 * (lo + hi)
    worst = float((hi - lo).masked_fill(overflowed, 0.0).max())
    raise InverseDidNotConverge(
        f"The mixlogistic inverse did not converge in max_iter = {max_iter} bisection steps "
        f"(widest bracket {worst:.3g}, tol = {tol:g}); raise max_iter or tol."
    )


class MixLogisticCoupling(Transform):
    r"""Logistic-mixture CDF coupling: ``y_t = σ⁻¹(F(x_t; π, μ, s)) · exp(a) + b``, ``y_c = x_c``.

    The net maps the conditioning half (and the context) to ``2 + 3K`` values per transformed
    entry: ``a`` (through tanh), ``b``, and K mixture logits, means and log-scales (clamped to
    [-7, 7]). ``F`` is the CDF of the K-component logistic mixture.

    .. math::

        \log\left|\det \frac{\partial y}{\partial x}\right|
            = \sum_{i \in t} \big[\log f(x_i) - \log F(x_i) - \log(1 - F(x_i)) + a_i\big]

    with ``f`` the mixture density, all terms computed by logsumexp/logsigmoid (see
    `logit_mixture_cdf`) in at least float32 with autocast off, whatever dtype the net runs in.
    The inverse solves ``σ⁻¹(F(x)) = (y - b) e^{-a}`` by bisection on an exact bracket to
    ``tol`` (`invert_logit_mixture_cdf`); its gradient is the implicit-function one (the root
    is not backpropagated through the bisection steps). With a checkerboard mask the net sees ``(C, H, W/2)`` and a spatial context
    ``(Cc, H, W)`` is handed to it as ``(2 Cc, H, W/2)`` (both halves stacked on channels).

    With the net's output near zero (all components alike) the coupling starts near the
    identity: ``σ⁻¹(σ(x)) = x``.

    References:
        Ho, Chen, Srinivas, Duan, Abbeel, "Flow++: Improving Flow-Based Generative Models with
        Variational Dequantization and Architecture Design", ICML 2019.

    Example:
        >>> import flowkit
        >>> t = flowkit.build("coupling", "mixlogistic", in_shape=(2, 4, 4), components=4,
        ...                   net={"use": "gated_resnet", "hidden": 8, "blocks": 1, "heads": 2})
        >>> z, logabsdet = t(torch.randn(3, 2, 4, 4))
    """

    def __init__(
        self, params: MixLogisticParams, *, in_shape: Shape, context_shape: Shape | None = None, build: Any
    ) -> None:
        super().__init__()
        mask, parity, components = params.mask, params.parity, params.components
        if len(in_shape) != 3:
            raise ShapeError(f"MixLogisticCoupling expects in_shape = (C, H, W), got {tuple(in_shape)}.")
        self.in_shape = tuple(int(s) for s in in_shape)
        self.mask_kind, self.parity, self.components = mask, parity, components
        self.tol, self.max_iter = params.tol, params.max_iter
        self.context_shape = None if context_shape is None else tuple(int(s) for s in context_shape)
        self._halves = CompactHalves(self.in_shape, mask, parity)
        if mask in SPATIAL_MASKS:
            self.register_buffer("cond_is_even_col", self._halves.cond_is_even_col, persistent=False)
        else:
            self.cond_is_even_col = None
        self.net = build(
            params.net, in_shape=self._halves.cond_shape, context_shape=self._net_context_shape(),
            out_channels=(2 + 3 * components) * self._halves.trans_shape[0],
        )

    def _splits_context(self) -> bool:
        cs = self.context_shape
        return self.mask_kind in SPATIAL_MASKS and cs is not None and len(cs) == 3 and cs[1:] == self.in_shape[1:]

    def _net_context_shape(self) -> Shape | None:
        if self._splits_context():
            cc, h, w = self.context_shape
            return (2 * cc, h, w // 2)
        return self.context_shape

    def _net_context(self, context: Tensor | None) -> Tensor | None:
        if context is None or not self._splits_context():
            return context
        return torch.cat(self._halves.split(context, self.cond_is_even_col), dim=1)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            c, h, w = self.in_shape
            raise ShapeError(f"MixLogisticCoupling expected input of shape (B, {c}, {h}, {w}), got {tuple(x.shape)}.")

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(x, context)
        self._check_input(x)
        dtype = logdet_dtype(x)
        cond, trans = self._halves.split(x, self.cond_is_even_col)
        h = self.net(cond, self._net_context(context))
        with torch.autocast(device_type=x.device.type, enabled=False):
            a, b, log_pi, mu, log_s = split_net_output(h.to(dtype), self.components)
            t, log_deriv = logit_mixture_cdf(trans.to(dtype), log_pi, mu, log_s)
            y = t * torch.exp(a) + b
            logabsdet = (log_deriv + a).sum(dim=(1, 2, 3))
        return self._halves.merge(cond, y.to(x.dtype), self.cond_is_even_col), logabsdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(z, context)
        self._check_input(z)
        dtype = logdet_dtype(z)
        cond, trans = self._halves.split(z, self.cond_is_even_col)
        h = self.net(cond, self._net_context(context))
        with torch.autocast(device_type=z.device.type, enabled=False):
            a, b, log_pi, mu, log_s = split_net_output(h.to(dtype), self.components)
            target = (trans.to(dtype) - b) * torch.exp(-a)
            root = invert_logit_mixture_cdf(target.detach(), log_pi.detach(), mu.detach(), log_s.detach(),
                                            tol=self.tol, max_iter=self.max_iter)
            t_root, log_deriv = logit_mixture_cdf(root, log_pi, mu, log_s)
            # The value stays the bisection root; the gradient is that of one Newton step,
            # i.e. the implicit-function gradient dx = (dt - ∂g/∂θ dθ) / g'(x).
            newton = (t_root - target) * torch.exp(-log_deriv)
            x = root - (newton - newton.detach())
            if torch.is_grad_enabled():
                _, log_deriv = logit_mixture_cdf(x, log_pi, mu, log_s)
            logabsdet = -(log_deriv + a).sum(dim=(1, 2, 3))
        return self._halves.merge(cond, x.to(z.dtype), self.cond_is_even_col), logabsdet

    @torch.no_grad()
    def initialize(self, x: Tensor, context: Tensor | None = None) -> None:
        """Hands the conditioning half to the net's own ``initialize``, where it has one."""
        self.check_context(x, context)
        init = getattr(self.net, "initialize", None)
        if init is not None:
            cond, _ = self._halves.split(x, self.cond_is_even_col)
            init(cond, self._net_context(context))

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, mask={self.mask_kind}, parity={self.parity}, components={self.components}"


@hookimpl
def flowkit_register_couplings(register: Any) -> None:
    register("mixlogistic", MixLogisticCoupling, params=MixLogisticParams,
             summary="logistic-mixture CDF coupling (Flow++), channel or checkerboard mask")
