"""Model ``multiscale``: Glow's multi-scale architecture (squeeze, K steps, split) with any step.

Glow and MaCow differ only in the recipe: the ``step`` part (``glow`` or ``macow``) and, for
MaCow's fine-grained variant, ``splits = 2`` and a few ``bottom_depth`` steps at full size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from flowkit import Copies, DecompositionLayer, DensityModel, PartRef, ShapeError, Transform, hookimpl, param, part_field
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

    def __post_init__(self) -> None:
        for name in ("levels", "depth", "splits"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 1.")
        if self.bottom_depth < 0:
            raise ValueError(f"bottom_depth = {self.bottom_depth} must be >= 0.")

    def copies(self) -> dict[str, Copies]:
        """The steps, all alike: ``bottom_depth`` bottom steps, and K per split of each level
        below the top plus K at the top. (None is derived: Glow mixes channels with its 1x1
        convolution instead of alternating the coupling's parity.)"""
        return {"bottom_step": Copies(self.bottom_depth),
                "step": Copies(((self.levels - 1) * self.splits + 1) * self.depth)}


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
    (``T = 0``: the means). Class conditioning (Glow's ``ycond``) is not implemented.

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

    def __init__(self, in_shape: Shape, params: MultiscaleParams, build: Callable[..., Any]) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)  # type: ignore[assignment]
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
            made: list[Transform] = [build(next(refs), in_shape=at, context_shape=None) for _ in range(count)]
            return Sequential(made)

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
                    stages.append(_Stage(steps(step_refs, params.depth, shape), prior, keep))
                    factored += chunk * shape[1] * shape[2]
                    shape = (keep, shape[1], shape[2])
            name = "top" if top else f"level{index}"
            levels.append(_Level(squeeze, stages, name, factored))
        self.levels = nn.ModuleList(levels)
        self.top_shape: Shape = shape
        self.top_prior = build(params.top_prior, in_shape=shape, context_shape=None)
        levels[-1].dims = shape[0] * shape[1] * shape[2]

    @classmethod
    def from_params(cls, params: MultiscaleParams, *, in_shape: Shape, build: Callable[..., Any]) -> Multiscale:
        """Glow's multi-scale flow (squeeze, K steps, split; learned priors) with any registered step."""
        return cls(in_shape, params, build)

    def _check(self, y: Tensor) -> None:
        if y.dim() != 4 or tuple(y.shape[1:]) != self.in_shape:
            raise ShapeError(
                f"multiscale expected images of shape (B, {', '.join(map(str, self.in_shape))}), got "
                f"{tuple(y.shape)}."
            )

    def part_dims(self) -> dict[str, int]:
        return {level.name: level.dims for level in self.levels}

    def _walk(self, y: Tensor) -> tuple[list[tuple[_Level, Tensor, list[tuple[_Stage, Tensor, Tensor]]]], Tensor]:
        """The data-to-latent pass: per level, its log|det| (bottom steps count in the first
        level) and ``(stage, kept, factored out)`` of each split; and the top latent."""
        self._check(y)
        h = y - CENTRE
        logabsdet = zeros_logabsdet(h)
        if self.bottom is not None:
            h, logabsdet = self.bottom(h)
        walked = []
        for level in self.levels:
            h, squeeze_logabsdet = level.squeeze(h)
            logabsdet = logabsdet + squeeze_logabsdet
            splits = []
            for stage in level.stages:
                h, step_logabsdet = stage.steps(h)
                logabsdet = logabsdet + step_logabsdet
                if stage.prior is not None:
                    kept, out = h[:, : stage.keep], h[:, stage.keep :]
                    splits.append((stage, kept, out))
                    h = kept
            walked.append((level, logabsdet, splits))
            logabsdet = zeros_logabsdet(h)
        return walked, h

    def log_prob_parts(self, y: Tensor) -> dict[str, Tensor]:
        walked, top = self._walk(y)
        parts: dict[str, Tensor] = {}
        for level, logabsdet, splits in walked:
            total = logabsdet
            for stage, kept, out in splits:
                total = total + stage.out_log_prob(out, kept)
            parts[level.name] = total
        parts["top"] = parts["top"] + self.top_prior.log_prob(top)
        return parts

    def encode(self, y: Tensor) -> tuple[list[Tensor], Tensor]:
        """The latents ``[z_1 (first factored out), ..., z_top]`` and log|det| of the whole map."""
        walked, top = self._walk(y)
        latents = [out for _, _, splits in walked for _, _, out in splits] + [top]
        return latents, torch.stack([logabsdet for _, logabsdet, _ in walked]).sum(0)

    def _generate(self, h: Tensor, factored_out: Callable[[_Stage, Tensor], Tensor]) -> Tensor:
        """The latent-to-data pass from the top latent ``h``; ``factored_out(stage, kept)`` gives
        the part each split factored out (a stored latent, or a draw from its prior)."""
        for level in reversed(self.levels):
            for stage in reversed(level.stages):
                if stage.prior is not None:
                    h = torch.cat([h, factored_out(stage, h)], dim=1)
                h, _ = stage.steps.inverse(h)
            h, _ = level.squeeze.inverse(h)
        if self.bottom is not None:
            h, _ = self.bottom.inverse(h)
        return h + CENTRE

    def decode(self, latents: list[Tensor]) -> Tensor:
        """The inverse of `encode`: latents to ``y``."""
        latents = list(latents)
        top = latents.pop()
        return self._generate(top, lambda stage, kept: latents.pop())

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """``n`` images, drawn at ``temperature`` (0: every prior at its mean), unclamped.

        A latent far in the tails can make the exact inverse overflow (autoregressive inverses
        such as MaCow's amplify along rows, most of all in an under-trained model at
        temperature 1); the run engine saturates and counts such images for every model.
        """
        top = self.top_prior.mean(n) if temperature == 0 else self.top_prior.sample(n, temperature=temperature)
        return self._generate(top, lambda stage, kept: stage.sample_out(kept, temperature))

    @torch.no_grad()
    def initialize(self, y: Tensor) -> None:
        """Data-dependent initialisation (actnorm) of every step, level by level, on the batch ``y``."""
        self._check(y)
        h = y - CENTRE
        if self.bottom is not None:
            self.bottom.initialize(h)
            h, _ = self.bottom(h)
        for level in self.levels:
            h, _ = level.squeeze(h)
            for stage in level.stages:
                stage.steps.initialize(h)
                h, _ = stage.steps(h)
                if stage.prior is not None:
                    h = h[:, : stage.keep]

    def extra_repr(self) -> str:
        p = self.params
        return (f"in_shape={self.in_shape}, levels={p.levels}, depth={p.depth}, splits={p.splits}, "
                f"bottom_depth={p.bottom_depth}, top_shape={self.top_shape}")


@hookimpl
def flowkit_register_models(register: RegisterFn) -> None:
    register("multiscale", Multiscale.from_params, params=MultiscaleParams,
             summary="Glow's multi-scale flow (squeeze, K steps, split; learned priors) with any step")
