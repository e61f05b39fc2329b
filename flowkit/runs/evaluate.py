"""Test-set evaluation: bits/dim of the whole image and of each term of the model."""

from __future__ import annotations

import math

import torch

from flowkit.runs.bpd import bits_per_dim
from flowkit.runs.session import Session


def dequantized_terms(session: Session, x: torch.Tensor, parts: list[str] | None = None):
    """(log_q (B,), {part: log p term (B,)}) for a uint8 batch already on the device."""
    y, log_q = session.dequantizer(x, session.n_bits)
    terms = session.model.log_prob_parts(y, parts) if parts else session.model.log_prob_parts(y)
    return log_q, terms


@torch.no_grad()
def evaluate(session: Session, x_all: torch.Tensor, *, batch_size: int, seed: int,
             parts: list[str] | None = None) -> dict[str, float]:
    """Mean bits/dim over ``x_all`` (every image, every pixel), with fixed dequantization noise.

    Returns ``bpd`` (the whole model's dequantized bound; only when all parts are evaluated)
    and ``bpd/<part>`` for each term, each over its own dimensions.
    """
    model, dequantizer = session.model, session.dequantizer
    was_training = model.training, dequantizer.training
    model.eval()
    dequantizer.eval()
    dims = model.part_dims()
    sums: dict[str, float] = {}
    total = 0.0
    n = 0
    devices = [session.device] if session.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(x_all), batch_size):
            x = x_all[start : start + batch_size].to(session.device, non_blocking=True)
            log_q, terms = dequantized_terms(session, x, parts)
            for name, term in terms.items():
                sums[name] = sums.get(name, 0.0) + bits_per_dim(term.double(), dims[name], session.n_bits).sum().item()
            if parts is None:
                log_p = torch.stack([t.double() for t in terms.values()]).sum(0)
                total += bits_per_dim(log_p, session.num_dims, session.n_bits, log_q.double()).sum().item()
            n += len(x)
    model.train(was_training[0])
    dequantizer.train(was_training[1])
    out = {f"bpd/{name}": value / n for name, value in sums.items()}
    if parts is None:
        out["bpd"] = total / n
    if not all(math.isfinite(v) for v in out.values()):
        bad = [k for k, v in out.items() if not math.isfinite(v)]
        out["nonfinite"] = ",".join(bad)  # reported; the caller decides
    return out


@torch.no_grad()
def evaluate_iw(session: Session, x_all: torch.Tensor, *, k: int, batch_size: int, seed: int) -> float:
    """Importance-weighted bits/dim with ``k`` dequantization samples (Flow++'s reported figure).

    log P(x) ≈ logsumexp_k [log p(y_k) - D log K - log q(u_k | x)] - log k (Burda et al. 2016);
    k = 1 is the dequantized bound of `evaluate`, and the estimate tightens as k grows.
    """
    if k < 1:
        raise ValueError(f"--iw-samples {k} must be >= 1.")
    model, dequantizer = session.model, session.dequantizer
    model.eval()
    dequantizer.eval()
    offset = session.num_dims * session.n_bits * math.log(2.0)
    total, n = 0.0, 0
    devices = [session.device] if session.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(x_all), batch_size):
            x = x_all[start : start + batch_size].to(session.device)
            terms = []
            for _ in range(k):
                y, log_q = dequantizer(x, session.n_bits)
                terms.append(model.log_prob(y).double() - log_q.double() - offset)
            log_px = torch.logsumexp(torch.stack(terms), dim=0) - math.log(k)
            total += (-log_px / (session.num_dims * math.log(2.0))).sum().item()
            n += len(x)
    return total / n
