"""Model ``jet``: Jet (Kolesnikov et al. 2024), a coupling flow of vision transformers over patches."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flowkit import Copies, Derive, PartRef, hookimpl, param, part_field
from flowkit.models import LayoutFlow, LayoutModel, Rescale, Squeeze, Step
from flowkit.params import MAX_COPIES

Shape = tuple[int, int, int]
KINDS = ("channels", "spatial")
CHANNEL_PROJECTIONS = ("random",)
SPATIAL_PROJECTIONS = ("checkerboard", "checkerboard-inv", "vstripes", "vstripes-inv", "hstripes", "hstripes-inv")


@dataclass(frozen=True, kw_only=True)
class JetParams:
    depth: int = param(2, "couplings (Jet's depth; its module default 2, the ImageNet 64 config 32)")
    kinds: tuple[str, ...] = param(
        ("channels", "channels", "spatial"), "the kinds of the couplings in turn, cycled over depth: channels or "
        "spatial (Jet's kinds; the ImageNet 64 config: four channels, one spatial)")
    channel_projections: tuple[str, ...] = param(
        CHANNEL_PROJECTIONS, "the channel couplings' projections in turn, cycled: random (a fixed random permutation)")
    spatial_projections: tuple[str, ...] = param(
        ("checkerboard", "checkerboard-inv"), "the spatial couplings' token splits in turn, cycled: checkerboard, "
        "vstripes, hstripes, each also -inv (the ImageNet 64 config uses all six)")
    seed: int = param(0, "seed of the channel couplings' random permutations (coupling i draws from seed + i)")
    patchify: PartRef = part_field(
        "decomposition", {"use": "patchify", "patch": 4, "order": "space_to_depth"},
        "the image into p x p patches (Jet's ps = 4; big_vision's einops order, pixel first)")
    step: PartRef = part_field("step", "jet", "each coupling (step:jet): its projection and seed are derived, and its "
                                              "coupling's channel mask and parity")
    prior: PartRef = part_field("prior", "gaussian", "the latent's density: N(0, I), as Jet's")

    def __post_init__(self) -> None:
        if not 1 <= self.depth <= MAX_COPIES:
            raise ValueError(f"depth = {self.depth} must be in 1..{MAX_COPIES}.")
        for name, allowed in (("kinds", KINDS), ("channel_projections", CHANNEL_PROJECTIONS),
                              ("spatial_projections", SPATIAL_PROJECTIONS)):
            values = getattr(self, name)
            bad = [v for v in values if v not in allowed]
            if not values or bad:
                raise ValueError(f"{name} = {list(values)} must list some of {', '.join(allowed)}"
                                 + (f"; {bad[0]!r} is not one of them." if bad else "."))
        if self.seed < 0:
            raise ValueError(f"seed = {self.seed} must be >= 0.")

    def projections(self) -> tuple[str, ...]:
        """Each coupling's projection: the kinds cycled, each kind's projections cycled in turn
        (big_vision's ``_interleave_couplings``)."""
        kinds = itertools.cycle(self.kinds)
        channel, spatial = itertools.cycle(self.channel_projections), itertools.cycle(self.spatial_projections)
        return tuple(next(channel) if next(kinds) == "channels" else next(spatial) for _ in range(self.depth))

    def copies(self) -> dict[str, Copies]:
        """One step per coupling, with its projection and seed; every coupling transforms the second half of
        the permuted channels given the first (the projection decides what the halves hold)."""
        n = self.depth
        return {"step": Copies(n, (
            Derive("step", "projection", self.projections(), "model.kinds and the projections, cycled"),
            Derive("step", "seed", tuple(self.seed + i for i in range(n)), "model.seed + coupling index"),
            Derive("coupling", "mask", ("channel",) * n, "the halves of the permuted channels"),
            Derive("coupling", "parity", (0,) * n, "the first half conditions the second"),
        ))}


class Jet(LayoutModel):
    r"""Jet: images to ``[-1, 1)``, ``p x p`` patches as tokens, ``depth`` couplings, N(0, I):

    .. math:: \log p(y) = \log \mathcal{N}(z; 0, I) + D \log 2 + \sum_k \sum_{i \in 2_k} \log 2\sigma(s^{(k)}_i)

    Each coupling (``step:jet``) permutes the patch grid's entries by a fixed projection, a random
    permutation of each token's features (a channel coupling) or a checkerboard / stripe split of
    the tokens (a spatial coupling), transforms the second half of the channels given the first
    with ``(x_2 + b) 2 sigma(s)``, ``(b, s)`` from a ViT (``net:vit``), and undoes the
    permutation. No multiscale, no actnorm, no 1x1 convolution: google-research/big_vision
    ``models/proj/jet/jet.py`` (``Model``, ``Coupling``, ``DNN``).

    Where flowkit differs: the random permutations are drawn by torch from ``seed + i`` (jax's
    ``fold_in`` draws others; any fixed permutation is the same model family) and are buffers
    (``index``), not frozen parameters; an odd token count is split as `step:jet` documents
    (the reference supports even counts only). big_vision's ``value_range(-1, 1)`` maps pixel
    k to k/127.5 - 1 and adds noise in ``[0, 1/127.5)``: the same bins of width 1 on the pixel
    scale as flowkit's ``(k + u) / 256`` mapped to ``2 y - 1``, so the bits/dim are the same bound.

    References:
        Kolesnikov, Susano Pinto & Tschannen, "Jet: A Modern Transformer-Based Normalizing Flow",
        2024; github.com/google-research/big_vision (``models/proj/jet/jet.py``,
        ``configs/proj/jet/imagenet64.py``, ``trainers/proj/jet/train.py``).
    """

    def __init__(self, params: JetParams, *, in_shape: Shape, build: Callable[..., Any],
                 context_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)  # type: ignore[assignment]
        self.context_shape = None if context_shape is None else tuple(int(s) for s in context_shape)
        layout = [Step(Rescale(2.0, -1.0, self.context_shape)), Squeeze(params.patchify)]
        layout += [Step(ref) for ref in build.copies(params, "step")]
        self.flow = LayoutFlow(layout, in_shape=self.in_shape, prior=params.prior, build=build, top="total",
                               name="jet", context_shape=self.context_shape)


@hookimpl
def flowkit_register_models(register: Any) -> None:
    register("jet", Jet, params=JetParams, contexts=("vector",),
             summary="Jet: channel couplings behind fixed random permutations and checkerboard/stripe spatial "
                     "couplings of ViTs over patch tokens, no multiscale")
