"""``step:jet``: one Jet coupling (big_vision ``models/proj/jet/jet.py``): a fixed permutation,
a channel coupling, the permutation undone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from flowkit import PartRef, ShapeError, hookimpl, param, part_field
from flowkit.contracts.transform import Transform

Shape = tuple[int, ...]
Projection = Literal["random", "checkerboard", "checkerboard-inv", "vstripes", "vstripes-inv", "hstripes",
                     "hstripes-inv"]
SPATIAL = ("checkerboard", "vstripes", "hstripes")


@dataclass(frozen=True, kw_only=True)
class JetStepParams:
    projection: Projection = param(
        "random", "random: a channel coupling behind a fixed random permutation of the features; checkerboard, "
        "vstripes (even columns), hstripes (even rows): a spatial coupling, those tokens conditioning the others; "
        "-inv: the other way round (Jet's channels_coupling_projs and spatial_coupling_projs)")
    seed: int = param(0, "seed of the random permutation (model:jet derives one per coupling)")
    coupling: PartRef = part_field(
        "coupling", {"use": "affine", "scale_fn": "two_sigmoid", "net": {"use": "vit"}},
        "the coupling of the permuted features, which must transform the second half of the channels given the "
        "first (mask = \"channel\", parity = 0: model:jet derives them); Jet's: (x2 + b) * 2 sigmoid(s), a ViT")

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed = {self.seed} must be >= 0.")


def spatial_halves(projection: str, height: int, width: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The half-tokens ``(token, half)`` that condition and that are transformed, in order.

    The mask's set A is the tokens (raster index ``t = r W + c``) with ``(r + c) % 2 == 0``
    (checkerboard), ``c % 2 == 0`` (vstripes) or ``r % 2 == 0`` (hstripes), B the others; A
    conditions B, or B conditions A with ``-inv``. Each token's features are cut in two halves
    (big_vision's ``cut``: token m of a side becomes half-tokens ``2m`` and ``2m + 1``), so both
    sides are lists of half-tokens, T of them each.

    An odd side makes A larger than B (a 7x7 grid, MNIST at patch 4: 25 and 24 tokens for the
    checkerboard, 28 and 21 for the stripes). Then the tokens of A's last stripe, the last column
    (vstripes, odd W), the last row (hstripes, odd H) or the last token (checkerboard, odd H W),
    are split by their features: the first half of each goes with the conditioning side, the
    second with the transformed side, whichever role A has, and A's other tokens pair with B's.
    (big_vision's ``get_spatial_coupling_init`` handles even sides only: with an odd count its
    halves of ``n // 2`` tokens leave one token out of the projection.)
    """
    in_a = {"checkerboard": lambda r, c: (r + c) % 2 == 0, "vstripes": lambda r, c: c % 2 == 0,
            "hstripes": lambda r, c: r % 2 == 0}[projection.removesuffix("-inv")]
    in_split = {"checkerboard": lambda r, c: (height * width) % 2 == 1 and (r, c) == (height - 1, width - 1),
                "vstripes": lambda r, c: width % 2 == 1 and c == width - 1,
                "hstripes": lambda r, c: height % 2 == 1 and r == height - 1}[projection.removesuffix("-inv")]
    grid = [(r, c) for r in range(height) for c in range(width)]
    split = [t for t, (r, c) in enumerate(grid) if in_split(r, c)]
    a = [t for t, (r, c) in enumerate(grid) if in_a(r, c) and not in_split(r, c)]
    b = [t for t, (r, c) in enumerate(grid) if not in_a(r, c)]
    cond, trans = (b, a) if projection.endswith("-inv") else (a, b)
    return ([(t, s) for t in cond for s in (0, 1)] + [(t, 0) for t in split],
            [(t, s) for t in trans for s in (0, 1)] + [(t, 1) for t in split])


