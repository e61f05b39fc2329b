r"""What a class-conditional run reports and draws beside its conditional bits/dim: the marginal
density of each image, the Bayes classifier the model defines, and sample grids by class.

With ``p(y | c)`` the model's dequantized density under class ``c`` (one draw of the
dequantization noise per image, shared by every class, so the classes are compared on the same
``y``) and ``p(c)`` the training set's class frequencies,

.. math::

    \text{bits/dim}_\text{marginal} = \frac{-\log \sum_c p(y \mid c)\, p(c) + D \log 2^{n} + \log q(u \mid x)}{D \log 2},
    \qquad \hat c(y) = \arg\max_c\, p(y \mid c)\, p(c),

the first a bound on the marginal ``-log2 P(x) / D``, comparable with an unconditional model's
bits/dim (it is never below the conditional figure by more than ``log2 K / D``), the second the
Bayes classifier whose test accuracy TarFlow's MNIST notebook reports. Both take K evaluations
of the model per image (``eval.class_images`` limits the images).

Sample grids: one row per class (``samples-T<t>.png``), the unconditional model ("no class",
``samples-noclass-T<t>.png``) and, for each weight of ``sample.guidance``, the rows guided
(``samples-guided<w>-T<t>.png``; a guided sample has no exact density).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowkit.contracts.transform import InverseSolver
from flowkit.errors import FlowkitError
from flowkit.models.conditional import ClassConditioned
from flowkit.runs.bpd import figure_key
from flowkit.runs.data import Split, read_batch
from flowkit.runs.evaluate import eval_mode
from flowkit.runs.metrics import MetricsSink
from flowkit.runs.sampling import denoise, sample_grids
from flowkit.runs.session import Session


def conditioning_of(session: Session) -> ClassConditioned:
    """The session's class-conditional view; a clear error for an unconditional run."""
    if session.conditioning is None:
        raise FlowkitError(f"run of {session.recipe.model.use} is not class-conditional (its recipe has "
                           "data.labels = false): it has no classes to classify or sample by.")
    return session.conditioning


def class_log_prior(labels: np.ndarray | Tensor, num_classes: int) -> Tensor:
    """``log p(c)``: the class frequencies of ``labels`` (the training set's), float64 ``(K,)``; a
    class that never occurs gets one count, so no log is minus infinity."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    counts = torch.bincount(labels[labels < num_classes], minlength=num_classes)[:num_classes].double().clamp(min=1.0)
    return (counts / counts.sum()).log()


def log_prob_per_class(session: Session, y: Tensor) -> Tensor:
    """``(B, K)`` float64: ``log p(y | c)`` of each dequantized image under each class, the sum
    of the model's terms (K evaluations of the model)."""
    conditioning = conditioning_of(session)
    objective = session.objective
    columns = []
    for c in range(conditioning.num_classes):
        labels = torch.full((len(y),), c, dtype=torch.long, device=y.device)
        terms = objective.terms(y, labels=labels)
        columns.append(torch.stack([t.double() for t in terms.values()]).sum(0))
    return torch.stack(columns, dim=1)


