"""Density models: what the run engine trains, evaluates and samples, and their optional abilities.

Every model is a `DensityModel`. Abilities only some models have are Protocols
(`IndependentTerms`, `SuperResolution`): the run engine and the CLI ask
``isinstance(model, IndependentTerms)``, never ``hasattr``, and a model declares an ability by
implementing its methods (subclassing the Protocol as well documents it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Shape = tuple[int, int, int]


class DensityModel(nn.Module):
    """A density on images ``y`` in ``[0, 1)^D`` (D = C·H·W), after dequantization.

    - ``log_prob_parts(y) -> dict[str, (B,)]``: named terms that add up to log p(y), in nats,
      over the whole image (one per Wavelet Flow level, one per Glow level, or ``{"total": ...}``).
    - ``part_dims() -> dict[str, int]``: the dimensions each term factors out; they add up to D.
    - ``log_prob(y) -> (B,)``: their sum.
    - ``sample(n, temperature=1.0) -> (n, C, H, W)``: images on the data scale, *not* clamped:
      values outside ``[0, 1)``, and non-finite values where an inverse overflowed, are left for
      the run engine, which saturates and counts them in one place for every model.
    - ``initialize(y)``: explicit data-dependent initialisation (actnorm), before training.
    - ``parameter_groups() -> dict[str, list[Parameter]]``: groups with their own gradient
      clipping (Wavelet Flow: one per level).
    """

    in_shape: Shape

    def log_prob_parts(self, y: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def part_dims(self) -> dict[str, int]:
        raise NotImplementedError

    def log_prob(self, y: Tensor) -> Tensor:
        parts = self.log_prob_parts(y)
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
