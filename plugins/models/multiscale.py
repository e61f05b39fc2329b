"""Model ``multiscale``: Glow's multi-scale architecture (squeeze, K steps, split) with any step.

Glow and MaCow differ only in the recipe: the ``step`` part (``glow`` or ``macow``) and, for
MaCow's fine-grained variant, ``splits = 2`` and a few ``bottom_depth`` steps at full size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from flowkit import (
    Copies, DecompositionLayer, DensityModel, Derive, PartRef, ShapeError, Transform, hookimpl, param, part_field,
)
from flowkit.contracts.model import Generated, LatentLevel
from flowkit.params import MAX_COPIES
from flowkit.contracts.transform import Sequential, zeros_logabsdet

if TYPE_CHECKING:
    from flowkit.contracts.prior import Prior
    from flowkit.registry import RegisterFn

Shape = tuple[int, int, int]

#: Glow's preprocessing ``x = y - 1/2`` (a shift: log|det| = 0), so the latent is centred.
CENTRE = 0.5


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


class _Stage(nn.Module):
    """K steps, then (optionally) a split: the last ``out`` channels are factored out."""

    def __init__(self, steps: Sequential, prior: Prior | None, keep: int) -> None:
        super().__init__()
        self.steps = steps
        self.prior = prior
        self.keep = keep

    def out_log_prob(self, out: Tensor, kept: Tensor) -> Tensor:
        context = kept if self.prior.context_shape is not None else None
        return self.prior.log_prob(out, context)

    def sample_out(self, kept: Tensor, temperature: float) -> Tensor:
        context = kept if self.prior.context_shape is not None else None
        if temperature == 0:
            return self.prior.mean(kept.shape[0], context)
        return self.prior.sample(kept.shape[0], context, temperature=temperature)


class _Level(nn.Module):
    def __init__(self, squeeze: DecompositionLayer, stages: list[_Stage], name: str, dims: int) -> None:
        super().__init__()
        self.squeeze = squeeze
        self.stages = nn.ModuleList(stages)
        self.name = name
        self.dims = dims


class Multiscale(DensityModel):
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

    def __init__(self, in_shape: Shape, params: MultiscaleParams, build: Callable[..., Any],
                 context_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)  # type: ignore[assignment]
        # A vector context (the VAE-flow's global latent) reaches every step, hence every coupling net.
        self.context_shape = None if context_shape is None else tuple(int(s) for s in context_shape)
        _, height, width = self.in_shape
        factor = 2 ** params.levels
        if height % factor or width % factor:
            raise ShapeError(
                f"multiscale with levels = {params.levels} squeezes {params.levels} times, so height and "
                f"width must be divisible by {factor}; got {height}x{width} (28x28 MNIST allows levels <= 2)."
            )
        self.params = params
        shape: Shape = self.in_shape

        step_refs = iter(build.copies(params, "step"))

        def steps(refs: Iterator[PartRef], count: int, at: Shape) -> Sequential:
            made: list[Transform] = [build(next(refs), in_shape=at, context_shape=self.context_shape)
                                     for _ in range(count)]
            return Sequential(made, self.context_shape)

        split_refs = iter(build.copies(params, "split_step"))
        bottom_refs = iter(build.copies(params, "bottom_step"))
        self.bottom = steps(bottom_refs, params.bottom_depth, shape) if params.bottom_depth else None
        levels: list[_Level] = []
        for index in range(1, params.levels + 1):
            squeeze = DecompositionLayer(build(params.squeeze), shape)
            shape = squeeze.out_shape
            top = index == params.levels
            stages: list[_Stage] = []
            factored = 0
            if top:
                stages.append(_Stage(steps(step_refs, params.depth, shape), None, shape[0]))
            else:
                channels = shape[0]
                if channels % (2 * params.splits):
                    raise ShapeError(
                        f"Level {index} of multiscale has {channels} channels, whose half cannot be factored "
                        f"out in splits = {params.splits} equal parts; use a number of splits dividing "
                        f"{channels // 2}."
                    )
                chunk = channels // (2 * params.splits)
                for _ in range(params.splits):
                    keep = shape[0] - chunk
                    prior = build(params.split_prior, in_shape=(chunk, shape[1], shape[2]),
                                  context_shape=(keep, shape[1], shape[2]))
                    stage_steps = steps(step_refs, params.depth, shape)
                    if params.split_flow:  # MaCow's prior flow, then the split
                        stage_steps = Sequential([stage_steps, steps(split_refs, 1, shape)], self.context_shape)
                    stages.append(_Stage(stage_steps, prior, keep))
                    factored += chunk * shape[1] * shape[2]
                    shape = (keep, shape[1], shape[2])
            name = "top" if top else f"level{index}"
            levels.append(_Level(squeeze, stages, name, factored))
        self.levels = nn.ModuleList(levels)
        self.top_shape: Shape = shape
        self.top_prior = build(params.top_prior, in_shape=shape, context_shape=None)
        levels[-1].dims = shape[0] * shape[1] * shape[2]

    @classmethod
    def from_params(cls, params: MultiscaleParams, *, in_shape: Shape, build: Callable[..., Any],
                    context_shape: tuple[int, ...] | None = None) -> Multiscale:
        """Glow's multi-scale flow (squeeze, K steps, split; learned priors) with any registered step;
        with ``context_shape`` (a vector ``(Cz,)``), every step is conditioned on a context."""
        return cls(in_shape, params, build, context_shape)

    def _check(self, y: Tensor) -> None:
        if y.dim() != 4 or tuple(y.shape[1:]) != self.in_shape:
            raise ShapeError(
                f"multiscale expected images of shape (B, {', '.join(map(str, self.in_shape))}), got "
                f"{tuple(y.shape)}."
            )

    def part_dims(self) -> dict[str, int]:
        return {level.name: level.dims for level in self.levels}

    def _walk(self, y: Tensor, context: Tensor | None = None,
              ) -> tuple[list[tuple[_Level, Tensor, list[tuple[_Stage, Tensor, Tensor]]]], Tensor]:
        """The data-to-latent pass: per level, its log|det| (bottom steps count in the first
        level) and ``(stage, kept, factored out)`` of each split; and the top latent."""
        self._check(y)
        h = y - CENTRE
        logabsdet = zeros_logabsdet(h)
        if self.bottom is not None:
            h, logabsdet = self.bottom(h, context)
        walked = []
        for level in self.levels:
            h, squeeze_logabsdet = level.squeeze(h)
            logabsdet = logabsdet + squeeze_logabsdet
            splits = []
            for stage in level.stages:
                h, step_logabsdet = stage.steps(h, context)
                logabsdet = logabsdet + step_logabsdet
                if stage.prior is not None:
                    kept, out = h[:, : stage.keep], h[:, stage.keep :]
                    splits.append((stage, kept, out))
                    h = kept
            walked.append((level, logabsdet, splits))
            logabsdet = zeros_logabsdet(h)
        return walked, h

    def log_prob_parts(self, y: Tensor, context: Tensor | None = None) -> dict[str, Tensor]:
        walked, top = self._walk(y, context)
        parts: dict[str, Tensor] = {}
        for level, logabsdet, splits in walked:
            total = logabsdet
            for stage, kept, out in splits:
                total = total + stage.out_log_prob(out, kept)
            parts[level.name] = total
        parts["top"] = parts["top"] + self.top_prior.log_prob(top)
        return parts

    def encode(self, y: Tensor, context: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """The latents ``[z_1 (first factored out), ..., z_top]`` and log|det| of the whole map."""
        walked, top = self._walk(y, context)
        latents = [out for _, _, splits in walked for _, _, out in splits] + [top]
        return latents, torch.stack([logabsdet for _, logabsdet, _ in walked]).sum(0)

    def _generate(self, h: Tensor, factored_out: Callable[[_Stage, Tensor], Tensor],
                  context: Tensor | None = None) -> Tensor:
        """The latent-to-data pass from the top latent ``h``; ``factored_out(stage, kept)`` gives
        the part each split factored out (a stored latent, or a draw from its prior)."""
        for level in reversed(self.levels):
            for stage in reversed(level.stages):
                if stage.prior is not None:
                    h = torch.cat([h, factored_out(stage, h)], dim=1)
                h, _ = stage.steps.inverse(h, context)
            h, _ = level.squeeze.inverse(h)
        if self.bottom is not None:
            h, _ = self.bottom.inverse(h, context)
        return h + CENTRE

    def decode(self, latents: list[Tensor], context: Tensor | None = None) -> Tensor:
        """The inverse of `encode`: latents to ``y``."""
        latents = list(latents)
        top = latents.pop()
        return self._generate(top, lambda stage, kept: latents.pop(), context)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, context: Tensor | None = None) -> Tensor:
        """``n`` images, drawn at ``temperature`` (0: every prior at its mean), unclamped.

        A latent far in the tails can make the exact inverse overflow (autoregressive inverses
        such as MaCow's amplify along rows, most of all in an under-trained model at
        temperature 1); the run engine saturates and counts such images for every model.
        """
        top = self.top_prior.mean(n) if temperature == 0 else self.top_prior.sample(n, temperature=temperature)
        return self._generate(top, lambda stage, kept: stage.sample_out(kept, temperature), context)

    @torch.no_grad()
    def initialize(self, y: Tensor, context: Tensor | None = None) -> None:
        """Data-dependent initialisation (actnorm) of every step, level by level, on the batch ``y``."""
        self._check(y)
        h = y - CENTRE
        if self.bottom is not None:
            self.bottom.initialize(h, context)
            h, _ = self.bottom(h, context)
        for level in self.levels:
            h, _ = level.squeeze(h)
            for stage in level.stages:
                stage.steps.initialize(h, context)
                h, _ = stage.steps(h, context)
                if stage.prior is not None:
                    h = h[:, : stage.keep]

    # -- annealed sampling (flowkit.contracts.model.LatentLevels) ---------------------------
    def latent_levels(self) -> list[str]:
        """One level, the whole latent: each split prior depends on the parts generated before it."""
        return ["latent"]

    def latent_level(self, name: str, given: Tensor | None, n: int) -> LatentLevel:
        """The latents of `encode` flattened into one ``(n, D)`` tensor; their density is the top
        prior times each split prior given the part generated before it."""
        if name != "latent" or given is not None:
            raise ShapeError(f"multiscale has one latent level, 'latent', given nothing; got {name!r} given "
                             f"{None if given is None else tuple(given.shape)}.")
        if self.context_shape is not None:
            raise ShapeError("This multiscale flow is conditioned on a context (a vae_flow decoder); its latent "
                             "levels need that context, which annealed sampling does not supply.")
        shapes = [stage.prior.shape for level in self.levels for stage in level.stages if stage.prior is not None]
        shapes.append(self.top_shape)
        sizes = [math.prod(shape) for shape in shapes]

        def draw(temperature: float) -> Tensor:
            drawn: list[Tensor] = []  # the factored-out parts, the last factored out first

            def factored_out(stage: _Stage, kept: Tensor) -> Tensor:
                drawn.append(stage.sample_out(kept, temperature))
                return drawn[-1]

            top = self.top_prior.mean(n) if temperature == 0 else self.top_prior.sample(n, temperature=temperature)
            self._generate(top, factored_out)
            return torch.cat([part.flatten(1) for part in [*reversed(drawn), top]], dim=1)

        def generate(z: Tensor) -> Generated:
            latents = [part.reshape(len(z), *shape) for part, shape in zip(z.split(sizes, dim=1), shapes, strict=True)]
            return Generated(*self._decode_with_density(latents))

        return LatentLevel(name, (sum(sizes),), draw, generate)

    def _decode_with_density(self, latents: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """`decode`, also returning log p(latents) (the top prior and each split prior given the
        part generated before it) and log|det ∂y/∂latents|, which `_generate` does not sum
        because plain sampling never needs them."""
        latents = list(latents)
        h = latents.pop()
        log_prob, logabsdet = self.top_prior.log_prob(h), zeros_logabsdet(h)
        for level in reversed(self.levels):
            for stage in reversed(level.stages):
                if stage.prior is not None:
                    out = latents.pop()
                    log_prob = log_prob + stage.out_log_prob(out, h)
                    h = torch.cat([h, out], dim=1)
                h, step_logabsdet = stage.steps.inverse(h)
                logabsdet = logabsdet + step_logabsdet
            h, squeeze_logabsdet = level.squeeze.inverse(h)
            logabsdet = logabsdet + squeeze_logabsdet
        if self.bottom is not None:
            h, bottom_logabsdet = self.bottom.inverse(h)
            logabsdet = logabsdet + bottom_logabsdet
        return h + CENTRE, log_prob, logabsdet

    def extra_repr(self) -> str:
        p = self.params
        return (f"in_shape={self.in_shape}, levels={p.levels}, depth={p.depth}, splits={p.splits}, "
                f"bottom_depth={p.bottom_depth}, top_shape={self.top_shape}")


@hookimpl
def flowkit_register_models(register: RegisterFn) -> None:
    # contexts: built with a vector context (the VAE-flow's decoder), every step, hence every
    # coupling net, is conditioned on it.
    register("multiscale", Multiscale.from_params, params=MultiscaleParams, contexts=("vector",),
             summary="Glow's multi-scale flow (squeeze, K steps, split; learned priors) with any step")
