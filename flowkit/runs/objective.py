"""The one objective of training and evaluation: dequantize, the model's terms, bits/dim, and
the importance-weighted estimate. The trainer, the term threads and both evaluators use it.

For integer images x with K = 2^n_bits levels, y = (x + u) / K with u ~ q(u | x), and

    bits/dim = (-log p(y) + D log K + log q(u | x)) / (D log 2)          (see `flowkit.runs.bpd`)

over the whole image. A term of a model with `IndependentTerms` is a density of its own:
trained or reported alone, its bits/dim are over its own dimensions, with the same offset.

``amp = "bf16"`` (train.amp) runs the model and the dequantizer under bf16 autocast: matmuls and
convolutions (the coupling, prior and conditioning nets) in bfloat16, while every part's own
map and log-determinant leaves autocast (invertible 1x1 convolutions, coupling transforms,
priors, the dequantizer's flow: each says so where it computes them), so the terms, and the
bits/dim computed from them here, are float32. Autocast state is per thread: `terms` enters it
itself, so the term threads of train.level_threads get it too.

Labels (a LongTensor ``(B,)`` of class indices, K for "no class", or None) travel beside the
images into `loss`, `terms` and `iw_log_likelihood`, which turn them into the model's
conditioning with `condition`; the model is called with ``context=`` only when that is not None.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from flowkit.contracts.dequantizer import Dequantizer
from flowkit.contracts.model import DensityModel, IndependentTerms, LatentVariable
from flowkit.runs.bpd import bits_per_dim, discrete_nll, nats_to_bits_per_dim


class Objective:
    """The dequantized bound of one model and dequantizer on images of ``num_dims`` dimensions."""

    def __init__(self, model: DensityModel, dequantizer: Dequantizer, n_bits: int, num_dims: int,
                 amp: str = "off") -> None:
        if amp not in ("off", "bf16"):
            raise ValueError(f'amp = "{amp}" must be "off" or "bf16".')
        self.model, self.dequantizer = model, dequantizer
        self.n_bits, self.num_dims = n_bits, num_dims
        self.amp = amp
        # The model's density functions; `compiled` replaces them with torch.compile'd ones.
        self._parts: Callable[..., dict[str, Tensor]] = model.log_prob_parts
        self._named_terms: Callable[..., dict[str, Tensor]] | None = getattr(model, "log_prob_terms", None)

    def compiled(self, mode: str) -> Objective:
        """The same objective with the model's terms under ``torch.compile(mode=mode)`` (train.compile):
        the graphs of log p's forward and backward are traced once per input shape and their
        element-wise work fused. The dequantizer stays eager, so the dequantization noise is drawn
        by the same generator calls as without compilation (exact resume is unchanged)."""
        twin = Objective(self.model, self.dequantizer, self.n_bits, self.num_dims, self.amp)
        twin._parts = torch.compile(self.model.log_prob_parts, mode=mode, dynamic=False)
        if self._named_terms is not None:
            twin._named_terms = torch.compile(self._named_terms, mode=mode, dynamic=False)
        return twin

    @contextlib.contextmanager
    def autocast(self, like: Tensor) -> Iterator[None]:
        """bf16 autocast on ``like``'s device when amp = "bf16"; nothing otherwise."""
        if self.amp == "off":
            yield
            return
        with torch.autocast(device_type=like.device.type, dtype=torch.bfloat16):
            yield

    def dequantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, log q(u | x))`` for a batch of integer images (draws from the global RNG)."""
        with self.autocast(x):
            return self.dequantizer(x, self.n_bits)

    def condition(self, labels: Tensor | None) -> Tensor | None:
        """The model's conditioning for a batch's ``labels`` (LongTensor ``(B,)``, K = "no class"), or
        None: the model is then called without a context. Unconditional models take none whatever
        the labels; a class-conditional model's context (its one-hot over K + 1 classes) is made here."""
        return None

    @torch.no_grad()
    def initialize(self, x: Tensor, labels: Tensor | None = None) -> None:
        """Data-dependent initialisation (actnorm) of the dequantizer, then of the model on the
        dequantized batch, conditioned on ``labels`` where the model is."""
        self.dequantizer.initialize(x, self.n_bits)
        y, _ = self.dequantize(x)
        self.model.initialize(y, **self._context(labels))

    def _context(self, labels: Tensor | None) -> dict[str, Tensor]:
        context = self.condition(labels)
        return {} if context is None else {"context": context}

    def terms(self, y: Tensor, names: Sequence[str] | None = None, labels: Tensor | None = None) -> dict[str, Tensor]:
        """Every term of log p(y), or only ``names`` (a model with `IndependentTerms`), conditioned
        on ``labels`` where the model is (`condition`)."""
        if names is not None and not isinstance(self.model, IndependentTerms):
            raise TypeError(f"{type(self.model).__name__} has no terms that can be computed alone.")
        context = self._context(labels)
        with self.autocast(y):
            if names is None:
                return self._parts(y, **context)
            assert self._named_terms is not None  # an IndependentTerms model has it
            return self._named_terms(y, names, **context)

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
        return nats_to_bits_per_dim(-term, self.num_dims)

    def loss(self, x: Tensor, names: Sequence[str] | None = None, labels: Tensor | None = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean bits/dim of a batch and its terms: of the whole image, or of one term alone."""
        y, log_q = self.dequantize(x)
        terms = self.terms(y, names, labels)
        alone = names[0] if names is not None and len(names) == 1 else None
        return self.bits_per_dim(terms, log_q, alone).mean(), terms

    @torch.no_grad()
    def iw_log_likelihood(self, x: Tensor, k: int, labels: Tensor | None = None) -> Tensor:
        r"""``log P(x) ≈ logsumexp_k [log p(y_k) - D log K - log q(u_k | x)] - log k``, nats, (B,).

        The k-sample importance-weighted bound of Flow++'s reported figures (Burda et al. 2016):
        k = 1 is the dequantized bound, and it tightens as k grows. For a `LatentVariable` model
        (the VAE-flow) ``log p(y_k)`` is its one importance weight ``log p(y_k, z_k) - log q(z_k | y_k)``
        with a fresh z per sample, so the bound is importance-weighted over both z and u.
        """
        if k < 1:
            raise ValueError(f"--iw-samples {k} must be >= 1.")
        samples = []
        context = self._context(labels)
        for _ in range(k):
            y, log_q = self.dequantize(x)
            with self.autocast(y):
                log_p = (self.model.log_joint_sample(y, **context) if isinstance(self.model, LatentVariable)
                         else self.model.log_prob(y, **context))
            # One importance weight of log P(x): minus the one-sample dequantized bound.
            samples.append(-discrete_nll(log_p.double(), self.num_dims, self.n_bits, torch.as_tensor(log_q).double()))
        return torch.logsumexp(torch.stack(samples), dim=0) - math.log(k)
