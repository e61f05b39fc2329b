"""``dequantizer:variational``: Flow++'s variational dequantization, a conditional flow q(u | x)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from flowkit import (
    DensityModel,
    Dequantizer,
    PartRef,
    Sequential,
    ShapeError,
    hookimpl,
    param,
    part_field,
)
from flowkit.contracts.transform import logdet_dtype

Shape = tuple[int, int, int]
LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True, kw_only=True)
class VariationalParams:
    steps: int = param(4, "flow steps of q(u | x), each actnorm, 1x1 conv, coupling (Flow++: 4)")
    mask: Literal["checkerboard", "channel"] = param(
        "checkerboard", "mask of the couplings, parity alternating (channel needs >= 2 channels)"
    )
    coupling: PartRef = part_field("coupling", "mixlogistic", "coupling of every step, conditioned on the context")
    net: PartRef = part_field("net", "gated_resnet", "conditioner of every coupling (Flow++: 96 channels, 2 blocks)")
    context_channels: int = param(32, "channels of the context computed from x (Flow++: 32)")
    context_blocks: int = param(3, "gated conv blocks of the context encoder (Flow++: 3)")
    dropout: float = param(0.2, "dropout in the context encoder")
    actnorm: bool = param(True, "actnorm before each coupling")
    invconv: Literal["lu", "plain", "none"] = param("lu", "invertible 1x1 conv before each coupling")
    checkpoint: bool = param(False, "recompute each step in the backward pass (gradient checkpointing)")

    def __post_init__(self) -> None:
        if self.steps < 0 or self.context_channels < 1 or self.context_blocks < 0:
            raise ValueError(
                f"steps = {self.steps}, context_blocks = {self.context_blocks} must be >= 0 and "
                f"context_channels = {self.context_channels} >= 1."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout = {self.dropout} must be in [0, 1).")


def _concat_elu(x: Tensor) -> Tensor:
    return F.elu(torch.cat([x, -x], dim=1))


class ContextEncoder(nn.Module):
    """Flow++'s shallow processor: ``conv3x3(C -> Cc)`` then gated residual 3x3 conv blocks."""

    def __init__(self, channels: int, hidden: int, blocks: int, dropout: float) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.convs1 = nn.ModuleList(nn.Conv2d(2 * hidden, hidden, 3, padding=1) for _ in range(blocks))
        self.convs2 = nn.ModuleList(nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1) for _ in range(blocks))
        with torch.no_grad():
            for conv in self.convs2:
                conv.weight.mul_(0.1)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for conv1, conv2 in zip(self.convs1, self.convs2, strict=True):
            c = F.dropout(_concat_elu(conv1(_concat_elu(h))), self.dropout, self.training)
            a, b = conv2(c).chunk(2, dim=1)
            h = h + a * torch.sigmoid(b)
        return h