@torch.no_grad()
def per_class_batches(session: Session, x_all: Split | Tensor, labels_all: np.ndarray | Tensor | None, *,
                      batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """The class evaluation loop: per batch of ``x_all`` (with fixed dequantization noise,
    ``seed``, the model in eval mode), ``log p(y | c)`` ``(B, K)``, ``log q(u | x)`` ``(B,)``, both
    float64, and the batch's labels (None without), on the session's device."""
    objective = session.objective
    with eval_mode(session, seed):
        for start in range(0, len(x_all), batch_size):
            x, labels = read_batch(x_all, labels_all, start, start + batch_size)
            y, log_q = objective.dequantize(x.to(session.device))
            per_class = log_prob_per_class(session, y)
            log_q = torch.as_tensor(log_q, device=per_class.device).double().expand(len(y))
            yield per_class, log_q, None if labels is None else labels.to(session.device)


@torch.no_grad()
def evaluate_classes(session: Session, x_all: Split | Tensor, labels_all: np.ndarray | Tensor, *,
                     batch_size: int, seed: int, log_class_prior: Tensor) -> dict[str, Any]:
    """Over ``x_all`` with its labels: the mean marginal bits/dim (``bpd_marginal``), the mean
    conditional bits/dim of each image under its own class (``bpd_conditional``: the same figure
    as `flowkit.runs.evaluate.evaluate` with the same ``seed``), the Bayes classifier's accuracy
    (``bayes_accuracy``) and its accuracy per class (``bayes_accuracy_per_class``, by class name
    index)."""
    conditioning = conditioning_of(session)
    objective = session.objective
    k = conditioning.num_classes
    sums = {"bpd_marginal": 0.0, "bpd_conditional": 0.0, "correct": 0.0}
    hits_per_class, count_per_class = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    n = 0
    for per_class, log_q, labels in per_class_batches(session, x_all, labels_all, batch_size=batch_size, seed=seed):
        assert labels is not None  # read beside the images
        prior = log_class_prior.to(per_class.device)
        marginal = conditioning.log_marginal(per_class, prior)
        own = per_class.gather(1, labels[:, None])[:, 0]
        sums["bpd_marginal"] += objective.bits_per_dim({"log_p": marginal}, log_q).sum().item()
        sums["bpd_conditional"] += objective.bits_per_dim({"log_p": own}, log_q).sum().item()
        hits = (conditioning.bayes_classify(per_class, prior) == labels).double().cpu()
        sums["correct"] += hits.sum().item()
        hits_per_class.index_add_(0, labels.cpu(), hits)
        count_per_class.index_add_(0, labels.cpu(), torch.ones_like(hits))
        n += len(labels)
    seen = count_per_class > 0
    return {"bpd_marginal": sums["bpd_marginal"] / n, "bpd_conditional": sums["bpd_conditional"] / n,
            "bayes_accuracy": sums["correct"] / n,
            "bayes_accuracy_per_class": {str(c): float(hits_per_class[c] / count_per_class[c])
                                         for c in range(k) if seen[c]}}


def class_figures(session: Session, *, seed: int) -> dict[str, Any]:
    """A conditional run's summary entries: marginal test bits/dim and the Bayes classifier's test
    accuracy over eval.class_images test images (0: all), with the class prior of the training
    labels. A run trained on noisy images gets the same figures of its noisy test images, named
    for what they are (``test_noisy_nll_marginal``, ``test_noisy_nll_conditional``; the
    classifier's accuracy is then that of the noisy images, one noise draw each)."""
    conditioning = conditioning_of(session)
    limit = session.recipe.eval.class_images
    test = session.test_x.first(limit) if limit else session.test_x
    prior = class_log_prior(session.train_x.labels, conditioning.num_classes)
    figures = evaluate_classes(session, test, test.labels, batch_size=session.recipe.train.eval_batch_size,
                               seed=seed, log_class_prior=prior)
    # The conditional figure over the same images, for a like-for-like comparison with the
    # marginal (test_bpd is over the whole test set; equal to this when class_images is 0).
    key = figure_key(session.dequantizer.figure)  # never "bpd" for noisy images
    return {f"test_{key}_marginal": figures["bpd_marginal"], f"test_{key}_conditional": figures["bpd_conditional"],
            "bayes_accuracy": figures["bayes_accuracy"],
            "bayes_accuracy_per_class": figures["bayes_accuracy_per_class"],
            "class_images": len(test), "classes": list(session.dataset.classes),
            "class_prior": "training-set frequencies"}


def class_labels(num_classes: int, per_class: int) -> Tensor:
    """``0 0 .. 1 1 .. K-1``: ``per_class`` images of each class, a grid row each."""
    return torch.arange(num_classes).repeat_interleave(per_class)


@torch.no_grad()
def class_grids(session: Session, out_dir: Path, *, n: int, temperatures: tuple[float, ...] | list[float],
                seed: int, guidance: tuple[float, ...] | list[float] = (), prefix: str = "samples",
                metrics: MetricsSink | None = None, step: int = 0, labels: int | None | str = "rows",
                solver: InverseSolver | None = None, seconds: dict[str, float] | None = None,
                denoised: bool = False) -> tuple[list[Path], dict[str, int]]:
    """A conditional run's grids per temperature: with ``labels = "rows"``, one row per class
    (``n // K`` images each, at least one) and the unconditional model's ``n`` images
    (``<prefix>-noclass``); with a class index, ``n`` images of that class; with None, only "no
    class". Each weight of ``guidance`` adds the same rows guided (``<prefix>-guided<w>``).
    ``solver`` as `flowkit.runs.sampling.sample_grids`; ``seconds`` gets the draw times of the "no
    class" grid (``n`` images, as an unconditional run's grid) or, without one, of the first grid.
    ``denoised``: the same draws, each denoised by the density of its own class ("no class" for
    the unconditional grid; a guided draw by its class's conditional density, unguided, as
    TarFlow denoises: the guidance steers the inverse only), into ``<prefix>-denoised``,
    ``<prefix>-denoised-noclass`` and ``<prefix>-denoised-guided<w>``, as `sample_grids` names
    its denoised grids."""
    conditioning = conditioning_of(session)
    if denoised:
        prefix = f"{prefix}-denoised"
    k = conditioning.num_classes
    if labels == "rows":
        per_class = max(1, n // k)
        rows: Tensor | int | None = class_labels(k, per_class).to(session.device)
        count, ncol = per_class * k, per_class
    else:
        rows, count, ncol = labels, n, None
    paths: list[Path] = []
    overflowed: dict[str, int] = {}

    timed = "noclass" if labels == "rows" or labels is None else ""

    def grids(name: str, draw_labels: Tensor | int | None, weight: float | None, images: int,
              columns: int | None) -> None:
        kind = name.removeprefix(prefix).lstrip("-")
        draw = lambda t: conditioning.sample(images, t, draw_labels, weight)  # noqa: E731
        if denoised:
            context = conditioning.context(draw_labels, images)
            draw = lambda t, plain=draw: denoise(session, plain(t), context)  # noqa: E731
        made, over = sample_grids(
            session, out_dir, n=images, temperatures=temperatures, seed=seed, prefix=name, metrics=metrics,
            step=step, ncol=columns, solver=solver, seconds=seconds if kind == timed else None, draw=draw)
        paths.extend(made)  # overflow keys read as the files do: T1, noclass-T1, guided2-T1
        overflowed.update({f"{kind}-{key}" if kind else key: v for key, v in over.items()})

    if rows is not None:
        grids(prefix, rows, None, count, ncol)
    if labels == "rows" or labels is None:
        grids(f"{prefix}-noclass", None, None, n, None)
    if rows is not None:
        for weight in guidance:
            grids(f"{prefix}-guided{weight:g}", rows, float(weight), count, ncol)
    return paths, overflowed
