"""``net:causal_transformer``: TarFlow's causal transformer over the tokens of an image grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowkit import ShapeError, hookimpl, param
from flowkit.contracts.context import VectorContext, context_form
from flowkit.nn.transformer import Block, KVCache, tokens, untokens

Shape = tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class CausalTransformerParams:
    width: int = param(512, "channels of the token features (TarFlow's channels; its train.py default 512)")
    depth: int = param(8, "attention blocks (TarFlow's layers_per_block; its train.py default 8)")
    head_dim: int = param(64, "channels per attention head: heads = width / head_dim (TarFlow's MetaBlock: 64)")
    expansion: int = param(4, "hidden width of each block's MLP, in multiples of width (TarFlow: 4)")

    def __post_init__(self) -> None:
        if min(self.width, self.depth, self.head_dim, self.expansion) < 1:
            raise ValueError("width, depth, head_dim and expansion must be >= 1.")
        if self.width % self.head_dim:
            raise ValueError(f"width = {self.width} must be a multiple of head_dim = {self.head_dim}.")


class CausalTransformer(nn.Module):
    r"""``net(x (B, C, H, W), context) -> (B, out_channels, H, W)`` where the output at token t
    depends on the input at tokens ``<= t`` only (raster order, ``t = h W + w``): TarFlow's
    ``MetaBlock`` network (apple/ml-tarflow ``transformer_flow.py``) without its affine map,
    which ``step:tarflow`` applies after shifting the output by one token.

    .. math::

        h_0 = W_\text{in} x_t + e_t\ [+ W_c c],\quad h_k = \mathrm{Block}_k(h_{k-1})\ \text{(causal)},\quad
        \text{out}_t = W_\text{out} h_K + b_\text{out}

    with learned position embeddings ``e`` (``randn * 1e-2``, as the reference's ``pos_embed``),
    ``depth`` pre-LayerNorm blocks of causal attention (``width / head_dim`` heads) and a GELU MLP
    (`flowkit.nn.transformer.Block`), and ``W_out`` zero at the start (the reference zeroes the
    weight of ``proj_out`` and keeps torch's default bias; so here).

    Context: a vector ``(B, Cz)`` (a class one-hot) is added to every token through a
    zero-initialised projection (`flowkit.contracts.context.VectorContext`; the reference's
    ``class_embed`` is a table of randn * 1e-2 rows with their mean for "no class", flowkit's one
    conditioning path learns the same kind of per-class offset); a spatial one ``(B, Cc, H, W)``
    is concatenated to every token's input features.

    Decoding one position at a time: ``net(x_new, context, cache=cache)`` with ``x_new`` the next
    ``L`` tokens ``(B, C, L)`` (and a spatial context's ``(B, Cc, L)`` at the same tokens) returns
    their outputs ``(B, out_channels, L)``, equal to the full pass's at those tokens
    (`flowkit.nn.transformer.KVCache`). Guidance (`flowkit.nn.guidance.GuidedNet`) mixes these
    outputs like any other.

    Example:
        >>> import flowkit
        >>> net = flowkit.build("net", "causal_transformer", in_shape=(4, 3, 3), out_channels=8, width=32,
        ...                     depth=1, head_dim=16)
        >>> net(torch.randn(2, 4, 3, 3)).shape
        torch.Size([2, 8, 3, 3])
    """

    def __init__(self, params: CausalTransformerParams, *, in_shape: Shape, out_channels: int,
                 context_shape: Shape | None = None, build: Any = None) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ShapeError(f"CausalTransformer expects in_shape = (C, H, W), got {tuple(in_shape)}.")
        channels, height, width = (int(s) for s in in_shape)
        self.in_shape = (channels, height, width)
        self.out_channels = int(out_channels)
        self.context_shape = None if context_shape is None else tuple(int(s) for s in context_shape)
        form = context_form(self.context_shape, self.in_shape, "CausalTransformer")
        self.spatial = self.context_shape[0] if form == "spatial" else 0
        dim = params.width
        self.proj_in = nn.Linear(channels + self.spatial, dim)
        self.pos_embed = nn.Parameter(torch.randn(height * width, dim) * 1e-2)
        self.vector = VectorContext(self.context_shape[0], dim) if form == "vector" else None
        self.blocks = nn.ModuleList(Block(dim, dim // params.head_dim, params.expansion, causal=True)
                                    for _ in range(params.depth))
        self.proj_out = nn.Linear(dim, out_channels)
        nn.init.zeros_(self.proj_out.weight)  # the reference's proj_out.weight.data.fill_(0.0); bias as torch's

    def _check(self, x: Tensor, context: Tensor | None, cached: bool) -> None:
        c, h, w = self.in_shape
        if cached:
            if x.dim() != 3 or x.shape[1] != c:
                raise ShapeError(f"CausalTransformer with a cache expects the next tokens as (B, {c}, L), got "
                                 f"{tuple(x.shape)}.")
        elif x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            raise ShapeError(f"CausalTransformer expects input of shape (B, {c}, {h}, {w}), got {tuple(x.shape)}.")
        if (context is None) != (self.context_shape is None):
            raise ShapeError(f"CausalTransformer was built with context {self.context_shape} but called with "
                             f"{None if context is None else tuple(context.shape)}.")
        if context is not None and context.shape[0] != x.shape[0]:
            raise ShapeError(f"context has batch size {context.shape[0]} but the input has {x.shape[0]}.")

    def forward(self, x: Tensor, context: Tensor | None = None, *, cache: KVCache | None = None) -> Tensor:
        self._check(x, context, cache is not None)
        seq = x.transpose(1, 2) if cache is not None else tokens(x)  # (B, L, C)
        start = cache.length if cache is not None else 0
        if self.spatial:
            ctx = context.transpose(1, 2) if cache is not None else tokens(context)
            seq = torch.cat([seq, ctx.to(seq.dtype)], dim=2)
        if start + seq.shape[1] > self.pos_embed.shape[0]:
            raise ShapeError(f"CausalTransformer has {self.pos_embed.shape[0]} positions; a cache at {start} cannot "
                             f"take {seq.shape[1]} more tokens.")
        h = self.proj_in(seq) + self.pos_embed[start : start + seq.shape[1]]
        if self.vector is not None:
            h = h + self.vector(context, h.dtype).flatten(1)[:, None, :]
        for block in self.blocks:
            h = block(h, cache)
        out = self.proj_out(h)  # (B, L, out)
        if cache is not None:
            cache.length += seq.shape[1]
            return out.transpose(1, 2)
        return untokens(out, *self.in_shape[1:])


@hookimpl
def flowkit_register_nets(register: Any) -> None:
    register("causal_transformer", CausalTransformer, params=CausalTransformerParams,
             summary="TarFlow's causal transformer over the image grid's tokens: output t sees inputs <= t")
