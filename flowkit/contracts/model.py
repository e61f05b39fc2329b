"""Density models: what the run engine trains, evaluates and samples."""

from __future__ import annotations

import torch
from torch import Tensor, nn

Shape = tuple[int, int, int]


class DensityModel(nn.Module):
    """A density on images ``y`` in ``[0, 1)^D`` (D = C·H·W), after dequantization.

    - ``log_prob_parts(y, parts=None) -> dict[str, (B,)]``: named terms that add up to
      log p(y), in nats, over the whole image (e.g. one per Wavelet Flow level, or
      ``{"total": ...}``). With ``parts``, only those terms are computed (level-wise training).
      The run engine reports each term in bits/dim of its own dimensions (see ``part_dims``).
    - ``part_dims() -> dict[str, int]``: the number of dimensions each term covers.
    - ``log_prob(y) -> (B,)``: their sum.
    - ``sample(n, temperature=1.0) -> (n, C, H, W)`` in ``[0, 1)`` (clamped where needed).
    - ``initialize(y)``: explicit data-dependent initialisation (actnorm), before training.
    - ``parameter_groups() -> dict[str, list[Parameter]]``: groups trained independently
      (gradient clipping per group); Wavelet Flow has one per level. Group names are term
      names, so ``train.level = i`` trains group i on its own term alone.
    - ``independent_terms``: true when each term depends only on ``y`` and on its own
      parameter group, and ``log_prob_parts`` may be called from several threads at once for
      disjoint parts without touching the global random state (Wavelet Flow's levels). The
      trainer may then train the terms concurrently (``train.level_threads``).
    """

    in_shape: Shape
    independent_terms: bool = False

    def log_prob_parts(self, y: Tensor, parts: list[str] | None = None) -> dict[str, Tensor]:
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
