"""``net:gated_resnet``: Flow++'s conditioner, gated convolutions with layer norm and self-attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowkit import ShapeError, hookimpl, param
from flowkit.contracts.context import VectorContext, context_form
from flowkit.nn.data_init import data_dependent_init, mark

Shape = tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class GatedResNetParams:
    hidden: int = param(96, "channels of the residual stream (Flow++ on CIFAR-10: 96)")
    blocks: int = param(10, "blocks of gated conv + layer norm + attention + layer norm (CIFAR-10: 10)")
    heads: int = param(4, "attention heads; hidden must be divisible by heads (CIFAR-10: 4)")
    attention: bool = param(
        True, "self-attention in each block; false: Flow++'s ablation, a gated pointwise layer of equal size"
    )
    dropout: float = param(0.2, "dropout after the gated conv and the attention (CIFAR-10: 0.2)")
    init_scale: float = param(
        0.1, "scale of the output layer's initial weights; keep > 0 for mixlogistic (breaks component symmetry)"
    )
    init: Literal["fixed", "data"] = param(
        "fixed", "fixed: PyTorch's initial weights, small output layers; data: every conv and linear layer "
        "standardised on the first batch, output layers to init_scale (Flow++'s data-dependent init)")

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.blocks < 0 or self.heads < 1:
            raise ValueError(f"hidden = {self.hidden}, blocks = {self.blocks}, heads = {self.heads} are out of range.")
        if self.attention and self.hidden % self.heads:
            raise ValueError(f"hidden = {self.hidden} must be divisible by heads = {self.heads}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout = {self.dropout} must be in [0, 1).")
        if self.init_scale < 0:
            raise ValueError(f"init_scale = {self.init_scale} must be >= 0.")


def concat_elu(x: Tensor, dim: int = 1) -> Tensor:
    """ELU of ``[x, -x]``: keeps both signs' information (PixelCNN++)."""
    return F.elu(torch.cat([x, -x], dim=dim))


def _scaled(module: nn.Module, scale: float) -> nn.Module:
    with torch.no_grad():
        module.weight.mul_(scale)
        module.bias.zero_()
    return module


