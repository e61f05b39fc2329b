"""Test-set evaluation: bits/dim of the whole image, and what each term of the model adds."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowkit.contracts.model import IndependentTerms
from flowkit.runs.bpd import figure_key, nats_to_bits_per_dim
from flowkit.runs.data import Split, read_batch
from flowkit.runs.session import Session

#: Images to evaluate: a tensor of data levels, or a `Split` read batch by batch.
Images = Tensor | Split
#: Their labels (aligned with the images), or None.
Labels = Tensor | np.ndarray | None


@contextmanager
def eval_mode(session: Session, seed: int) -> Iterator[None]:
    """Eval mode and fixed dequantization noise, both given back afterwards."""
    modules = (session.model, session.dequantizer)
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    devices = [session.device] if session.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield
    finally:
        for m, mode in zip(modules, was_training, strict=True):
            m.train(mode)


@torch.no_grad()
def per_image(session: Session, x_all: Images, labels: Labels = None, *, batch_size: int, seed: int,
              alone: str | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The evaluation loop: per batch of ``x_all``, every image's bits/dim as ``(B,)`` float64
    tensors, with fixed dequantization noise (``seed``) and the model in eval mode. ``x_all`` is
    read one batch at a time (a `Split` of a memory-mapped store is never read whole); ``labels``
    (beside ``x_all``) condition the model where it is conditional (`Objective.condition`).

    Keys: ``bpd`` (the whole model's dequantized bound) and, per term, ``bpd/<term>`` over the
    term's own dimensions when the terms are densities of their own (`IndependentTerms`), else
    ``bpd_share/<term>``, the term's share of the whole image's bits/dim (-term / (D log 2), no
    offset; the shares add up to ``bpd - n_bits`` with uniform dequantization). With ``alone``,
    only that term is computed and ``bpd`` is its bits/dim over its own dimensions. With a
    dequantizer whose noise leaves the bin the same figures are the noisy images' NLL, and every
    key says so: ``noisy_nll``, ``noisy_nll/<term>``, ``noisy_nll_share/<term>``
    (`flowkit.runs.bpd.figure_key`).
    """
    objective = session.objective
    key = figure_key(session.dequantizer.figure)
    independent = isinstance(session.model, IndependentTerms)
    names = [alone] if alone is not None else None
    with eval_mode(session, seed):
        for start in range(0, len(x_all), batch_size):
            x, batch_labels = _batch(session, x_all, labels, start, batch_size)
            y, log_q = objective.dequantize(x)
            terms = {k: v.double() for k, v in objective.terms(y, names, batch_labels).items()}
            values = {key: objective.bits_per_dim(terms, torch.as_tensor(log_q).double(), alone)}
            for name, term in terms.items():
                if independent:
                    values[f"{key}/{name}"] = objective.bits_per_dim(terms, 0.0, name)
                else:
                    values[f"{key}_share/{name}"] = objective.share_bits_per_dim(term)
            yield values


def _batch(session: Session, x_all: Images, labels: Labels, start: int, batch_size: int
           ) -> tuple[Tensor, Tensor | None]:
    """Images ``start .. start + batch_size`` and their labels, on the session's device."""
    x, batch_labels = read_batch(x_all, labels, start, start + batch_size)
    x = x.to(session.device, non_blocking=True)
    return x, batch_labels.to(session.device) if batch_labels is not None else None


def evaluate(session: Session, x_all: Images, labels: Labels = None, *, batch_size: int, seed: int,
             alone: str | None = None) -> dict[str, float]:
    """Mean bits/dim over ``x_all`` (every image, every pixel) of each key of `per_image` (the noisy
    images' NLL for a ``noisy_nll`` dequantizer)."""
    sums: dict[str, float] = {}
    n = 0
    for values in per_image(session, x_all, labels, batch_size=batch_size, seed=seed, alone=alone):
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value.sum().item()
        n += len(next(iter(values.values())))
    out = {key: value / n for key, value in sums.items()}
    bad = nonfinite_figures(out)
    if bad:
        out["nonfinite"] = ",".join(bad)  # the caller decides
    return out


def nonfinite_figures(figures: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys (``a/b`` for nested ones) of every number in ``figures`` that is NaN or infinite:
    an evaluation's figures, or a whole summary.json (flowkit.runs.execute.summarise)."""
    bad = []
    for key, value in figures.items():
        if isinstance(value, dict):
            bad += nonfinite_figures(value, f"{prefix}{key}/")
        elif isinstance(value, float) and not math.isfinite(value):
            bad.append(f"{prefix}{key}")
    return bad


@torch.no_grad()
def evaluate_iw(session: Session, x_all: Images, labels: Labels = None, *, k: int, batch_size: int,
                seed: int) -> float:
    """Importance-weighted bits/dim with ``k`` dequantization samples (Flow++'s reported figure);
    see `flowkit.runs.objective.Objective.iw_log_likelihood`."""
    objective = session.objective
    total, n = 0.0, 0
    with eval_mode(session, seed):
        for start in range(0, len(x_all), batch_size):
            x, batch_labels = _batch(session, x_all, labels, start, batch_size)
            log_px = objective.iw_log_likelihood(x, k, batch_labels)
            total += nats_to_bits_per_dim(-log_px, session.num_dims).sum().item()
            n += len(x)
    return total / n
