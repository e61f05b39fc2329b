"""Gradient clipping by a norm accumulated in float64.

``torch.nn.utils.clip_grad_norm_`` sums the squares in the gradients' dtype: in float32 one
element above 1.8e19 makes the norm ``inf`` although every element is finite, the clipping
factor becomes 0 (and ``inf * 0`` NaN), and the trainer, which checks the norm, stops with "a
gradient became NaN or Inf". Deep stacks of logistic-mixture couplings produce such gradients
with a finite loss: where the narrow components of several layers line up on one value, the
gradient is the product of their slopes, each about π e^7 on a component of weight π at Flow++'s
log-scale floor (tests/plugins/couplings/test_mixlogistic_gradient_growth.py). Summed in
float64, the norm is exact for every finite gradient, so such a step is clipped as clipping
intends; only a gradient with a non-finite element has a non-finite norm.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], limit: float) -> torch.Tensor:
    """Scales the gradients of ``parameters`` to an L2 norm of at most ``limit`` (``inf``: no
    scaling) and returns their norm before scaling, in float64, on their device. Parameters
    without a gradient are skipped; with none at all the norm is 0."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    # One fused kernel per pass, as torch's own clipping (foreach), with the squares summed in
    # float64; a model's gradients live on one device (one per rank under DDP).
    norms = torch._foreach_norm(grads, 2.0, dtype=torch.float64)
    total = torch.linalg.vector_norm(torch.stack(norms))
    if limit != float("inf"):
        factor = (limit / (total + 1e-6)).clamp(max=1.0)  # torch's rule; a no-op below the limit
        torch._foreach_mul_(grads, factor.to(grads[0].dtype))
    return total
