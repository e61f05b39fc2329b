"""Model ``multiscale``: Glow's multi-scale architecture (squeeze, K steps, split) with any step.

Glow and MaCow differ only in the recipe: the ``step`` part (``glow`` or ``macow``) and, for
MaCow's fine-grained variant, ``splits = 2`` and a few ``bottom_depth`` steps at full size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from flowkit import Copies, Derive, PartRef, ShapeError, hookimpl, param, part_field
from flowkit.models import (
    Centre,
    Chain,
    Entry,
    LayoutFlow,
    LayoutModel,
    OneLatentLevel,
    Split,
    Squeeze,
    Step,
    rename_state_dict_keys,
)
from flowkit.params import MAX_COPIES
from flowkit_plugins.models._multiscale_nflows import NflowsGlow, glow_problems, nflows_glow

if TYPE_CHECKING:
    from flowkit.contracts.prior import Prior
    from flowkit.registry import RegisterFn

Shape = tuple[int, int, int]


@dataclass(frozen=True, kw_only=True)
class MultiscaleParams:
    levels: int = param(3, "L: levels, each squeeze -> K steps -> split (the last one: no split, top prior)")
    depth: int = param(32, "K: steps per level (per split when splits > 1)")
    splits: int = param(
        1, "factor-outs per level, each of C/(2 splits) channels after its own K steps (1: Glow; 2: MaCow-fine)"
    )
    bottom_depth: int = param(0, "steps at full resolution before the first squeeze (MaCow-fine: 4)")
    step: PartRef = part_field("step", "glow", "the flow step, any registered step (glow, macow, ...)")
    bottom_step: PartRef = part_field("step", "glow", "the step used for the bottom_depth steps (unused when 0)")
    squeeze: PartRef = part_field(
        "decomposition", "squeeze", "space-to-depth at each level; another decomposition (haar) works too"
    )
    split_prior: PartRef = part_field(
        "prior", "conditional_gaussian", "prior of each factored-out part given the kept part (Glow: zero-init conv)"
    )
    top_prior: PartRef = part_field("prior", "learned_gaussian", "prior of the top latent (Glow's learntop)")
    split_flow: bool = param(
        False, "run split_step before each factor-out, its coupling transforming the channels about to be factored "
        "out given the kept ones (MaCow's prior flow; pair it with split_prior = gaussian)")
    split_step: PartRef = part_field(
        "step", "glow", "the step before each factor-out when split_flow (MaCow: actnorm, 1x1 conv, NICE coupling)")

    def __post_init__(self) -> None:
        for name in ("levels", "depth", "splits"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 1.")
        steps = ((self.levels - 1) * self.splits + 1) * self.depth + self.bottom_depth
        if self.levels > 32 or self.splits > 32 or steps > MAX_COPIES:
            raise ValueError(f"levels = {self.levels}, splits = {self.splits}, depth = {self.depth} and bottom_depth = "
                             f"{self.bottom_depth} make {steps} steps; at most 32 levels, 32 splits and "
                             f"{MAX_COPIES} steps.")
        if self.bottom_depth < 0:
            raise ValueError(f"bottom_depth = {self.bottom_depth} must be >= 0.")

    def copies(self) -> dict[str, Copies]:
        """The steps, all alike: ``bottom_depth`` bottom steps, and K per split of each level
        below the top plus K at the top. (None is derived: Glow mixes channels with its 1x1
        convolution instead of alternating the coupling's parity.)"""
        # Split i of a level factors out C/(2s) of the C - i*C/(2s) channels it holds: the last
        # C' // (2s - i) of them, MaCow's NICE(factor = 2s - i) (macow/flows/macow.py, MaCowInternalBlock).
        factors = tuple(2 * self.splits - i for _ in range(self.levels - 1) for i in range(self.splits))
        factors = factors if self.split_flow else ()
        split = Copies(len(factors), (
            Derive("coupling", "factor", factors, "the channels each split factors out: the last C // factor"),
            Derive("coupling", "parity", (0,) * len(factors), "the factored-out part is the one transformed"),
        ))
        return {"bottom_step": Copies(self.bottom_depth),
                "step": Copies(((self.levels - 1) * self.splits + 1) * self.depth), "split_step": split}


class Multiscale(OneLatentLevel, LayoutModel):
    r"""Glow's multi-scale flow: ``L`` levels of squeeze -> ``K`` steps -> split, with learned priors.

    Data ``y`` in ``[0, 1)^D`` is centred, ``x = y - 1/2`` (Glow's preprocessing; a shift, so
    it adds nothing to the log-density). Optional ``bottom_depth`` steps run at full
    resolution. Each level squeezes (space to depth), runs ``K`` steps and factors out the last
    ``C/2`` channels, ``z_l``, whose prior is conditioned on the kept channels ``h_l``
    (``split_prior``, Glow: a zero-initialised 3x3 convolution predicting mean and
    log-scale). With ``splits = s > 1`` a level runs ``s`` rounds of ``K`` steps, each followed
    by a factor-out of ``C/(2s)`` channels (MaCow's fine-grained architecture, ``s = 2``). The
    last level has no split; its output ``z_L`` has the ``top_prior``. Then

    .. math::

        \log p(y) = \sum_{l < L} \Big[ \log|\det J_l| + \sum \log p(z_l \mid h_l) \Big]
            + \log|\det J_L| + \log p_\text{top}(z_L),

    which `log_prob_parts` returns as ``level1 .. level{L-1}`` and ``top``; ``part_dims``
    gives each term the dimensions it factors out (the top: those left), and they add up to D.
    Bottom steps count in ``level1`` (in ``top`` when ``L = 1``).

    The model lists these parts as a layout (`layout`) and the shared walker,
    `flowkit.models.LayoutFlow` (``self.flow``), builds and walks it: the forward and inverse
    passes, the data-dependent initialisation and the latents all come from there.

    Sampling runs the inverse from the top: each factored-out part is drawn from its prior
    given the part already generated, with temperature ``T`` scaling the standard deviations
    (``T = 0``: the means). Class conditioning (Glow's ``ycond``) is not implemented. Built
    with a ``context_shape`` (the ``vae_flow`` model builds its decoder so), every step, and so
    every coupling net, gets the context, which ``log_prob_parts``, ``encode``, ``decode``,
    ``sample`` and ``initialize`` then take as ``context``; the priors do not.

    References:
        Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018
        (openai/glow ``model.py``: ``split2d``, ``prior``); Dinh et al., "Density estimation
        using Real NVP", 2017 (multi-scale architecture); Ma et al., "MaCow", 2019 (section 3.2).

    Example:
        >>> import flowkit
        >>> model = flowkit.build("model", "multiscale", in_shape=(1, 8, 8), levels=2, depth=2)
        >>> model.log_prob(torch.rand(4, 1, 8, 8)).shape
        torch.Size([4])
    """

    def __init__(self, params: MultiscaleParams, *, in_shape: Shape, build: Callable[..., Any],
                 context_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)  # type: ignore[assignment]
        # A vector context (the VAE-flow's global latent) reaches every step, hence every coupling net.
        self.context_shape = None if context_shape is None else tuple(int(s) for s in context_shape)
        channels, height, width = self.in_shape
        factor = 2 ** params.levels
        if height % factor or width % factor:
            raise ShapeError(
                f"multiscale with levels = {params.levels} squeezes {params.levels} times, so height and "
                f"width must be divisible by {factor}; got {height}x{width} (28x28 MNIST allows levels <= 2)."
            )
        # Every level below the top holds 2^(l+1) C channels after its squeeze; if the first one's
        # half divides in `splits` equal parts, so do the others'.
        if params.levels > 1 and (4 * channels) % (2 * params.splits):
            raise ShapeError(
                f"Level 1 of multiscale has {4 * channels} channels, whose half cannot be factored out in "
                f"splits = {params.splits} equal parts; use a number of splits dividing {2 * channels}."
            )
        self.params = params
        layout, legacy = self.layout(params, build, self.context_shape)
        self.flow = LayoutFlow(layout, in_shape=self.in_shape, prior=params.top_prior, build=build,
                               context_shape=self.context_shape, top="top", name="multiscale")
        self.top_shape: Shape = self.flow.out_shape
        # Checkpoints written before the walker (levels.<l>.stages.<s>.steps, ...) still load.
        rename_state_dict_keys(self, {old: f"flow.{self.flow.path(index)}{rest}"
                                      for old, (index, rest) in legacy.items()} | {"top_prior.": "flow.prior."})

    @staticmethod
    def layout(params: MultiscaleParams, build: Callable[..., Any], context_shape: tuple[int, ...] | None,
               ) -> tuple[list[Entry], dict[str, tuple[int, str]]]:
        """What the model stacks: centring, the bottom steps, then per level a squeeze and, per
        split, K steps (and the split step) and the split; at the top, K steps.

        Also returns, per state_dict prefix of the structure before the walker, the layout
        entry that holds those weights now and the rest of the path below it."""
        steps = iter(build.copies(params, "step"))
        split_steps = iter(build.copies(params, "split_step"))
        layout: list[Entry] = [Step(Centre(context_shape))]
        legacy: dict[str, tuple[int, str]] = {}
        if params.bottom_depth:
            legacy["bottom."] = (len(layout), ".")
            layout.append(Step(Chain(tuple(build.copies(params, "bottom_step")))))
        for level in range(params.levels):
            legacy[f"levels.{level}.squeeze."] = (len(layout), ".")
            layout.append(Squeeze(params.squeeze))
            top = level == params.levels - 1
            for split in range(1 if top else params.splits):
                stage = Chain(tuple(next(steps) for _ in range(params.depth)))
                if params.split_flow and not top:  # MaCow's prior flow, then the split
                    stage = Chain((stage, Chain((next(split_steps),))))
                legacy[f"levels.{level}.stages.{split}.steps."] = (len(layout), ".")
                layout.append(Step(stage))
                if not top:
                    # Split i of s factors out C/(2s) of the C - i C/(2s) channels left: the last C' // (2s - i).
                    legacy[f"levels.{level}.stages.{split}.prior."] = (len(layout), ".prior.")
                    layout.append(Split(params.split_prior, term=f"level{level + 1}", factor=2 * params.splits - split))
        return layout, legacy

    @property
    def top_prior(self) -> Prior:
        """The prior of the top latent (Glow's ``learntop``)."""
        return self.flow.prior

    # -- the same model from nflows' transforms (flowkit.contracts.model.HasReferences) ------
    def references(self) -> tuple[str, ...]:
        """``flowkit bench --against nflows``: nflows' own Glow composition, these weights copied."""
        return ("nflows",)

    def reference_problems(self, name: str) -> list[str]:
        self._check_reference(name)
        problems = glow_problems(self.params)
        if self.context_shape is not None:
            problems.append("nflows composes an unconditional Glow; this model is conditioned on a context.")
        return problems

    def reference(self, name: str, n_bits: int, dtype: torch.dtype = torch.float32) -> NflowsGlow:
        self._check_reference(name)
        return nflows_glow(self, n_bits, dtype)

    def _check_reference(self, name: str) -> None:
        if name not in self.references():
            raise ShapeError(f'multiscale offers the references {", ".join(self.references())}, not "{name}".')

    def extra_repr(self) -> str:
        p = self.params
        return (f"in_shape={self.in_shape}, levels={p.levels}, depth={p.depth}, splits={p.splits}, "
                f"bottom_depth={p.bottom_depth}, top_shape={self.top_shape}")


@hookimpl
def flowkit_register_models(register: RegisterFn) -> None:
    # contexts: built with a vector context (the VAE-flow's decoder), every step, hence every
    # coupling net, is conditioned on it.
    register("multiscale", Multiscale, params=MultiscaleParams, contexts=("vector",),
             summary="Glow's multi-scale flow (squeeze, K steps, split; learned priors) with any step")
