r"""Class conditioning, one path for every model: labels become a one-hot vector context.

A class-conditional run (``data.labels = true``) builds its model with a vector context of
``K + 1`` entries: classes ``0 .. K-1`` and ``K``, "no class", the label that label dropout
(``train.label_dropout``) puts in place of a class so that one network also learns the
unconditional model, and that guidance samples against. The model hands the vector to every
coupling net and every prior that takes a context (a model declares that it can:
``register(..., contexts=("vector",))``); each of them projects it with a zero-initialised map
of its own (`flowkit.contracts.context.VectorContext`), which is the class's embedding. No
embedding is shared between parts, so Wavelet Flow's levels stay independent.

`ClassConditioned` is the `flowkit.contracts.model.ClassConditional` view of such a model:
``log_prob(y, labels)``, ``sample(n, temperature, labels, guidance)``, and the density of each
image under every class, from which the marginal ``p(y) = Σ_c p(y | c) p(c)`` and the Bayes
classifier ``argmax_c p(y | c) p(c)`` follow. Guidance mixes each net's conditional and
unconditional outputs, ``h = h_c + w (h_c - h_u)`` (`flowkit.nn.guidance`); a guided sample
has no exact density.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowkit.contracts.model import DensityModel
from flowkit.errors import ShapeError
from flowkit.nn.guidance import Guidance


class ClassConditioned:
    """A model built with a class context (``context_shape = (num_classes + 1,)``), answering
    in labels. It holds no parameters of its own: the model is ``self.model``.

    Args:
        model: a `DensityModel` built with ``context_shape = (num_classes + 1,)``.
        num_classes: K; labels are ``0 .. K-1``, and ``K`` is "no class".
        guidance: the `Guidance` its nets and priors were wrapped with when built
            (`flowkit.build.Builder`), for guided sampling; ``None``: no guidance.
    """

    def __init__(self, model: DensityModel, num_classes: int, guidance: Guidance | None = None) -> None:
        if num_classes < 1:
            raise ShapeError(f"a class-conditional model needs at least one class, got {num_classes}.")
        self.model = model
        self.num_classes = int(num_classes)
        self.guidance = guidance

    @property
    def no_class(self) -> int:
        """The label of "no class" (the unconditional model): K."""
        return self.num_classes

    @property
    def context_shape(self) -> tuple[int]:
        return (self.num_classes + 1,)

    def one_hot(self, labels: Tensor, like: Tensor) -> Tensor:
        """``(B, K + 1)`` one-hot vectors of ``labels`` (``K``: "no class"), in ``like``'s float
        dtype (at least float32) and on its device."""
        labels = torch.as_tensor(labels, device=like.device)
        if labels.dim() != 1:
            raise ShapeError(f"labels must be one class per image, shape (B,), got {tuple(labels.shape)}.")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise ShapeError(f"labels must be classes 0..{self.num_classes - 1} or {self.num_classes} (no class); "
                             f"got values from {int(labels.min())} to {int(labels.max())}.")
        dtype = torch.promote_types(like.dtype, torch.float32) if like.is_floating_point() else torch.float32
        return nn.functional.one_hot(labels.long(), self.num_classes + 1).to(dtype)

    def labels_for(self, labels: Tensor | int | None, n: int, like: Tensor) -> Tensor:
        """``labels`` as ``(n,)``: one class for all (an int), "no class" (None), or one per image."""
        if labels is None:
            labels = self.no_class
        if isinstance(labels, int):
            return torch.full((n,), labels, dtype=torch.long, device=like.device)
        labels = torch.as_tensor(labels, device=like.device)
        if labels.shape != (n,):
            raise ShapeError(f"labels must give one class per image, shape ({n},), got {tuple(labels.shape)}.")
        return labels

    def context(self, labels: Tensor | int | None, n: int) -> Tensor:
        """The model's context for ``n`` images of ``labels`` (as `labels_for` takes them): their
        ``(n, K + 1)`` one-hot vectors, on the model's device and in its dtype."""
        like = next(iter(self.model.parameters()), torch.zeros(()))
        return self.one_hot(self.labels_for(labels, n, like), like)

    # -- densities -------------------------------------------------------------------------------
    def log_prob_parts(self, y: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The model's terms of ``log p(y | labels)``."""
        return self.model.log_prob_parts(y, self.one_hot(labels, y))

    def log_prob(self, y: Tensor, labels: Tensor) -> Tensor:
        """``log p(y | labels)`` per image, in nats."""
        return torch.stack(list(self.log_prob_parts(y, labels).values())).sum(0)

    @torch.no_grad()
    def log_prob_per_class(self, y: Tensor) -> Tensor:
        """``(B, K)``: ``log p(y | c)`` of each image under each class (K evaluations of the model)."""
        return torch.stack([self.log_prob(y, self.labels_for(c, len(y), y)) for c in range(self.num_classes)], dim=1)

    @staticmethod
    def log_marginal(per_class: Tensor, log_class_prior: Tensor) -> Tensor:
        """``log Σ_c p(y | c) p(c)`` per image from `log_prob_per_class` and ``log p(c)`` ``(K,)``."""
        return torch.logsumexp(per_class + log_class_prior.to(per_class), dim=1)

    @staticmethod
    def bayes_classify(per_class: Tensor, log_class_prior: Tensor) -> Tensor:
        """``argmax_c p(y | c) p(c)`` per image: the Bayes classifier of the model."""
        return torch.argmax(per_class + log_class_prior.to(per_class), dim=1)

    # -- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, labels: Tensor | int | None = None,
               guidance: float | None = None) -> Tensor:
        """``n`` images of class ``labels`` (an int, one per image, or None: "no class", the
        unconditional model), at ``temperature``; with ``guidance`` ``w``, classifier-free
        guidance (`flowkit.nn.guidance`), which needs classes (not "no class") and a model built
        for it. ``w = 0`` is plain conditional sampling."""
        context = self.context(labels, n)
        if guidance is None:
            return self.model.sample(n, temperature, context)
        if self.guidance is None:
            raise ShapeError("this model was not built for guidance (its nets are not wrapped); build it with a "
                             "flowkit.nn.guidance.Guidance.")
        if not math.isfinite(guidance):
            raise ShapeError(f"guidance = {guidance} must be a finite number.")
        if bool(context[:, self.no_class].any()):
            raise ShapeError('guidance steers a class away from "no class": give every image a class.')
        both = torch.cat([context, self.context(None, n)])
        with self.guidance.guiding(guidance):
            return self.model.sample(2 * n, temperature, both)[:n]
