r"""The layout walker: a multi-scale flow given as a list of what it stacks, walked both ways.

A model says *what* it stacks as a **layout**, a list of entries:

- `Step` ``(part)``: a transform that keeps the shape: a registered part (a `PartRef`, built
  at the shape the layout has there, with the flow's context shape), a `Chain` of parts (run
  as one `Sequential`, whose log-det is summed before it joins the others), or a transform
  already built (the preprocessing of `flowkit.models.preprocess`).
- `Squeeze` ``(decomposition)``: space to depth, ``(C, H, W) -> (f²C, H/f, W/f)``, by a
  registered decomposition of factor f (Glow's squeeze or haar: 2; patchify: its patch side,
  which turns the image into a grid of patch tokens); `Unsqueeze` is its inverse.
- `Split` ``(prior, term, factor)``: factor out the last ``C // factor`` channels ``z``; the
  rest goes on. ``log p(z | h)`` comes from ``prior``, given the kept channels ``h`` when the
  prior takes a context, and counts in the term ``term`` of ``log_prob_parts``.

`LayoutFlow` builds the layout and walks it: *how* to walk it lives here once, in the spirit of
nflows' ``MultiscaleCompositeTransform`` and of its ``Flow`` (a transform plus a base
distribution, here ``prior``, the density of the last latent). With the latents ``z_1 .. z_S``
of the splits in order and ``z_top`` what is left at the end,

.. math::

    \log p(x) = \sum_t \Big[ \sum_{s \in t} \log|\det J_s| + \sum_{k \in t} \log p(z_k \mid h_k) \Big]
        + \log p_\text{top}(z_\text{top}),

where term ``t`` holds the transforms up to its last split (the last term, ``top``, the rest
of them and the top prior). Every term is the log-det of its transforms summed in layout order,
then its splits' log-densities added in order, then (last term) the top prior's.

The same walk, in one place, gives the data-to-latent pass (`log_prob_parts`, `encode`), the
inverse (`decode`; `sample`, which draws each factored-out part from its prior given the part
generated before it), the data-dependent initialisation (`initialize`: every transform
initialised on the output of those before it) and the whole latent as one level of annealed
sampling (`latent_level`).

Build order: each entry is built in layout order, except a split's prior, which is built as
soon as its shape is known, right after the last entry that changed the shape (a squeeze, an
unsqueeze or a split; the start), before the steps that lead to the split. It is the order flowkit's
multiscale model has always built its parts in, which decides what random numbers each
initialisation draws: the same recipe builds the same weights.

Example (a two-level Glow, as the ``multiscale`` model lists it; ``build`` is a factory's)::

    layout = [Step(Centre()),
              Squeeze(squeeze), Step(Chain((step_1, step_2))), Split(split_prior, term="level1"),
              Squeeze(squeeze), Step(Chain((step_3, step_4)))]
    flow = LayoutFlow(layout, in_shape=(1, 8, 8), prior=top_prior, build=build)
    flow.part_dims()  # {"level1": 32, "top": 32}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as checkpointed

from flowkit.contracts.decomposition import Decomposition, DecompositionLayer
from flowkit.contracts.model import Generated, LatentLevel
from flowkit.contracts.prior import Prior
from flowkit.contracts.transform import Sequential, Transform, zeros_logabsdet
from flowkit.errors import ShapeError
from flowkit.params import PartRef

Shape = tuple[int, int, int]


# -- what a layout lists ------------------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    """Parts run one after the other as one `Sequential`; a part is a `PartRef`, a `Chain` or a
    built `Transform`. Glow's K steps of a level are one chain: their log-det is summed first."""

    parts: tuple[Any, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.parts))


@dataclass(frozen=True)
class Step:
    """A shape-keeping transform at this point of the layout: a `PartRef`, a `Chain` or a `Transform`."""

    part: Any


@dataclass(frozen=True)
class Squeeze:
    """Space to depth by the decomposition ``decomposition`` (its ``to_channels``)."""

    decomposition: PartRef


@dataclass(frozen=True)
class Unsqueeze:
    """Depth to space by the decomposition ``decomposition`` (its ``from_channels``)."""

    decomposition: PartRef


