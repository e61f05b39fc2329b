"""Wavelet Flow (Yu et al. 2020): one conditional flow per level of an orthonormal wavelet pyramid.

With an orthonormal DWT (|det| = 1) the image density factorises exactly over the levels,

    log p(x) = log p(I_0) + Σ_{j=1..L} log p(D_{j-1} | I_{j-1}),

where I_j is the low-pass image at resolution ``base · 2^j`` (I_L = x) and D_{j-1} the
detail coefficients that take I_{j-1} to I_j. Each term is its own flow, trained on its own
parameter group (here jointly in one process by default, or alone with ``train.level``), and
none of them squeezes or splits internally.

Normalisation: y is centred (y - 0.5, log-det 0). An orthonormal analysis filter has DC gain
2 per 2-D level, so a low-pass image d levels below the input has values of order 2^d; each
flow models its variable divided by that gain (log-det -D·d·log 2, included in its term),
and its context is the low-pass image divided likewise, so every level sees unit-scale inputs.

References:
    Yu, Derpanis, Brubaker. "Wavelet Flow: Fast Training of High Resolution Normalizing
    Flows." NeurIPS 2020.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flowkit import (
    Copies,
    DensityModel,
    Derive,
    IndependentTerms,
    PartRef,
    ShapeError,
    SuperResolution,
    hookimpl,
    param,
    part_field,
)
from flowkit.contracts.context import VectorContext
from flowkit.contracts.model import Generated, LatentLevel, LatentLevels
from flowkit.contracts.transform import Sequential
from flowkit.params import MAX_COPIES


@dataclass(frozen=True, kw_only=True)
class WaveletFlowParams:
    decomposition: PartRef = part_field("decomposition", "haar", "orthonormal DWT (haar, db2..db8)")
    levels: int = param(2, "DWT levels L; the base resolution is the image side / 2^L")
    depth: tuple[int, ...] = param((8,), "steps per flow, base first then levels 1..L (one value: all)")
    hidden: tuple[int, ...] = param(
        (64,), "coupling-net width per flow, base first (one value: all; empty: each net's own hidden)")
    step: PartRef = part_field("step", "glow", "flow step of the conditional level flows")
    base_step: PartRef = part_field("step", "glow", "flow step of the unconditional base flow")
    prior: PartRef = part_field("prior", "conditional_gaussian", "prior of each level's latent, given the context")
    base_prior: PartRef = part_field("prior", "gaussian", "prior of the base flow's latent")
    cond_channels: int = param(32, "channels of the conditioning features computed from the low-pass image")
    cond_depth: int = param(2, "3x3 conv layers of the conditioning net (0: the normalised low-pass image itself)")
    crops: tuple[int, ...] = param((), "train level j on random crops of 1/crops[j] of each side (base first; 1: whole)")
    alternate: bool = param(
        True, "alternate the coupling's parity step by step; false: every coupling transforms the same part, "
        "the 1x1 convolutions mixing channels in between (the reference code's channel split)")

    def __post_init__(self) -> None:
        if not 0 <= self.levels <= 30:
            raise ValueError(f"levels = {self.levels} must be in 0..30 (a 2^30-pixel side).")
        if any(d > MAX_COPIES for d in self.depth):
            raise ValueError(f"depth = {list(self.depth)}: at most {MAX_COPIES} steps per level.")
        for key in ("depth", "hidden", "crops"):
            value = getattr(self, key)
            if value and len(value) not in (1, self.levels + 1):
                raise ValueError(f"{key} has {len(value)} entries; give 1 or levels + 1 = {self.levels + 1} "
                                 "(base first).")
            if any(v < 1 for v in value):
                raise ValueError(f"{key} = {list(value)}: every entry must be >= 1.")
        if self.cond_channels < 1 or self.cond_depth < 0:
            raise ValueError("cond_channels must be >= 1 and cond_depth >= 0.")

    def copies(self) -> dict[str, Copies]:
        """The base flow's steps and the level flows' steps (level 1 first), each a copy of its
        template with the coupling's parity alternating step by step (``alternate``) and, when ``hidden`` is
        given, the net's width of its level."""
        depth = per_level(self.depth, self.levels + 1, 8)
        hidden = per_level(self.hidden, self.levels + 1, 0)
        stacks = {"base_step": [0], "step": list(range(1, self.levels + 1))}
        out = {}
        for name, levels in stacks.items():
            parity = tuple(i % 2 * self.alternate for j in levels for i in range(depth[j]))
            why = "alternates step by step" if self.alternate else "model.alternate = false: the same part every step"
            rules = [Derive("coupling", "parity", parity, why)]
            if self.hidden:
                widths = tuple(hidden[j] for j in levels for _ in range(depth[j]))
                rules.append(Derive("net", "hidden", widths, "model.hidden, per level"))
            out[name] = Copies(len(parity), tuple(rules))
        return out


