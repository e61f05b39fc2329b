r"""Transformer blocks over the tokens of an image grid, for nets built on attention (TarFlow's
causal transformer, the ViT of Jet's couplings), and the key/value cache of decoding one
position at a time.

A net reads an image ``(B, C, H, W)`` as ``T = H W`` tokens in raster order, ``t = h W + w``
(`tokens`, `untokens`): the NCHW contract between parts holds as it is.

A `Block` is pre-LayerNorm, as both references write it (apple/ml-tarflow
``transformer_flow.py``: ``AttentionBlock``; google-research/big_vision ``models/vit.py``:
``Encoder1DBlock``)::

    x = x + Attention(LayerNorm(x))
    x = x + Linear(GELU(Linear(LayerNorm(x))))        # hidden width = expansion * width

Multi-head attention is :math:`\mathrm{softmax}(q k^\top / \sqrt{d_h}) v` per head, with the
queries, keys and values one ``Linear(width, 3 width)`` (channels ``[q | k | v]``, heads in order
within each) and an output ``Linear(width, width)``. With ``causal``, token t attends to tokens
``<= t`` only, so everything a block computes at t depends on its inputs at ``<= t``.

`KVCache`: a causal block run on the next tokens alone, given the keys and values of the earlier
ones, computes exactly what it computes for them in the full sequence (the attention of token t
sees the same keys and values either way). TarFlow's sequential inverse decodes so, one token at
a time, in O(T) attention work per token instead of O(T²).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowkit.errors import ShapeError


def tokens(x: Tensor) -> Tensor:
    """``(B, C, H, W) -> (B, H W, C)``: the grid as tokens in raster order."""
    return x.flatten(2).transpose(1, 2)


def untokens(t: Tensor, height: int, width: int) -> Tensor:
    """``(B, H W, C) -> (B, C, H, W)``, the inverse of `tokens`."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], height, width)


class KVCache:
    """The keys and values each causal `Attention` layer has seen, and how many tokens that is.

    A net decoding position by position creates one per inverse and hands it to every call; the
    layers append to it, and the net advances `length` once per call. With a guided doubled
    batch (`flowkit.nn.guidance`) the cache holds both halves, as the calls do.
    """

    def __init__(self) -> None:
        self.length = 0
        self._kv: dict[int, tuple[Tensor, Tensor]] = {}

    def extend(self, layer: nn.Module, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``layer``'s keys and values so far with ``k``, ``v`` (``(B, heads, L, d)``) appended."""
        previous = self._kv.get(id(layer))
        if previous is not None:
            k = torch.cat([previous[0], k], dim=2)
            v = torch.cat([previous[1], v], dim=2)
        self._kv[id(layer)] = (k, v)
        return k, v


class Attention(nn.Module):
    """Multi-head self-attention after a LayerNorm (module docstring); ``causal``: token t sees ``<= t``."""

    def __init__(self, width: int, heads: int, *, causal: bool, eps: float = 1e-5) -> None:
        super().__init__()
        if heads < 1 or width % heads:
            raise ShapeError(f"attention over {width} channels cannot have {heads} heads: width must be a multiple "
                             "of the number of heads.")
        self.heads, self.causal = heads, causal
        self.norm = nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(batch, length, 3 * self.heads, -1).transpose(1, 2).chunk(3, dim=1)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            if not self.causal:
                raise ShapeError("a key/value cache decodes causal attention only.")
            start = cache.length
            k, v = cache.extend(self, k, v)
            # The new tokens are positions start .. start + L - 1: each sees the cache and itself.
            mask = None
            if length > 1:
                rows = torch.arange(start, start + length, device=x.device)[:, None]
                mask = torch.arange(start + length, device=x.device)[None, :] <= rows
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    """``Linear(GELU(Linear(LayerNorm(x))))``; ``approximate``: GELU's tanh form (flax's default)."""

    def __init__(self, width: int, expansion: int, *, eps: float = 1e-5, approximate: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, expansion * width)
        self.fc2 = nn.Linear(expansion * width, width)
        self.approximate = "tanh" if approximate else "none"

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x)), approximate=self.approximate))


class Block(nn.Module):
    """``x + Attention(x)``, then ``+ MLP``: one pre-LayerNorm transformer block."""

    def __init__(self, width: int, heads: int, expansion: int = 4, *, causal: bool = False, eps: float = 1e-5,
                 approximate_gelu: bool = False) -> None:
        super().__init__()
        self.attention = Attention(width, heads, causal=causal, eps=eps)
        self.mlp = MLP(width, expansion, eps=eps, approximate=approximate_gelu)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.attention(x, cache)
        return x + self.mlp(x)