@dataclass(frozen=True)
class Split:
    """Factor out the last ``C // factor`` channels with ``prior``; their density counts in ``term``."""

    prior: PartRef
    term: str
    factor: int = 2

    def __post_init__(self) -> None:
        if self.factor < 2:
            raise ValueError(f"factor = {self.factor} must be >= 2 (factor out the last C // factor channels).")


Entry = Step | Squeeze | Unsqueeze | Split


# -- the modules a layout is built into -----------------------------------------------------------


class SqueezeLayer(DecompositionLayer):
    """A decomposition read as space to depth (`Squeeze`) or depth to space (`Unsqueeze`).

    ``in_shape``/``out_shape`` are the shapes on the data side and on the latent side of the
    layer as the layout uses it. It takes the flow's context, if any, and ignores it, so a
    conditioned chain can hand its context to every transform in it.
    """

    def __init__(self, decomposition: Decomposition, in_shape: Shape, *, context_shape: tuple[int, ...] | None,
                 unsqueeze: bool = False) -> None:
        channels, height, width = in_shape
        f = int(decomposition.factor)
        if unsqueeze and channels % (f * f):
            raise ShapeError(f"An unsqueeze by {f} needs a number of channels divisible by {f * f}, got in_shape {in_shape}.")
        super().__init__(decomposition, (channels // (f * f), f * height, f * width) if unsqueeze else in_shape)
        if unsqueeze:
            if self.out_shape != tuple(in_shape):
                raise ShapeError(f"This decomposition cannot undo a squeeze into {in_shape}: it squeezes "
                                 f"{self.in_shape} into {self.out_shape}.")
            self.in_shape, self.out_shape = self.out_shape, self.in_shape
        self.unsqueeze = unsqueeze
        self.context_shape = context_shape

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(x, context)
        if self.unsqueeze:
            return self.decomposition.from_channels(x)
        return self.decomposition.to_channels(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_context(z, context)
        if self.unsqueeze:
            return self.decomposition.to_channels(z)
        return self.decomposition.from_channels(z)

    def extra_repr(self) -> str:
        return f"{'unsqueeze' if self.unsqueeze else 'squeeze'} {self.in_shape} -> {self.out_shape}"


class FactorOut(nn.Module):
    """A split: ``h (B, C, H, W) -> (kept h[:, :keep], factored out h[:, keep:])`` and the
    prior of the factored-out part, given the kept part when the prior takes a context."""

    def __init__(self, prior: Prior, keep: int, in_shape: Shape, term: str) -> None:
        super().__init__()
        self.prior = prior
        self.keep = keep
        self.term = term
        self.in_shape = in_shape
        self.out_shape: Shape = (in_shape[0] - keep, in_shape[1], in_shape[2])

    def split(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return h[:, : self.keep], h[:, self.keep :]

    def _context(self, kept: Tensor) -> Tensor | None:
        return kept if self.prior.context_shape is not None else None

    def log_prob(self, out: Tensor, kept: Tensor) -> Tensor:
        return self.prior.log_prob(out, self._context(kept))

    def draw(self, kept: Tensor, temperature: float) -> Tensor:
        """The factored-out part given ``kept``: the prior's mean at temperature 0, else a draw."""
        if temperature == 0:
            return self.prior.mean(kept.shape[0], self._context(kept))
        return self.prior.sample(kept.shape[0], self._context(kept), temperature=temperature)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, out_shape={self.out_shape}, term={self.term!r}"


# -- the walker ---------------------------------------------------------------------------------


class LayoutFlow(nn.Module):
    """A layout built into modules, and the one walk over it in each direction (module docstring).

    Args:
        layout: the entries, data side first.
        in_shape: ``(C, H, W)`` of the data.
        prior: the density of what is left after the last entry (``top``'s prior), a `PartRef`.
        build: resolves part references (the factory's ``build``).
        context_shape: the context every step is built with and called with (``None``: none).
        top: the name of the last term of `log_prob_parts`.
        name: the model's name in error messages.
        checkpoint: recompute each `Sequential` of a chain in the backward pass
            (`torch.utils.checkpoint`), unless the chain itself recomputes (``train.memory``).

    Attributes:
        layers: in order, the transforms between two splits (a `Sequential`), the split (a
            `FactorOut`), ..., the transforms after the last split (a `Sequential`).
        prior: the top prior.
        out_shape: the shape of the top latent.
    """

    def __init__(self, layout: Sequence[Entry], *, in_shape: Shape, prior: PartRef, build: Callable[..., Any],
                 context_shape: tuple[int, ...] | None = None, top: str = "top", name: str = "flow",
                 checkpoint: bool = False) -> None:
        super().__init__()
        self.in_shape: Shape = tuple(int(s) for s in in_shape)  # type: ignore[assignment]
        self.context_shape = None if context_shape is None else tuple(int(s) for s in context_shape)
        self.name, self.top, self.checkpoint = name, top, checkpoint
        self.layers = nn.ModuleList()
        self._paths: list[str] = []  # per layout entry: where its module is, relative to this flow
        self._build(list(layout), build)
        # The top prior is built with the flow's context: a prior that takes it (learned_gaussian
        # with ycond: Glow's class-conditional top prior) is conditioned, the others ignore it.
        self.prior: Prior = build(prior, in_shape=self.out_shape, context_shape=self.context_shape)
        splits = self.splits()
        # A chain's log-det counts in the term of the split that ends it, the last chain's in `top`.
        self._chain_terms = [s.term for s in splits] + [top]
        self._dims: dict[str, int] = dict.fromkeys(self._chain_terms, 0)
        for split in splits:
            self._dims[split.term] += math.prod(split.out_shape)
        self._dims[top] += math.prod(self.out_shape)

    # -- building ---------------------------------------------------------------------------------
    def _build(self, layout: list[Entry], build: Callable[..., Any]) -> None:
        shape: Shape = self.in_shape
        chain: list[Transform] = []
        priors: dict[int, tuple[Prior, int]] = {}

        def prior_ahead(start: int, at: Shape) -> None:
            # The next split before the next change of shape: its prior is built now (module docstring).
            index = start
            while index < len(layout) and isinstance(layout[index], Step):
                index += 1
            if index < len(layout) and isinstance(layout[index], Split):
                priors[index] = self._split_prior(layout[index], index, at, build)

        prior_ahead(0, shape)
        for index, entry in enumerate(layout):
            if isinstance(entry, Step):
                self._paths.append(f"layers.{len(self.layers)}.transforms.{len(chain)}")
                chain.append(self._make(entry.part, shape, build))
            elif isinstance(entry, (Squeeze, Unsqueeze)):
                channels, height, width = shape
                decomposition = build(entry.decomposition)
                f = int(decomposition.factor)
                if isinstance(entry, Squeeze) and (height % f or width % f):
                    need = "even" if f == 2 else f"multiples of {f}"
                    raise ShapeError(f"{self.name}: layout entry {index} squeezes a ({channels}, {height}, {width}) "
                                     f"input by {f}; height and width must be {need}.")
                layer = SqueezeLayer(decomposition, shape, context_shape=self.context_shape,
                                     unsqueeze=isinstance(entry, Unsqueeze))
                self._paths.append(f"layers.{len(self.layers)}.transforms.{len(chain)}")
                chain.append(layer)
                shape = layer.out_shape
                prior_ahead(index + 1, shape)
            elif isinstance(entry, Split):
                prior, keep = priors.pop(index)
                self.layers.append(Sequential(chain, self.context_shape))
                self._paths.append(f"layers.{len(self.layers)}")
                self.layers.append(FactorOut(prior, keep, shape, entry.term))
                chain = []
                shape = (keep, shape[1], shape[2])
                prior_ahead(index + 1, shape)
            else:
                raise TypeError(f"layout entry {index} is a {type(entry).__name__}, not a Step, Squeeze, Unsqueeze "
                                "or Split.")
        self.layers.append(Sequential(chain, self.context_shape))
        self.out_shape: Shape = shape

    def _split_prior(self, entry: Split, index: int, shape: Shape, build: Callable[..., Any]) -> tuple[Prior, int]:
        channels, height, width = shape
        out = channels // entry.factor
        if channels % entry.factor or out == 0:
            raise ShapeError(f"{self.name}: layout entry {index} (a split of term {entry.term!r}) factors out the last "
                             f"C // {entry.factor} of C = {channels} channels in equal parts, but {channels} is not "
                             f"a multiple of {entry.factor}.")
        keep = channels - out
        prior = build(entry.prior, in_shape=(out, height, width), context_shape=(keep, height, width))
        return prior, keep

    def _make(self, part: Any, shape: Shape, build: Callable[..., Any]) -> Transform:
        if isinstance(part, Chain):
            return Sequential([self._make(p, shape, build) for p in part.parts], self.context_shape)
        if isinstance(part, PartRef):
            return build(part, in_shape=shape, context_shape=self.context_shape)
        if isinstance(part, Transform):
            return part
        raise TypeError(f"a step is a PartRef, a Chain or a Transform, not a {type(part).__name__}.")

    # -- what was built ----------------------------------------------------------------------------
    def path(self, index: int) -> str:
        """Where the module of layout entry ``index`` is, relative to this flow (``layers.2``;
        ``layers.0.transforms.3``): for `rename_state_dict_keys` and for readers of the structure."""
        return self._paths[index]

    def chains(self) -> list[Sequential]:
        """The `Sequential` chains, data side first: ``len(splits()) + 1`` of them."""
        return [m for m in self.layers if not isinstance(m, FactorOut)]

    def splits(self) -> list[FactorOut]:
        """The splits, data side first."""
        return [m for m in self.layers if isinstance(m, FactorOut)]

    def part_dims(self) -> dict[str, int]:
        """The dimensions each term factors out (the last one: those left at the end); they add up to D."""
        return dict(self._dims)

    def latent_shapes(self) -> list[Shape]:
        """The shapes of `encode`'s latents: each split's factored-out part, then the top latent."""
        return [s.out_shape for s in self.splits()] + [self.out_shape]

    def check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            raise ShapeError(f"{self.name} expected images of shape (B, {', '.join(map(str, self.in_shape))}), "
                             f"got {tuple(x.shape)}.")

    # -- data to latent ----------------------------------------------------------------------------
    def _run(self, chain: Sequential, h: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        if not (self.checkpoint and torch.is_grad_enabled()) or chain.recompute:
            return chain(h, context)
        total = zeros_logabsdet(h)
        for transform in chain.transforms:
            if isinstance(transform, Sequential):
                h, logabsdet = checkpointed(transform, h, context, use_reentrant=False)
            else:
                h, logabsdet = transform(h, context)
            total = total + logabsdet
        return h, total

    def _walk(self, x: Tensor, context: Tensor | None,
              ) -> tuple[dict[str, Tensor], list[tuple[FactorOut, Tensor, Tensor]], Tensor]:
        """Per term the log-det of its chains, each split's ``(split, kept, factored out)``, the top latent."""
        self.check_input(x)
        logabsdets: dict[str, Tensor] = {}
        factored: list[tuple[FactorOut, Tensor, Tensor]] = []
        terms = iter(self._chain_terms)
        h = x
        for module in self.layers:
            if isinstance(module, FactorOut):
                kept, out = module.split(h)
                factored.append((module, kept, out))
                h = kept
                continue
            term = next(terms)
            h, logabsdet = self._run(module, h, context)
            logabsdets[term] = logabsdets[term] + logabsdet if term in logabsdets else logabsdet
        return logabsdets, factored, h

    def log_prob_parts(self, x: Tensor, context: Tensor | None = None) -> dict[str, Tensor]:
        """The terms of log p(x), named as `part_dims` names them (module docstring)."""
        parts, factored, top = self._walk(x, context)
        for split, kept, out in factored:
            parts[split.term] = parts[split.term] + split.log_prob(out, kept)
        parts[self.top] = parts[self.top] + self.prior.log_prob(top, self._top_context(context))
        return parts

    def encode(self, x: Tensor, context: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """The latents ``[z_1 (first factored out), ..., z_top]`` and log|det| of the whole map."""
        logabsdets, factored, top = self._walk(x, context)
        return [out for _, _, out in factored] + [top], torch.stack(list(logabsdets.values())).sum(0)

    # -- latent to data ------------------------------------------------------------------------------
    def _unwalk(self, top: Tensor, factored_out: Callable[[FactorOut, Tensor], Tensor],
                context: Tensor | None) -> tuple[Tensor, Tensor]:
        """From the top latent to the data: ``factored_out(split, kept)`` gives the part each
        split factored out (a stored latent, a draw); returns ``(x, log|det ∂x/∂latents|)``."""
        h, logabsdet = top, zeros_logabsdet(top)
        for module in reversed(self.layers):
            if isinstance(module, FactorOut):
                h = torch.cat([h, factored_out(module, h)], dim=1)
                continue
            for transform in reversed(module.transforms):
                h, step_logabsdet = transform.inverse(h, context)
                logabsdet = logabsdet + step_logabsdet
        return h, logabsdet

    def decode(self, latents: Sequence[Tensor], context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The inverse of `encode`: ``(x, log|det ∂x/∂latents|)``."""
        latents = list(latents)
        return self._unwalk(latents.pop(), lambda split, kept: latents.pop(), context)

    def decode_with_density(self, latents: Sequence[Tensor], context: Tensor | None = None,
                            ) -> tuple[Tensor, Tensor, Tensor]:
        """`decode`, and log p(latents): the top prior, and each split's prior given the part
        generated before it. ``(x, log_prob, logabsdet)``: log p(x) = log_prob - logabsdet."""
        latents = list(latents)
        top = latents.pop()
        log_prob = self.prior.log_prob(top, self._top_context(context))

        def factored_out(split: FactorOut, kept: Tensor) -> Tensor:
            nonlocal log_prob
            out = latents.pop()
            log_prob = log_prob + split.log_prob(out, kept)
            return out

        x, logabsdet = self._unwalk(top, factored_out, context)
        return x, log_prob, logabsdet

    def _top_context(self, context: Tensor | None) -> Tensor | None:
        """The flow's context as the top prior takes it: none for a prior that ignores it."""
        return context if self.prior.context_shape is not None else None

    def draw_top(self, n: int, temperature: float, context: Tensor | None = None) -> Tensor:
        context = self._top_context(context)
        if temperature == 0:
            return self.prior.mean(n, context)
        return self.prior.sample(n, context, temperature=temperature)

    def sample(self, n: int, temperature: float = 1.0, context: Tensor | None = None) -> Tensor:
        """``n`` draws: the top latent from the top prior, then each factored-out part from its
        prior given the part generated so far, at ``temperature`` (0: the means)."""
        top = self.draw_top(n, temperature, context)
        return self._unwalk(top, lambda split, kept: split.draw(kept, temperature), context)[0]

    # -- initialisation and annealed sampling ---------------------------------------------------------
    @torch.no_grad()
    def initialize(self, x: Tensor, context: Tensor | None = None) -> None:
        """Data-dependent initialisation of every transform, in layout order, on the output of those before it."""
        self.check_input(x)
        h = x
        for module in self.layers:
            if isinstance(module, FactorOut):
                h = module.split(h)[0]
                continue
            for transform in module.transforms:
                transform.initialize(h, context)
                h, _ = transform(h, context)

    def latent_level(self, name: str, n: int) -> LatentLevel:
        """The latents of `encode` flattened into one ``(n, D)`` tensor, as one level of
        `flowkit.contracts.model.LatentLevels` (unconditioned flows only): its density is the
        top prior times each split's prior given the part generated before it."""
        shapes = self.latent_shapes()
        sizes = [math.prod(shape) for shape in shapes]

        def draw(temperature: float) -> Tensor:
            drawn: list[Tensor] = []  # the factored-out parts, the last factored out first

            def factored_out(split: FactorOut, kept: Tensor) -> Tensor:
                drawn.append(split.draw(kept, temperature))
                return drawn[-1]

            top = self.draw_top(n, temperature)
            self._unwalk(top, factored_out, None)
            return torch.cat([part.flatten(1) for part in [*reversed(drawn), top]], dim=1)

        def generate(z: Tensor) -> Generated:
            latents = [part.reshape(len(z), *shape) for part, shape in zip(z.split(sizes, dim=1), shapes, strict=True)]
            return Generated(*self.decode_with_density(latents))

        return LatentLevel(name, (sum(sizes),), draw, generate)


def rename_state_dict_keys(module: nn.Module, renames: Mapping[str, str]) -> None:
    """Lets ``module`` load a state_dict written by an earlier structure of it: before loading,
    every key that starts with an old prefix (a key of ``renames``, ending in ``.``) gets the
    new prefix instead. Keys of the current structure pass unchanged."""
    ordered = sorted(renames.items(), key=lambda item: -len(item[0]))  # the most specific prefix first

    def rename(_: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            for old, new in ordered:
                if rest.startswith(old):
                    state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                    break

    module.register_load_state_dict_pre_hook(rename)