def per_level(values: tuple[int, ...], n: int, default: int = 1) -> list[int]:
    if not values:
        return [default] * n
    return list(values) * n if len(values) == 1 else list(values)


class Conditioner(nn.Module):
    """Features of the normalised low-pass image, computed once per level and shared by its steps.

    The normalised image itself is concatenated to the features, so couplings always see it.
    With a vector context (a class one-hot: ``context_dim``), a zero-initialised projection of it
    is added to the first layer's features before the ReLU (`flowkit.contracts.context.VectorContext`;
    with ``depth = 0``, it is appended as ``channels`` features of its own): the level's own
    embedding of the class, so no parameter is shared between levels.
    """

    def __init__(self, in_channels: int, channels: int, depth: int, context_dim: int = 0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(c, channels, 3, padding=1), nn.ReLU()]
            c = channels
        self.net = nn.Sequential(*layers)
        self.vector = VectorContext(context_dim, channels) if context_dim else None
        self.out_channels = in_channels + (channels if depth or context_dim else 0)

    def forward(self, low: Tensor, context: Tensor | None = None) -> Tensor:
        if self.vector is None:
            return low if len(self.net) == 0 else torch.cat([low, self.net(low)], dim=1)
        offset = self.vector(context, low.dtype)  # (B, channels, 1, 1)
        if len(self.net) == 0:
            return torch.cat([low, offset.expand(-1, -1, *low.shape[2:])], dim=1)
        h = self.net[1](self.net[0](low) + offset)
        for layer in self.net[2:]:
            h = layer(h)
        return torch.cat([low, h], dim=1)


class LevelFlow(nn.Module):
    """log p(D | I) for one level: conditioner, flow and prior on unit-scale details. The base
    flow (no conditioner) takes the model's vector context itself, when it has one."""

    def __init__(self, flow: nn.Module, prior: nn.Module, conditioner: Conditioner | None) -> None:
        super().__init__()
        self.flow, self.prior, self.conditioner = flow, prior, conditioner

    def context(self, low: Tensor | None, context: Tensor | None = None) -> Tensor | None:
        """What the level's steps are conditioned on: the conditioning features of the low-pass
        image (with the class in them), or, for the base, the model's context as it is."""
        return context if self.conditioner is None else self.conditioner(low, context)

    def prior_context(self, ctx: Tensor | None) -> Tensor | None:
        """The context as the prior takes it: none for an unconditional prior (the reference's
        final actnorm and N(0, I), a learned_gaussian), even on a conditioned level."""
        return ctx if self.prior.context_shape is not None else None

    def log_prob(self, v: Tensor, low: Tensor | None, context: Tensor | None = None) -> Tensor:
        ctx = self.context(low, context)
        z, logabsdet = self.flow(v, ctx)
        return self.prior.log_prob(z, self.prior_context(ctx)) + logabsdet

    def sample(self, n: int, low: Tensor | None, temperature: float, context: Tensor | None = None) -> Tensor:
        ctx = self.context(low, context)
        z = self.prior.sample(n, self.prior_context(ctx), temperature)
        return self.flow.inverse(z, ctx)[0]


