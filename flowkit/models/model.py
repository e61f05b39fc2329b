"""A density model that is one `LayoutFlow`: the model plugin lists what it stacks, this class
answers for it as a `flowkit.contracts.model.DensityModel`.

multiscale (Glow, MaCow, the VAE-flow's decoder), Flow++ and RealNVP subclass `LayoutModel` and
build ``self.flow`` in their ``__init__``; what they share (the terms, their dimensions, sampling,
initialisation, the latents) is answered here once. `OneLatentLevel` adds annealed sampling of the
whole latent as one level (`flowkit.contracts.model.LatentLevels`) for the models that offer it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowkit.contracts.model import DensityModel, LatentLevel
from flowkit.errors import ShapeError
from flowkit.models.layout import LayoutFlow


class LayoutModel(DensityModel):
    """A `DensityModel` whose density is its layout flow's, ``self.flow`` (`LayoutFlow`).

    A ``context`` (a flow built with a ``context_shape``: the VAE-flow's decoder) is handed to
    every step of the flow; an unconditioned flow takes none.
    """

    flow: LayoutFlow

    def log_prob_parts(self, y: Tensor, context: Tensor | None = None) -> dict[str, Tensor]:
        return self.flow.log_prob_parts(y, context)

    def part_dims(self) -> dict[str, int]:
        return self.flow.part_dims()

    def encode(self, y: Tensor, context: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """The latents ``[z_1 (first factored out), ..., z_top]`` and log|det| of the whole map."""
        return self.flow.encode(y, context)

    def decode(self, latents: list[Tensor], context: Tensor | None = None) -> Tensor:
        """The inverse of `encode`: latents to ``y``."""
        return self.flow.decode(latents, context)[0]

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, context: Tensor | None = None) -> Tensor:
        """``n`` images, drawn at ``temperature`` (0: every prior at its mean), unclamped.

        A latent far in the tails can make the exact inverse overflow (autoregressive inverses
        such as MaCow's amplify along rows, most of all in an under-trained model at
        temperature 1); the run engine saturates and counts such images for every model.
        """
        return self.flow.sample(n, temperature, context)

    @torch.no_grad()
    def initialize(self, y: Tensor, context: Tensor | None = None) -> None:
        """Data-dependent initialisation (every actnorm), in layout order, on the batch ``y``."""
        self.flow.initialize(y, context)


class OneLatentLevel:
    """Annealed sampling (`flowkit.contracts.model.LatentLevels`) of a `LayoutModel`: one level,
    ``"latent"``, the whole latent, whose density is the top prior times each split's prior
    given the part generated before it."""

    flow: LayoutFlow

    def latent_levels(self) -> list[str]:
        return ["latent"]

    def latent_level(self, name: str, given: Tensor | None, n: int) -> LatentLevel:
        if name != "latent" or given is not None:
            raise ShapeError(f"{self.flow.name} has one latent level, 'latent', given nothing; got {name!r} given "
                             f"{None if given is None else tuple(given.shape)}.")
        if self.flow.context_shape is not None:
            raise ShapeError(f"This {self.flow.name} flow is conditioned on a context (a vae_flow decoder); its "
                             "latent levels need that context, which annealed sampling does not supply.")
        return self.flow.latent_level(name, n)
