"""The one objective of training and evaluation: dequantize, the model's terms, bits/dim, and
the importance-weighted estimate. The trainer, the term threads and both evaluators use it.

For integer images x with K = 2^n_bits levels, y = (x + u) / K with u ~ q(u | x), and

    bits/dim = (-log p(y) + D log K + log q(u | x)) / (D log 2)          (see `flowkit.runs.bpd`)

over the whole image. A term of a model with `IndependentTerms` is a density of its own:
trained or reported alone, its bits/dim are over its own dimensions, with the same offset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from flowkit.contracts.dequantizer import Dequantizer
from flowkit.contracts.model import DensityModel, IndependentTerms, LatentVariable
from flowkit.runs.bpd import bits_per_dim


class Objective:
    """The dequantized bound of one model and dequantizer on images of ``num_dims`` dimensions."""

    def __init__(self, model: DensityModel, dequantizer: Dequantizer, n_bits: int, num_dims: int) -> None:
        self.model, self.dequantizer = model, dequantizer
        self.n_bits, self.num_dims = n_bits, num_dims

    def dequantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, log q(u | x))`` for a batch of integer images (draws from the global RNG)."""
        return self.dequantizer(x, self.n_bits)

    def terms(self, y: Tensor, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Every term of log p(y), or only ``names`` (a model with `IndependentTerms`)."""
        if names is None:
            return self.model.log_prob_parts(y)
        if not isinstance(self.model, IndependentTerms):
            raise TypeError(f"{type(self.model).__name__} has no terms that can be computed alone.")
        return self.model.log_prob_terms(y, names)

    def bits_per_dim(self, terms: dict[str, Tensor], log_q: Tensor | float, alone: str | None = None) -> Tensor:
        """Per-image bits/dim: of the whole image from all its terms and log q, or of the term
        ``alone`` over its own dimensions (a density of its own; log q belongs to the image)."""
        if alone is not None:
            return bits_per_dim(terms[alone], self.model.part_dims()[alone], self.n_bits)
        log_p = torch.stack(list(terms.values())).sum(0)
        return bits_per_dim(log_p, self.num_dims, self.n_bits, log_q)

    def share_bits_per_dim(self, term: Tensor) -> Tensor:
        """A term's share of the whole image's bits/dim, ``-term / (D log 2)`` (no offset): what
        a term that is not a density of its own (a Glow level) contributes."""
        return -term / (self.num_dims * math.log(2.0))

    def loss(self, x: Tensor, names: Sequence[str] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean bits/dim of a batch and its terms: of the whole image, or of one term alone."""
        y, log_q = self.dequantize(x)
        terms = self.terms(y, names)
        alone = names[0] if names is not None and len(names) == 1 else None
        return self.bits_per_dim(terms, log_q, alone).mean(), terms

    @torch.no_grad()
    def iw_log_likelihood(self, x: Tensor, k: int) -> Tensor:
        r"""``log P(x) ≈ logsumexp_k [log p(y_k) - D log K - log q(u_k | x)] - log k``, nats, (B,).

        The k-sample importance-weighted bound of Flow++'s reported figures (Burda et al. 2016):
        k = 1 is the dequantized bound, and it tightens as k grows. For a `LatentVariable` model
        (the VAE-flow) ``log p(y_k)`` is its one importance weight ``log p(y_k, z_k) - log q(z_k | y_k)``
        with a fresh z per sample, so the bound is importance-weighted over both z and u.
        """
        if k < 1:
            raise ValueError(f"--iw-samples {k} must be >= 1.")
        offset = self.num_dims * self.n_bits * math.log(2.0)
        samples = []
        for _ in range(k):
            y, log_q = self.dequantize(x)
            log_p = self.model.log_joint_sample(y) if isinstance(self.model, LatentVariable) else self.model.log_prob(y)
            samples.append(log_p.double() - torch.as_tensor(log_q).double() - offset)
        return torch.logsumexp(torch.stack(samples), dim=0) - math.log(k)
