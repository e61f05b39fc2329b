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
    Copies,
    Derive,
    Dequantizer,
    PartRef,
    Sequential,
    ShapeError,
    hookimpl,
    param,
    part_field,
)
from flowkit.contracts.transform import logdet_dtype
from flowkit.params import MAX_COPIES
from flowkit.nn.data_init import data_dependent_init, mark

Shape = tuple[int, int, int]
LOG_2PI = math.log(2 * math.pi)
#: Flow++'s coupling step: actnorm, 1x1 convolution, a checkerboard logistic-mixture coupling.
FLOWPP_STEP = {"use": "glow", "coupling": {"use": "mixlogistic", "mask": "checkerboard"}}


@dataclass(frozen=True, kw_only=True)
class VariationalParams:
    steps: int = param(4, "flow steps of q(u | x), copies of step with the coupling's parity alternating (Flow++: 4)")
    step: PartRef = part_field(
        "step", FLOWPP_STEP, "each step, conditioned on the context: glow = actnorm, 1x1 conv, coupling (Flow++: "
        "mixlogistic with a checkerboard mask and a gated_resnet of 96 channels, 2 blocks)"
    )
    context_channels: int = param(32, "channels of the context computed from x (Flow++: 32)")
    context_blocks: int = param(3, "gated conv blocks of the context encoder (Flow++: 3)")
    context_layout: Literal["image", "columns"] = param(
        "image", "image: the encoder sees the whole image and the context has its resolution (a coupling "
        "with compact halves gathers both halves of it); columns: the even and the odd columns side by side "
        "(2C channels at half width), the context at half width, as the released Flow++ (run_cifar.py "
        "shallow_processor) for its column-split couplings")
    context_init: Literal["fixed", "data"] = param(
        "fixed", "fixed: PyTorch's initialisation, gate convolutions x 0.1; data: every convolution standardised "
        "on the first batch, gate convolutions to 0.1 (Flow++'s conv2d with vcfg.init)")
    dropout: float = param(0.2, "dropout in the context encoder")
    checkpoint: bool = param(False, "recompute each step in the backward pass (gradient checkpointing)")

    def __post_init__(self) -> None:
        if self.steps > MAX_COPIES:
            raise ValueError(f"steps = {self.steps}: at most {MAX_COPIES}.")
        if self.steps < 0 or self.context_channels < 1 or self.context_blocks < 0:
            raise ValueError(
                f"steps = {self.steps}, context_blocks = {self.context_blocks} must be >= 0 and "
                f"context_channels = {self.context_channels} >= 1."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout = {self.dropout} must be in [0, 1).")

    def copies(self) -> dict[str, Copies]:
        parity = tuple(i % 2 for i in range(self.steps))
        return {"step": Copies(self.steps, (Derive("coupling", "parity", parity, "alternates step by step"),))}


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

    ``ctx(x)`` is a small gated conv net on ``x / 2^n_bits - 0.5``; ``f`` is ``steps`` copies of
    ``step`` (a Glow step: actnorm, 1x1 conv, coupling, all built by reference) conditioned on it.

    .. math::

        \log q(u \mid x) = \log N(ε) - \log|\det ∂f/∂ε| - \sum_i \big[\log σ(h_i) + \log σ(-h_i)\big],
        \quad h = f(ε)

    is the log-density of ``u`` on the unit cube, sigmoid included, as the dequantized ELBO
    ``log P(x) >= E_q[log p(y) - D log K - log q(u | x)]`` needs. Trained jointly with the
    model; `log_prob_noise` gives the density at a given ``u`` (through the inverse flow), and
    the run engine's objective the importance-weighted estimate (`flowkit.runs.objective`).

    References:
        Ho et al., "Flow++", ICML 2019, section 3.1.
    """

    def __init__(self, params: VariationalParams, *, in_shape: Shape, build: Any) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ShapeError(f"VariationalDequantizer expects in_shape = (C, H, W), got {tuple(in_shape)}.")
        self.in_shape = tuple(int(s) for s in in_shape)
        self.checkpoint = params.checkpoint
        c, h, w = self.in_shape
        self.context_layout = params.context_layout
        if params.context_layout == "columns":
            if w % 2:
                raise ShapeError(f"context_layout = \"columns\" needs an even width, got in_shape {self.in_shape}.")
            c, w = 2 * c, w // 2
        context_shape = (params.context_channels, h, w)
        self.encoder = ContextEncoder(c, params.context_channels, params.context_blocks, params.dropout)
        if params.context_init == "data":
            for conv in self.encoder.convs2:
                mark(conv, 0.1)
            # Saved with the weights: a restored dequantizer is not initialised again.
            self.register_buffer("context_initialized", torch.tensor(False))
        try:
            steps = [build(ref, in_shape=self.in_shape, context_shape=context_shape)
                     for ref in build.copies(params, "step")]
        except ShapeError as exc:
            if params.context_layout != "columns":
                raise
            raise ShapeError(
                f'context_layout = "columns" hands each step a context at half width {context_shape}, which '
                f"this step cannot take ({exc}). It suits couplings with compact halves (mixlogistic with mask "
                '"columns" or "checkerboard"); use context_layout = "image" for the others.') from None
        self.flow = Sequential(steps, context_shape=context_shape)

    def _dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def _context(self, x: Tensor, n_bits: int) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            c, h, w = self.in_shape
            raise ShapeError(f"VariationalDequantizer expected images of shape (B, {c}, {h}, {w}), got {tuple(x.shape)}.")
        x = x.to(self._dtype())
        return x, self.encoder(self._encoder_input(x, n_bits))

    def _encoder_input(self, x: Tensor, n_bits: int) -> Tensor:
        centred = x / 2**n_bits - 0.5
        if self.context_layout == "columns":  # (this, that) = CheckerboardSplit, concatenated on channels
            return torch.cat([centred[..., 0::2], centred[..., 1::2]], dim=1)
        return centred

    def _flow(self, eps: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        if self.flow.recompute and torch.is_grad_enabled():
            return self.flow(eps, context)  # train.memory = "recompute": one step's memory, not one per step
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
            # y stays in x's bin, [x/K, (x+1)/K), even where x + sigmoid(h) rounds up to x + 1 in
            # float32 (for large x at h >= ~12, and for every x at h >= ~16): the uniform
            # dequantizer's cap.
            xf = x.to(dtype)
            y = (xf + torch.sigmoid(hf)) / 2**n_bits
            y = torch.minimum(y, torch.nextafter((xf + 1) / 2**n_bits, torch.zeros((), dtype=dtype, device=x.device)))
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
        """Data-dependent initialisation of the context encoder (``context_init = "data"``, once)
        and of the flow (actnorm), on noise drawn for the batch ``x``."""
        if hasattr(self, "context_initialized") and not bool(self.context_initialized):
            encoder_input = self._encoder_input(x.to(self._dtype()), n_bits)
            data_dependent_init(self.encoder, lambda: self.encoder(encoder_input))
            self.context_initialized.fill_(True)
        x, context = self._context(x, n_bits)
        self.flow.initialize(torch.randn_like(x), context)


@hookimpl
def flowkit_register_dequantizers(register: Any) -> None:
    register("variational", VariationalDequantizer, params=VariationalParams,
             summary="variational dequantization (Flow++): a conditional flow q(u | x) squashed to [0, 1)")
