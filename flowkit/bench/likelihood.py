"""The check that a reference implementation computes the same model as flowkit's: both
log-likelihoods on one fixed batch, in float64 copies of their weights (``flowkit bench
--against``; the reference comes from the model, `flowkit.contracts.model.HasReferences`)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowkit.contracts.model import Reference


@dataclass(frozen=True)
class LikelihoodCheck:
    """Both models' log p(y) on one fixed batch, in float64 copies of their weights."""

    images: int
    dims: int
    max_abs_per_dim: float  # max over images of |log p_flowkit - log p_reference| / D, nats per dimension
    max_relative: float  # max over images of |difference| / |log p_flowkit|
    tolerance: float  # per-dimension absolute

    @property
    def passed(self) -> bool:
        return self.max_abs_per_dim <= self.tolerance

    def sentence(self) -> str:
        verdict = "agree" if self.passed else "DIFFER"
        return (f"log-likelihoods {verdict} on a fixed batch of {self.images} images (float64 copies of both "
                f"models' weights): max |Δ log p| / D = {self.max_abs_per_dim:.1e} nats per dimension "
                f"(tolerance {self.tolerance:.0e}, per-dimension absolute), max relative "
                f"{self.max_relative:.1e}")

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "dims": self.dims, "max_abs_per_dim": self.max_abs_per_dim,
                "max_relative": self.max_relative, "tolerance": self.tolerance, "passed": self.passed,
                "kind": "per-dimension absolute, float64"}


@torch.no_grad()
def compare_log_likelihoods(model: nn.Module, reference: Reference, y: Tensor,
                            tolerance: float = 1e-4) -> LikelihoodCheck:
    """log p(y) of flowkit's ``model`` and a ``reference`` of it, both in float64 on ``y``'s
    device (deep copies: the timed models are left as they are)."""
    ours, theirs = copy.deepcopy(model).double().eval(), copy.deepcopy(reference).double().eval()
    y = y.double()
    a = ours.log_prob(y)
    b = theirs.to(y.device).log_prob(y)
    dims = math.prod(y.shape[1:])
    diff = (a - b).abs()
    return LikelihoodCheck(len(y), dims, float(diff.max()) / dims, float((diff / a.abs()).max()), tolerance)
