"""``net:vit``: a vision transformer as a coupling net (Jet's DNN, big_vision ``models/proj/jet/jet.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowkit import ShapeError, hookimpl, param
from flowkit.contracts.context import VectorContext, context_form
from flowkit.nn.transformer import Block, tokens, untokens

Shape = tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class ViTParams:
    width: int = param(256, "channels of the token embeddings (Jet's emb_dim; its default 256)")
    depth: int = param(1, "transformer blocks (Jet's block_depth; its default 1)")
    heads: int = param(4, "attention heads (Jet's num_heads; its default 4)")
    patch: int = param(1, "side of the square patches of the net's input that make one token (1: a token per "
                          "position, as Jet's couplings, whose model patchifies the image first)")
    expansion: int = param(4, "hidden width of each block's MLP, in multiples of width (big_vision's ViT: 4)")

    def __post_init__(self) -> None:
        if min(self.width, self.depth, self.heads, self.patch, self.expansion) < 1:
            raise ValueError("width, depth, heads, patch and expansion must be >= 1.")
        if self.width % self.heads:
            raise ValueError(f"width = {self.width} must be a multiple of heads = {self.heads}.")


def _lecun_normal_(weight: Tensor, fan_in: int) -> None:
    """flax's default Dense kernel init, lecun_normal: a normal truncated at 2 sigma, rescaled to
    variance 1 / fan_in (the 0.8796 is the truncated normal's standard deviation)."""
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class ViT(nn.Module):
    r"""Conditioner ``(x, context) -> (B, out_channels, H, W)``: patches of ``x`` as tokens, a
    transformer over them, and a zero-initialised head back to every position.

    .. math::

        h_0 = W_\text{in}\,\mathrm{patch}_t(x) + e_t\ [+ W_c c],\quad h_k = \mathrm{Block}_k(h_{k-1}),\quad
        \text{out} = \mathrm{depth\_to\_space}(W_\text{out}\,\mathrm{LN}(h_K) + b_\text{out})

    Jet's ``DNN`` (google-research/big_vision ``models/proj/jet/jet.py``) with big_vision's ViT
    encoder (``models/vit.py``: ``Encoder``, ``Encoder1DBlock``, ``MlpBlock``): ``init_proj``
    (a ``patch x patch`` convolution with stride ``patch``; at patch 1, Jet's dense layer per token,
    lecun-normal), a learned position embedding ``e`` (normal, std ``1/sqrt(width)``), ``depth``
    pre-LayerNorm blocks (eps 1e-6, ``heads`` heads, xavier-uniform projections with zero biases,
    a tanh-GELU MLP with biases of std 1e-6), the encoder's final LayerNorm, and ``final_proj``
    with zero weights and bias, so a coupling with this net starts as its scale-only map.
    The head's ``patch² · out_channels`` outputs per token go back to the token's pixels
    (``F.pixel_shuffle``).

    Context: a vector ``(B, Cz)`` is added to every token through a zero-initialised projection
    (`flowkit.contracts.context.VectorContext`; Jet cross-attends to its context with a
    zero-initialised output instead); a spatial ``(B, Cc, H, W)`` is concatenated to the input.

    The position embedding fixes the size: H and W must be the built ones.

    Example:
        >>> import flowkit
        >>> net = flowkit.build("net", "vit", in_shape=(8, 4, 4), out_channels=16, width=32, heads=2)
        >>> net(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 16, 4, 4])
    """

    def __init__(self, params: ViTParams, *, in_shape: Shape, out_channels: int, context_shape: Shape | None = None,
                 build: Any = None) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ShapeError(f"ViT expects in_shape = (C, H, W), got {tuple(in_shape)}.")
        channels, height, width = (int(s) for s in in_shape)
        p = params.patch
        if height % p or width % p:
            raise ShapeError(f"ViT with patch = {p} needs H and W divisible by {p}, got in_shape {tuple(in_shape)}.")
        self.in_shape = (channels, height, width)
        self.out_channels, self.patch = int(out_channels), p
        self.context_shape = None if context_shape is None else tuple(int(s) for s in context_shape)
        form = context_form(self.context_shape, self.in_shape, "ViT")
        spatial = self.context_shape[0] if form == "spatial" else 0
        dim = params.width
        self.init_proj = nn.Conv2d(channels + spatial, dim, p, stride=p)
        _lecun_normal_(self.init_proj.weight, (channels + spatial) * p * p)
        nn.init.zeros_(self.init_proj.bias)
        self.posemb = nn.Parameter(torch.randn((height // p) * (width // p), dim) / math.sqrt(dim))
        self.vector = VectorContext(self.context_shape[0], dim) if form == "vector" else None
        self.blocks = nn.ModuleList(Block(dim, params.heads, params.expansion, eps=1e-6, approximate_gelu=True)
                                    for _ in range(params.depth))
        for block in self.blocks:
            for q_k_v in block.attention.qkv.weight.chunk(3, dim=0):  # flax: one DenseGeneral each
                nn.init.xavier_uniform_(q_k_v)
            nn.init.zeros_(block.attention.qkv.bias)
            nn.init.xavier_uniform_(block.attention.proj.weight)
            nn.init.zeros_(block.attention.proj.bias)
            for layer in (block.mlp.fc1, block.mlp.fc2):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.normal_(layer.bias, std=1e-6)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.final_proj = nn.Linear(dim, p * p * out_channels)
        nn.init.zeros_(self.final_proj.weight)
        nn.init.zeros_(self.final_proj.bias)

    def _input(self, x: Tensor, context: Tensor | None) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            c, h, w = self.in_shape
            raise ShapeError(f"ViT expects input of shape (B, {c}, {h}, {w}) (its position embedding fixes H, W), "
                             f"got {tuple(x.shape)}.")
        if (context is None) != (self.context_shape is None):
            raise ShapeError(f"ViT was built with context {self.context_shape} but called with "
                             f"{None if context is None else tuple(context.shape)}.")
        if context is None or self.vector is not None:
            return x
        return torch.cat([x, context.to(x.dtype)], dim=1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = tokens(self.init_proj(self._input(x, context))) + self.posemb
        if self.vector is not None:
            h = h + self.vector(context, h.dtype).flatten(1)[:, None, :]
        for block in self.blocks:
            h = block(h)
        out = self.final_proj(self.norm(h))
        _, height, width = self.in_shape
        out = untokens(out, height // self.patch, width // self.patch)
        return F.pixel_shuffle(out, self.patch) if self.patch > 1 else out


@hookimpl
def flowkit_register_nets(register: Any) -> None:
    register("vit", ViT, params=ViTParams,
             summary="a vision transformer (Jet's coupling net): patch tokens, pre-LN blocks, zero-initialised head")