class VariationalDequantizer(Dequantizer):
    r"""``u = sigmoid(f(ε; ctx(x)))``, ``ε ~ N(0, I)``, ``y = (x + u) / 2^n_bits``: q(u | x) is a flow.

    ``ctx(x)`` is a small gated conv net on ``x / 2^n_bits - 0.5``; ``f`` is ``steps`` coupling
    steps (actnorm, 1x1 conv, coupling with ``net``, all built by reference) conditioned on it.

    .. math::

        \log q(u \mid x) = \log N(ε) - \log|\det ∂f/∂ε| - \sum_i \big[\log σ(h_i) + \log σ(-h_i)\big],
        \quad h = f(ε)

    is the log-density of ``u`` on the unit cube, sigmoid included, as the dequantized ELBO
    ``log P(x) >= E_q[log p(y) - D log K - log q(u | x)]`` needs. Trained jointly with the
    model. `iw_log_likelihood` gives Flow++'s importance-weighted estimate with k samples,
    and `log_prob_noise` the density at a given ``u`` (through the inverse flow).

    References:
        Ho et al., "Flow++", ICML 2019, section 3.1.
    """

    def __init__(
        self, in_shape: Shape, *, steps: int, mask: str, coupling: PartRef, net: PartRef, context_channels: int,
        context_blocks: int, dropout: float, actnorm: bool, invconv: str, checkpoint: bool, build: Any,
    ) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ShapeError(f"VariationalDequantizer expects in_shape = (C, H, W), got {tuple(in_shape)}.")
        self.in_shape = tuple(int(s) for s in in_shape)
        self.checkpoint = checkpoint
        c, h, w = self.in_shape
        context_shape = (context_channels, h, w)
        self.encoder = ContextEncoder(c, context_channels, context_blocks, dropout)
        steps_list = []
        for index in range(steps):
            parts = []
            if actnorm:
                parts.append(build(PartRef("transform", "actnorm"), in_shape=self.in_shape, context_shape=context_shape))
            if invconv != "none":
                ref = build.with_params(PartRef("transform", "invconv"), who="the variational dequantizer", lu=invconv == "lu")
                parts.append(build(ref, in_shape=self.in_shape, context_shape=context_shape))
            ref = build.with_params(coupling, optional=("net",), who="the variational dequantizer", mask=mask, parity=index % 2, net=net)
            parts.append(build(ref, in_shape=self.in_shape, context_shape=context_shape))
            steps_list.append(Sequential(parts, context_shape=context_shape))
        self.flow = Sequential(steps_list, context_shape=context_shape)

    @classmethod
    def from_params(cls, params: VariationalParams, *, in_shape: Shape, build: Any) -> VariationalDequantizer:
        """Variational dequantization (Flow++): a conditional flow q(u | x), squashed to [0, 1)."""
        return cls(in_shape, steps=params.steps, mask=params.mask, coupling=params.coupling, net=params.net,
                   context_channels=params.context_channels, context_blocks=params.context_blocks,
                   dropout=params.dropout, actnorm=params.actnorm, invconv=params.invconv,
                   checkpoint=params.checkpoint, build=build)

    def _dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def _context(self, x: Tensor, n_bits: int) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            c, h, w = self.in_shape
            raise ShapeError(f"VariationalDequantizer expected images of shape (B, {c}, {h}, {w}), got {tuple(x.shape)}.")
        x = x.to(self._dtype())
        return x, self.encoder(x / 2**n_bits - 0.5)

    def _flow(self, eps: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        h, total = eps, torch.zeros(eps.shape[0], dtype=logdet_dtype(eps), device=eps.device)
        recompute = self.checkpoint and torch.is_grad_enabled()
        for step in self.flow.transforms:
            h, logabsdet = checkpoint(step, h, context, use_reentrant=False) if recompute else step(h, context)
            total = total + logabsdet
        return h, total

    def forward(self, x: Tensor, n_bits: int) -> tuple[Tensor, Tensor]:
        x, context = self._context(x, n_bits)
        eps = torch.randn_like(x)
        h, logabsdet = self._flow(eps, context)
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = logdet_dtype(h)
            hf, ef = h.to(dtype), eps.to(dtype)
            log_normal = -0.5 * (ef.square() + LOG_2PI).flatten(1).sum(1)
            log_sigmoid_det = (F.logsigmoid(hf) + F.logsigmoid(-hf)).flatten(1).sum(1)
            log_q = log_normal - logabsdet - log_sigmoid_det
            # y < 1 strictly, even where the sigmoid rounds to 1 in float32.
            y = ((x.to(dtype) + torch.sigmoid(hf)) / 2**n_bits).clamp(max=1.0 - torch.finfo(dtype).eps)
        return y.to(x.dtype), log_q

    def log_prob_noise(self, u: Tensor, x: Tensor, n_bits: int) -> Tensor:
        """``log q(u | x)`` (B,) at given noise ``u`` in (0, 1)^D, through the inverse flow."""
        x, context = self._context(x, n_bits)
        dtype = logdet_dtype(x)
        h = torch.logit(u.to(dtype))
        eps, logabsdet = self.flow.inverse(h.to(x.dtype), context)
        ef = eps.to(dtype)
        log_normal = -0.5 * (ef.square() + LOG_2PI).flatten(1).sum(1)
        log_sigmoid_det = (F.logsigmoid(h) + F.logsigmoid(-h)).flatten(1).sum(1)
        return log_normal + logabsdet - log_sigmoid_det

    @torch.no_grad()
    def initialize(self, x: Tensor, n_bits: int) -> None:
        """Data-dependent initialisation (actnorm) of the flow, on noise drawn for the batch ``x``."""
        x, context = self._context(x, n_bits)
        self.flow.initialize(torch.randn_like(x), context)

    def iw_log_likelihood(self, model: DensityModel, x: Tensor, n_bits: int, k: int) -> Tensor:
        """Importance-weighted log P(x) in nats (B,) with k samples: see `iw_log_likelihood`."""
        return iw_log_likelihood(self, model, x, n_bits, k)


@torch.no_grad()
def iw_log_likelihood(dequantizer: Dequantizer, model: DensityModel, x: Tensor, n_bits: int, k: int) -> Tensor:
    r"""``log P(x) ≈ logsumexp_k [log p(y_k) - D log K - log q(u_k | x)] - log k``, in nats, shape (B,).

    The k-sample importance-weighted bound of Flow++'s reported figures; k = 1 is the ELBO and
    it tightens as k grows (Burda et al. 2016). Works with any dequantizer (uniform gives
    log q = 0). Bits/dim: ``-result / (D log 2)``. Samples are drawn one batch at a time.
    """
    if k < 1:
        raise ValueError(f"k = {k} importance samples must be >= 1.")
    dims = x[0].numel()
    offset = dims * n_bits * math.log(2.0)
    terms = []
    for _ in range(k):
        y, log_q = dequantizer(x, n_bits)
        terms.append(model.log_prob(y).double() - torch.as_tensor(log_q).double() - offset)
    return torch.logsumexp(torch.stack(terms), dim=0) - math.log(k)


@hookimpl
def flowkit_register_dequantizers(register: Any) -> None:
    register("variational", VariationalDequantizer.from_params, params=VariationalParams,
             summary="variational dequantization (Flow++): a conditional flow q(u | x) squashed to [0, 1)")
