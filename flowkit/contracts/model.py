"""Density models: what the run engine trains, evaluates and samples, and their optional abilities.

Every model is a `DensityModel`. Abilities only some models have are Protocols
(`IndependentTerms`, `SuperResolution`, `LatentLevels`, `LatentVariable`, `HasReferences`,
`ClassConditional`): the run engine and the CLI ask
``isinstance(model, IndependentTerms)``, never ``hasattr``, and a model declares an ability by
implementing its methods (subclassing the Protocol as well documents it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Shape = tuple[int, int, int]


class DensityModel(nn.Module):
    """A density on images ``y`` in ``[0, 1)^D`` (D = C·H·W), after dequantization.

    - ``log_prob_parts(y) -> dict[str, (B,)]``: named terms that add up to log p(y), in nats,
      over the whole image (one per Wavelet Flow level, one per Glow level, or ``{"total": ...}``).
    - ``part_dims() -> dict[str, int]``: the dimensions each term factors out; they add up to D.
      (A `LatentVariable` model's KL term factors out none: 0.)
    - ``log_prob(y) -> (B,)``: their sum.
    - ``sample(n, temperature=1.0) -> (n, C, H, W)``: images on the data scale, *not* clamped:
      values outside ``[0, 1)``, and non-finite values where an inverse overflowed, are left for
      the run engine, which saturates and counts them in one place for every model.
    - ``initialize(y)``: explicit data-dependent initialisation (actnorm), before training.
    - ``parameter_groups() -> dict[str, list[Parameter]]``: groups with their own gradient
      clipping (Wavelet Flow: one per level).

    A model registered with ``contexts=("vector",)`` and built with ``context_shape = (Cc,)``
    takes ``context``, ``(B, Cc)``, as the last argument of ``log_prob_parts``,
    ``log_prob_terms``, ``sample`` and ``initialize``, and hands it to every coupling net and
    every prior that takes one (the VAE-flow's global latent; a class one-hot:
    `flowkit.models.conditional`).
    """

    in_shape: Shape

    def log_prob_parts(self, y: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def part_dims(self) -> dict[str, int]:
        raise NotImplementedError

    def log_prob(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        """The sum of `log_prob_parts` (given ``context``, for a model built with one)."""
        parts = self.log_prob_parts(y) if context is None else self.log_prob_parts(y, context)
        return torch.stack(list(parts.values())).sum(0)

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def initialize(self, y: Tensor) -> None:
        """Data-dependent initialisation; the default does nothing."""

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"model": [p for p in self.parameters() if p.requires_grad]}


@runtime_checkable
class IndependentTerms(Protocol):
    """A model whose terms are densities of their own that share no parameters (Wavelet Flow).

    Term ``t`` of `log_prob_parts` is a normalised log-density over its ``part_dims()[t]``
    dimensions (log p(I_0), log p(D_j | I_j)); it depends only on ``y`` and on the parameter
    group of the same name, and computing it touches no global random state. So:

    - ``train.level = i`` (``flowkit run --level i``) trains term i alone on its own bits/dim;
    - ``train.level_threads > 1`` trains disjoint groups of terms side by side in threads;
    - the run engine reports each term's bits/dim over its own dimensions.

    ``log_prob_terms(y, names)`` computes only the named terms, in the model's order.
    """

    def log_prob_terms(self, y: Tensor, names: Sequence[str]) -> dict[str, Tensor]: ...

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]: ...


@runtime_checkable
class SuperResolution(Protocol):
    """A model that samples the missing detail of a low-resolution image (Wavelet Flow).

    - ``levels``: the low-resolution levels are ``0 .. levels`` (0 = the coarsest; ``levels``
      is the full image).
    - ``reduce(y, level)``: the low-resolution representation of images ``y`` at ``level``.
    - ``superres(low, from_level, temperature)``: images ``y`` sampled given ``low``, on the
      data scale and unclamped like `DensityModel.sample`.
    - ``low_to_image(low, level)``: ``low`` shown as an image in ``[0, 1)``.
    """

    levels: int

    def reduce(self, y: Tensor, level: int) -> Tensor: ...

    def superres(self, low: Tensor, from_level: int, temperature: float = 1.0) -> Tensor: ...

    def low_to_image(self, low: Tensor, level: int) -> Tensor: ...


class Generated(NamedTuple):
    """What a `LatentLevel` makes of latents ``z`` of shape ``(B, *shape)``."""

    out: Tensor  #: the next level's ``given``; after the last level, images ``y`` (unclamped, as `sample`)
    log_prob: Tensor  #: (B,) log p_base(z | given): the latent's density, in nats
    logabsdet: Tensor  #: (B,) log|det ∂part/∂z| of the map from z to the image part this level adds


@dataclass(frozen=True)
class LatentLevel:
    """One level of a `LatentLevels` model, for ``n`` images, given what earlier levels sampled.

    - ``shape``: one latent, without the batch dimension.
    - ``draw(temperature) -> (n, *shape)``: latents as plain temperature sampling draws them.
    - ``generate(z) -> Generated``: differentiable in ``z``; the part is an invertible function
      of ``z`` (``given`` fixed), so log p(part | given) = ``log_prob - logabsdet``.
    """

    name: str
    shape: tuple[int, ...]
    draw: Callable[[float], Tensor]
    generate: Callable[[Tensor], Generated]


@runtime_checkable
class LatentLevels(Protocol):
    """A model that generates images level by level, each level an invertible map from a latent
    with a tractable density (Wavelet Flow: one level per pyramid level; a multiscale Glow: one
    level, the whole latent). Annealed sampling by MCMC (`flowkit sample --mcmc`) needs no more.

    - ``latent_levels()``: the level names in generation order (coarse to fine).
    - ``latent_level(name, given, n)``: that level for ``n`` images, where ``given`` is the
      ``out`` of the previous level's ``generate`` (``None`` for the first level).
    """

    def latent_levels(self) -> list[str]: ...

    def latent_level(self, name: str, given: Tensor | None, n: int) -> LatentLevel: ...


@runtime_checkable
class LatentVariable(Protocol):
    r"""A model with a latent variable ``z`` that its density integrates out (the VAE-flow's
    global latent), so log p(y) has no closed form and `DensityModel.log_prob_parts` returns
    the terms of a lower bound instead: the evidence lower bound (ELBO)

    .. math::

        \log p(y) \ge \mathbb{E}_{q(z \mid y)}[\log p(y \mid z)] - \mathrm{KL}(q(z \mid y) \,\|\, p(z)),

    estimated with one draw ``z ~ q(z | y)`` per image from the global random state (as
    dequantization noise is): the terms of ``log p(y | z)`` and a term ``kl`` holding ``-KL``
    (closed form, or the one-sample ``log p(z) - log q(z | y)``), with ``part_dims()["kl"] = 0``.
    The same random state gives the same value; the run engine seeds evaluation, so its
    bits/dim are of this bound, and it labels them so.

    - ``log_joint_sample(y) -> (B,)``: ``log p(y, z) - log q(z | y)`` for a fresh draw
      ``z ~ q(z | y)`` per image: one importance weight. Its mean over draws is the ELBO, and
      ``logsumexp`` over ``k`` draws ``- log k`` is the k-sample importance-weighted bound
      (Burda et al. 2016), which `flowkit.runs.objective.Objective.iw_log_likelihood` uses in
      place of ``log_prob(y)`` (with fresh dequantization noise per draw, a bound over z and u).
    """

    def log_joint_sample(self, y: Tensor) -> Tensor: ...



@runtime_checkable
class Reference(Protocol):
    """Another library's implementation of a flowkit model, holding that model's weights (a
    ``torch.nn.Module``): what ``flowkit bench --against NAME`` times beside flowkit's.

    - ``log_prob(y) -> (B,)``: log p(y) of images in ``[0, 1)``, as the flowkit model's;
    - ``loss(x)``: mean bits/dim of integer images ``x`` under its own uniform dequantization
      (log q = 0), the training objective timed;
    - ``sample(n) -> (n, C, H, W)``: images at temperature 1.
    """

    def log_prob(self, y: Tensor) -> Tensor: ...

    def loss(self, x: Tensor) -> Tensor: ...

    def sample(self, n: int) -> Tensor: ...


@runtime_checkable
class HasReferences(Protocol):
    """A model that other libraries can compose with its own weights (multiscale: nflows' Glow).
    ``flowkit bench --against NAME`` asks for it; the composition lives with the model's plugin,
    so the core never reads a model's insides.

    - ``references()``: the names it offers (``("nflows",)``);
    - ``reference_problems(name)``: why this model's configuration cannot be composed, one
      sentence per difference naming its recipe key (empty: it can);
    - ``reference(name, n_bits, dtype)``: the `Reference`, on the CPU in ``dtype``, with this
      model's current weights.
    """

    def references(self) -> tuple[str, ...]: ...

    def reference_problems(self, name: str) -> list[str]: ...

    def reference(self, name: str, n_bits: int, dtype: torch.dtype = torch.float32) -> Reference: ...


@runtime_checkable
class ClassConditional(Protocol):
    """A density of images given a class, ``p(y | c)``, with labels ``0 .. K-1`` and ``K`` for "no
    class" (the unconditional model that label dropout trains in the same network). Any model
    that takes a vector context is one once built with a class context
    (`flowkit.models.conditional.ClassConditioned`, which the run engine builds for
    ``data.labels = true``).

    - ``num_classes``: K.
    - ``log_prob(y, labels) -> (B,)``: ``log p(y | labels)`` in nats.
    - ``log_prob_per_class(y) -> (B, K)``: under every class, for the marginal and the Bayes
      classifier.
    - ``sample(n, temperature, labels, guidance=None)``: images of a class (an int, one per
      image, or None: no class); with ``guidance`` ``w``, classifier-free guidance, whose samples
      have no exact density.
    """

    num_classes: int

    def log_prob(self, y: Tensor, labels: Tensor) -> Tensor: ...

    def log_prob_per_class(self, y: Tensor) -> Tensor: ...

    def sample(self, n: int, temperature: float = 1.0, labels: Tensor | int | None = None,
               guidance: float | None = None) -> Tensor: ...