class GatedConv(nn.Module):
    """``x + A ⊙ σ(B)`` with ``[A, B] = W2 · dropout(celu(W1 · celu(x) + Wc · celu(context)))``,
    or ``+ W_z z`` for a vector context ``z`` (`VectorContext`, zero-initialised)."""

    def __init__(self, hidden: int, context_channels: int, dropout: float, vector_dim: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * hidden, hidden, 3, padding=1)
        self.context = nn.Conv2d(2 * context_channels, hidden, 1) if context_channels else None
        self.vector = VectorContext(vector_dim, hidden) if vector_dim else None
        # A small last layer keeps each residual branch near zero at initialisation (Flow++: 0.1).
        self.gate = mark(_scaled(nn.Conv2d(2 * hidden, 2 * hidden, 1), 0.1), 0.1)
        self.dropout = dropout

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        """``context``: the concat-ELU of a spatial context, or a vector context as it is."""
        c = self.conv(concat_elu(x))
        if self.context is not None:
            c = c + self.context(context)
        if self.vector is not None:
            c = c + self.vector(context, c.dtype)
        c = F.dropout(concat_elu(c), self.dropout, self.training)
        a, b = self.gate(c).chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class GatedAttention(nn.Module):
    """``x + A ⊙ σ(B)`` with ``[A, B] = W_o · dropout(MHA(x + pos))``, on ``(B, T, C)`` tokens.

    `F.scaled_dot_product_attention` picks a flash or memory-efficient kernel where the device
    and dtype allow, so the ``T x T`` weights are never stored. Without attention (the ablation)
    the mixing is Flow++'s replacement: a max over three pointwise projections, same size.
    """

    def __init__(self, hidden: int, heads: int, attention: bool, dropout: float) -> None:
        super().__init__()
        self.heads, self.attention, self.dropout = heads, attention, dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = mark(_scaled(nn.Linear(hidden, 2 * hidden), 0.1), 0.1)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        batch, tokens, channels = x.shape
        c = self.qkv(x + pos)
        if self.attention:
            q, k, v = c.view(batch, tokens, 3, self.heads, channels // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            c = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, channels)
        else:
            c = c.view(batch, tokens, channels, 3).amax(dim=-1)
        a, b = self.out(F.dropout(c, self.dropout, self.training)).chunk(2, dim=-1)
        return x + a * torch.sigmoid(b)


class GatedResNet(nn.Module):
    """Flow++'s coupling network: ``(B, C, H, W) [+ context] -> (B, out_channels, H, W)``.

    ``conv3x3(C -> hidden)``, then ``blocks`` times: gated conv (with the context added through
    a 1x1 conv of its concat-ELU in every block), layer norm over channels, gated multi-head
    self-attention with a learned position embedding, layer norm; then ``conv3x3(-> out)``
    whose weights start at ``init_scale`` times PyTorch's default and bias zero. The context is
    ``(B, Cc, H, W)``, or a vector ``z`` of shape ``(B, Cz)``, whose zero-initialised linear
    projection is added in every block instead (`flowkit.contracts.context`). The blocks run in
    whatever dtype the input (or autocast) gives; layer norm and attention use PyTorch's fused
    kernels. Between the gated conv and the attention the stream is kept in channels-last
    layout, so no transposes are materialised.

    References:
        Ho et al., "Flow++", ICML 2019, section 3.3; Salimans et al., "PixelCNN++", 2017 (gated
        residual blocks, concat ELU); Vaswani et al., "Attention is all you need", 2017.

    Example:
        >>> import flowkit
        >>> net = flowkit.build("net", "gated_resnet", in_shape=(2, 8, 8), out_channels=6,
        ...                     hidden=16, blocks=1, heads=2)
        >>> net(torch.randn(4, 2, 8, 8)).shape
        torch.Size([4, 6, 8, 8])
    """

    def __init__(
        self, params: GatedResNetParams, *, in_shape: Shape, out_channels: int, context_shape: Shape | None = None,
        build: Any = None,
    ) -> None:
        super().__init__()
        hidden, blocks, heads, attention = params.hidden, params.blocks, params.heads, params.attention
        dropout, init_scale = params.dropout, params.init_scale
        if len(in_shape) != 3:
            raise ShapeError(f"GatedResNet expects in_shape = (C, H, W), got {tuple(in_shape)}.")
        channels, height, width = (int(s) for s in in_shape)
        self.in_shape = (channels, height, width)
        self.out_channels = out_channels
        self.context_shape = None if context_shape is None else tuple(int(s) for s in context_shape)
        form = context_form(self.context_shape, self.in_shape, "GatedResNet")
        context_channels = self.context_shape[0] if form == "spatial" else 0
        vector_dim = self.context_shape[0] if form == "vector" else 0
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.pos = nn.Parameter(0.01 * torch.randn(height * width, hidden))
        self.convs = nn.ModuleList(GatedConv(hidden, context_channels, dropout, vector_dim) for _ in range(blocks))
        self.attns = nn.ModuleList(GatedAttention(hidden, heads, attention, dropout) for _ in range(blocks))
        self.norms1 = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(blocks))
        self.norms2 = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(blocks))
        self.conv_out = mark(_scaled(nn.Conv2d(hidden, out_channels, 3, padding=1), init_scale), init_scale)
        self.data_init = params.init == "data"
        if self.data_init:  # the flag is saved with the weights, so a restored net is not re-initialised
            self.register_buffer("initialized", torch.tensor(False))

    def _context(self, x: Tensor, context: Tensor | None) -> Tensor | None:
        if self.context_shape is None:
            if context is not None:
                raise ShapeError(
                    f"GatedResNet was built without context but was given a context of shape {tuple(context.shape)}."
                )
            return None
        if context is None:
            raise ShapeError(f"GatedResNet was built with context of shape {self.context_shape} but was called without.")
        if tuple(context.shape[1:]) != self.context_shape or context.shape[0] != x.shape[0]:
            raise ShapeError(
                f"GatedResNet expected a context of shape (B, {', '.join(map(str, self.context_shape))}) with "
                f"B = {x.shape[0]}, got {tuple(context.shape)}."
            )
        if context.dim() == 2:
            return context
        return concat_elu(context.to(x.dtype))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            c, h, w = self.in_shape
            raise ShapeError(f"GatedResNet expected input of shape (B, {c}, {h}, {w}), got {tuple(x.shape)}.")
        context = self._context(x, context)
        batch, _, height, width = x.shape
        h = self.conv_in(x)
        for conv, norm1, attn, norm2 in zip(self.convs, self.norms1, self.attns, self.norms2, strict=True):
            h = conv(h, context)
            tokens = norm1(h.permute(0, 2, 3, 1)).reshape(batch, height * width, -1)
            tokens = norm2(attn(tokens, self.pos.to(tokens.dtype)))
            # A channels-last view: the next convolution reads it without a copy.
            h = tokens.view(batch, height, width, -1).permute(0, 3, 1, 2)
        return self.conv_out(h)


    @torch.no_grad()
    def initialize(self, x: Tensor, context: Tensor | None = None) -> None:
        """With ``init = "data"``, Flow++'s data-dependent initialisation on the batch ``x`` (once:
        a restored net keeps its weights; the ``initialized`` flag lives in the state dict)."""
        if self.data_init and not bool(self.initialized):  # the flag exists exactly when data_init
            data_dependent_init(self, lambda: self(x, context), skip=(VectorContext,))
            self.initialized.fill_(True)


@hookimpl
def flowkit_register_nets(register: Any) -> None:
    register("gated_resnet", GatedResNet, params=GatedResNetParams,
             summary="Flow++'s gated residual conv net with layer norm, multi-head self-attention and dropout")