class WaveletFlow(DensityModel, IndependentTerms, SuperResolution, LatentLevels):
    """See the module docstring. Terms: ``base`` = log p(I_0), ``level{j}`` = log p(D_{j-1} | I_{j-1}).

    Each term is a density of its own over its level's dimensions and has its own parameter
    group (`IndependentTerms`): levels train alone (``train.level``) or side by side
    (``train.level_threads``). Super-resolution samples D_j | I_j coarse to fine
    (`SuperResolution`; the ``flowkit superres`` command of this plugin).
    """

    def __init__(self, params: WaveletFlowParams, *, in_shape: tuple[int, int, int], build,  # noqa: ANN001
                 context_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        c, h, w = in_shape
        # A vector context (a class one-hot) conditions every term: the base flow's steps take
        # it as it is, each level's conditioner embeds it with a projection of its own.
        self.context_shape = None if context_shape is None else tuple(int(s) for s in context_shape)
        context_dim = 0 if self.context_shape is None else self.context_shape[0]
        L = params.levels
        if h % 2**L or w % 2**L:
            fits = max(k for k in range(L + 1) if h % 2**k == 0 and w % 2**k == 0)
            raise ShapeError(
                f"model.levels = {L} needs image sides divisible by 2^{L} = {2**L}, but the images are "
                f"{h}x{w}; allowed for this size: levels <= {fits}."
            )
        self.in_shape = (c, h, w)
        self.levels = L
        self.decomposition = build(params.decomposition)
        self.crops = per_level(params.crops, L + 1)
        depth = per_level(params.depth, L + 1, 8)
        base_steps, level_steps = build.copies(params, "base_step"), build.copies(params, "step")

        def stack(refs: list[PartRef], shape: tuple[int, ...], ctx_shape: tuple[int, ...] | None) -> Sequential:
            return Sequential([build(ref, in_shape=shape, context_shape=ctx_shape) for ref in refs], ctx_shape)

        self.sizes = [(h // 2 ** (L - j), w // 2 ** (L - j)) for j in range(L + 1)]  # I_j sizes
        flows = {}
        base_shape = (c, *self.sizes[0])
        flows["base"] = LevelFlow(
            stack(base_steps, base_shape, self.context_shape),
            build(params.base_prior, in_shape=base_shape, context_shape=self.context_shape), None,
        )
        for j in range(1, L + 1):
            hh, ww = self.sizes[j - 1]
            conditioner = Conditioner(c, params.cond_channels, params.cond_depth, context_dim)
            ctx_shape = (conditioner.out_channels, hh, ww)
            shape = (3 * c, hh, ww)
            first = sum(depth[1:j])
            flows[f"level{j}"] = LevelFlow(
                stack(level_steps[first : first + depth[j]], shape, ctx_shape),
                build(params.prior, in_shape=shape, context_shape=ctx_shape), conditioner,
            )
        self.flows = nn.ModuleDict(flows)
        # Each cropped level draws its windows from its own generator, whose state is a buffer:
        # the draws do not depend on which levels run or in which thread (train.level_threads),
        # and checkpoints carry the state, so --resume continues the same windows.
        for index, name in enumerate(self.flows):
            if self.crops[index] > 1:
                seed = int(torch.randint(0, 2**62, ()))
                self.register_buffer(f"crop_rng_{name}", torch.Generator().manual_seed(seed).get_state())

    # -- pyramid ---------------------------------------------------------------------------
    def gain(self, j: int) -> float:
        """DC gain of I_j relative to the image: 2 per 2-D level of an orthonormal DWT."""
        return 2.0 ** (self.levels - j)

    def pyramid(self, y: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Low-pass images I_0..I_L (I_L = y - 0.5) and details D_0..D_{L-1}."""
        lows, details = [y - 0.5], []
        for _ in range(self.levels):
            low, detail, _ = self.decomposition.split(lows[0])  # orthonormal: log-det 0
            lows.insert(0, low)
            details.insert(0, detail)
        return lows, details

    def part_dims(self) -> dict[str, int]:
        c = self.in_shape[0]
        dims = {"base": c * self.sizes[0][0] * self.sizes[0][1]}
        for j in range(1, self.levels + 1):
            hh, ww = self.sizes[j - 1]
            dims[f"level{j}"] = 3 * c * hh * ww
        return dims

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {name: [p for p in flow.parameters() if p.requires_grad] for name, flow in self.flows.items()}

    def _inputs(self, name: str, lows: list[Tensor], details: list[Tensor]) -> tuple[Tensor, Tensor | None, float]:
        """(unit-scale variable, unit-scale context image, log-gain per dimension) of one term."""
        if name == "base":
            return lows[0] / self.gain(0), None, math.log(self.gain(0))
        j = int(name[5:])
        # D_{j-1} comes from splitting I_j; its coefficients have the scale of I_j.
        return details[j - 1] / self.gain(j), lows[j - 1] / self.gain(j - 1), math.log(self.gain(j))

    def _crop(self, name: str, v: Tensor, low: Tensor | None, crops: int) -> tuple[Tensor, Tensor | None, float]:
        """A random crop (same window for the variable and its context) and the dims ratio."""
        if crops == 1 or not self.training:
            return v, low, 1.0
        h, w = v.shape[-2:]
        ch, cw = h // crops, w // crops
        state: Tensor = getattr(self, f"crop_rng_{name}")
        rng = torch.Generator()
        rng.set_state(state.cpu())
        top = int(torch.randint(0, h - ch + 1, (), generator=rng))
        left = int(torch.randint(0, w - cw + 1, (), generator=rng))
        state.copy_(rng.get_state())
        v = v[..., top : top + ch, left : left + cw]
        low = None if low is None else low[..., top : top + ch, left : left + cw]
        return v, low, (h * w) / (ch * cw)

    def log_prob_parts(self, y: Tensor, context: Tensor | None = None) -> dict[str, Tensor]:
        names = list(self.flows)
        return self.log_prob_terms(y, names) if context is None else self.log_prob_terms(y, names, context)

    def log_prob_terms(self, y: Tensor, names: Sequence[str], context: Tensor | None = None) -> dict[str, Tensor]:
        unknown = [name for name in names if name not in self.flows]
        if unknown:
            raise ShapeError(f"wavelet_flow has no term {unknown[0]!r}; its terms are {', '.join(self.flows)}.")
        lows, details = self.pyramid(y)
        terms = {}
        for index, (name, flow) in enumerate(self.flows.items()):
            if name not in names:
                continue
            v, low, log_gain = self._inputs(name, lows, details)
            # Patch-wise training (the paper's top levels): an unbiased estimate of the full term.
            v, low, ratio = self._crop(name, v, low, self.crops[index])
            log_p = flow.log_prob(v, low, context) - v[0].numel() * log_gain
            terms[name] = log_p * ratio
        return terms

    @torch.no_grad()
    def initialize(self, y: Tensor, context: Tensor | None = None) -> None:
        lows, details = self.pyramid(y)
        for name, flow in self.flows.items():
            v, low, _ = self._inputs(name, lows, details)
            flow.flow.initialize(v, flow.context(low, context))

    # -- sampling --------------------------------------------------------------------------
    @torch.no_grad()
    def sample_base(self, n: int, temperature: float, context: Tensor | None = None) -> Tensor:
        return self.flows["base"].sample(n, None, temperature, context) * self.gain(0)

    @torch.no_grad()
    def superres(self, low: Tensor, from_level: int, temperature: float = 1.0,
                 context: Tensor | None = None) -> Tensor:
        """Samples D_j | I_j coarse to fine from the low-pass image I_{from_level}; returns y
        (unclamped: the run engine saturates values outside [0, 1))."""
        if not 0 <= from_level <= self.levels:
            raise ShapeError(f"--from-level {from_level} is out of range; this model has levels 0..{self.levels}.")
        for j in range(from_level + 1, self.levels + 1):
            level = self.flows[f"level{j}"]
            detail = level.sample(len(low), low / self.gain(j - 1), temperature, context) * self.gain(j)
            low, _ = self.decomposition.merge(low, detail)
        return low + 0.5

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, context: Tensor | None = None) -> Tensor:
        return self.superres(self.sample_base(n, temperature, context), 0, temperature, context)

    @torch.no_grad()
    def reduce(self, y: Tensor, level: int) -> Tensor:
        """The low-pass image I_level of y (raw scale), the input of super-resolution."""
        if not 0 <= level <= self.levels:
            raise ShapeError(f"--from-level {level} is out of range; this model has levels 0..{self.levels}.")
        return self.pyramid(y)[0][level]

    def low_to_image(self, low: Tensor, level: int) -> Tensor:
        """I_level shown as an image in [0, 1) (its DC gain removed)."""
        return (low / self.gain(level) + 0.5).clamp(0.0, 1.0 - 1e-6)

    # -- annealed sampling (LatentLevels) --------------------------------------------------
    def latent_levels(self) -> list[str]:
        return list(self.flows)

    def latent_level(self, name: str, given: Tensor | None, n: int) -> LatentLevel:
        """``base`` samples I_0; ``level{j}`` samples D_{j-1} given I_{j-1} (raw scale, ``given``)
        and returns I_j, or y after the last level. The log-det counts the level's gain, so
        ``log_prob - logabsdet`` is the level's term of `log_prob_parts`."""
        if name not in self.flows:
            raise ShapeError(f"wavelet_flow has no level {name!r}; its levels are {', '.join(self.flows)}.")
        if self.context_shape is not None:
            raise ShapeError("This wavelet_flow is conditioned on a context (a class); its latent levels need that "
                             "context, which annealed sampling does not supply.")
        flow, j, c = self.flows[name], self.latent_levels().index(name), self.in_shape[0]
        ctx, shape = None, (c, *self.sizes[0])
        if j > 0:
            expected = (n, c, *self.sizes[j - 1])
            if given is None or tuple(given.shape) != expected:
                got = None if given is None else tuple(given.shape)
                raise ShapeError(f"wavelet_flow samples {name} given I_{j - 1} of shape {expected}, got {got}.")
            ctx, shape = flow.context(given / self.gain(j - 1)), (3 * c, *self.sizes[j - 1])
        gain_logabsdet = math.prod(shape) * math.log(self.gain(j))

        def generate(z: Tensor) -> Generated:
            v, logabsdet = flow.flow.inverse(z, ctx)
            part = v * self.gain(j)
            out = part if j == 0 else self.decomposition.merge(given, part)[0]
            return Generated(out + 0.5 if j == self.levels else out,
                             flow.prior.log_prob(z, flow.prior_context(ctx)), logabsdet + gain_logabsdet)

        def draw(temperature: float) -> Tensor:
            return flow.prior.sample(n, flow.prior_context(ctx), temperature)

        return LatentLevel(name, shape, draw, generate)


@hookimpl
def flowkit_register_models(register) -> None:  # noqa: ANN001
    register("wavelet_flow", WaveletFlow, contexts=("vector",), params=WaveletFlowParams,
             summary="Wavelet Flow: one conditional flow per level of an orthonormal wavelet pyramid")