class JetStep(Transform):
    r"""One of Jet's couplings (google-research/big_vision ``models/proj/jet/jet.py``,
    ``Coupling``), on a patch grid ``(K, H, W)`` (K features per token, ``T = H W`` tokens):
    ``z = P^{-1}(c(P x))`` with ``P`` a fixed permutation of the entries and ``c`` a channel
    coupling that transforms the second half of ``P x``'s channels given the first. Both
    permutations have log|det| = 0, so the log-det is the coupling's: for Jet's affine coupling
    ``(x_2 + b) \cdot 2\sigma(s)``, :math:`\sum_{i \in 2} \log 2\sigma(s_i)`.

    - ``projection = "random"`` (a channel coupling): ``P`` permutes the K features of every token
      by one random permutation, drawn once from ``seed`` (Jet's ``channel_coupling_masks``,
      frozen). The first ``K // 2`` permuted features condition the rest.
    - a spatial projection: ``P`` gathers the conditioning tokens' features into the first K/2
      channels and the transformed tokens' into the last K/2, as half-tokens (`spatial_halves`):
      exactly Jet's ``split_spatial`` with its ``cut`` (for an even token count), so the coupling's
      net sees T tokens of K/2 features as in the reference, whatever the kind.

    ``P`` is the buffer ``index`` (``P x`` flattened = ``x`` flattened at ``index``), saved in the
    state_dict and never trained. A spatial context is gathered by the tokens the
    half-tokens come from; a vector context goes to the coupling as it is.
    """

    def __init__(self, params: JetStepParams, *, in_shape: Shape, context_shape: Shape | None = None,
                 build: Any) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ShapeError(f"JetStep expects in_shape = (K, H, W) (a patch grid), got {tuple(in_shape)}.")
        features, height, width = (int(s) for s in in_shape)
        self.in_shape = (features, height, width)
        self.context_shape = None if context_shape is None else tuple(int(s) for s in context_shape)
        self.projection = params.projection
        n = height * width
        if params.projection == "random":
            generator = torch.Generator().manual_seed(params.seed)
            perm = torch.randperm(features, generator=generator)
            index = (perm[:, None] * n + torch.arange(n)[None, :]).flatten()
            token_of = torch.arange(n)
        else:
            if features % 2:
                raise ShapeError(f"JetStep's spatial couplings cut each token's {features} features in two halves: "
                                 "they need an even number (a patch of side >= 2, or an even channel count).")
            if n < 2:
                raise ShapeError(f"JetStep's spatial couplings need at least 2 tokens, got a {height}x{width} grid.")
            cond, trans = spatial_halves(params.projection, height, width)
            half = features // 2
            rows = []
            for side in (cond, trans):
                for f in range(half):
                    rows.append(torch.tensor([(s * half + f) * n + t for t, s in side]))
            index = torch.cat(rows)
            token_of = torch.tensor([t for t, _ in cond])
        self.register_buffer("index", index)  # persistent: the permutation is part of the model
        self.register_buffer("inverse_index", torch.argsort(index), persistent=False)
        self.register_buffer("token_of", token_of, persistent=False)  # original token of each permuted token
        self.coupling = build(params.coupling, in_shape=self.in_shape, context_shape=self.context_shape)

    def _permute(self, x: Tensor, index: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            k, h, w = self.in_shape
            raise ShapeError(f"JetStep expects input of shape (B, {k}, {h}, {w}), got {tuple(x.shape)}.")
        return x.flatten(1)[:, index].reshape(x.shape)

    def _context(self, context: Tensor | None) -> Tensor | None:
        if context is None or context.dim() != 4:
            return context
        flat = context.flatten(2)[:, :, self.token_of]
        return flat.reshape(context.shape)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(x, context)
        y, logabsdet = self.coupling(self._permute(x, self.index), self._context(context))
        return self._permute(y, self.inverse_index), logabsdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(z, context)
        y, logabsdet = self.coupling.inverse(self._permute(z, self.index), self._context(context))
        return self._permute(y, self.inverse_index), logabsdet

    @torch.no_grad()
    def initialize(self, x: Tensor, context: Tensor | None = None) -> None:
        self.coupling.initialize(self._permute(x, self.index), self._context(context))

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, projection={self.projection}"


@hookimpl
def flowkit_register_steps(register: Any) -> None:
    register("jet", JetStep, params=JetStepParams,
             summary="one Jet coupling: a fixed random feature permutation or a checkerboard/stripe token split, "
                     "a channel coupling (2 sigmoid scale, ViT net), the permutation undone")
