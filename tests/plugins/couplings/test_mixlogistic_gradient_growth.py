"""Why a Wavelet Flow with mixture couplings stopped with "a gradient became NaN or Inf" at a
finite loss (docs/comparisons/couplings, step 921 in level 1), on a small case.

A logistic-mixture coupling's slope dσ⁻¹(F)/dx = f / (F (1 - F)) is largest on a narrow
component: at its centre, with weight π on it and F = 1/2, f ≈ π e^{-log s} / 4, so the slope is
about π e^{-log s}, 548 for π = 1/2 at Flow++'s log-scale floor of -7. Where
the narrow components of successive layers sit on the value each receives, the gradient of
the loss with respect to the first layers is the product of their slopes, while the forward
values, and so the loss, stay moderate: σ⁻¹(F) is bounded by the wide component. Eight such
layers give gradients near 1e21, finite in float32 but beyond the 1.8e19 whose square float32
can hold, so torch's float32 gradient norm is inf; the trainer read that as a non-finite
gradient. The level flows of that run were 16 steps deep.
"""

from __future__ import annotations

import math

import torch

from flowkit.runs.gradients import clip_grad_norm
from flowkit_plugins.couplings.mixlogistic import MIN_LOG_SCALE, logit_mixture_cdf


def aligned_chain(layers: int) -> tuple[torch.Tensor, list[torch.nn.Parameter]]:
    """The loss 0.5 z² - log|dz/dx| of one value through ``layers`` mixture maps, each with half
    its weight on a component at the log-scale floor placed half a scale above the value it
    receives, and half on a unit-scale one; returns the loss and the components' means."""
    log_pi = torch.log(torch.full((1, 2, 1, 1, 1), 0.5))
    log_s = torch.tensor([MIN_LOG_SCALE, 0.0]).view(1, 2, 1, 1, 1)
    h, logdet, means = torch.full((1, 1, 1, 1), 0.3), torch.zeros(()), []
    for _ in range(layers):
        offset = torch.tensor([0.5 * math.exp(MIN_LOG_SCALE), 0.0]).view(1, 2, 1, 1, 1)
        mu = torch.nn.Parameter(h.detach().unsqueeze(1) + offset)
        means.append(mu)
        h, log_deriv = logit_mixture_cdf(h, log_pi, mu, log_s)
        logdet = logdet + log_deriv.sum()
    return 0.5 * h.square().sum() - logdet, means


def test_the_gradient_grows_by_the_narrow_slope_per_layer_at_a_moderate_loss() -> None:
    loss, means = aligned_chain(8)
    loss.backward()
    grads = [m.grad.abs().max().item() for m in means]
    assert math.isfinite(loss.item()) and abs(loss.item()) < 100
    # Each layer further from the loss multiplies the gradient by the narrow component's slope.
    ratios = [a / b for a, b in zip(grads[:-2], grads[1:-1], strict=True)]
    assert all(100 < r < math.exp(-MIN_LOG_SCALE) for r in ratios), ratios
    assert 1.8e19 < grads[0] < 3.4e38, "finite in float32, its square is not"


def test_float32s_norm_calls_it_infinite_and_the_float64_norm_clips_it() -> None:
    loss, means = aligned_chain(8)
    loss.backward()
    assert all(torch.isfinite(m.grad).all() for m in means)
    assert torch.nn.utils.get_total_norm([m.grad for m in means]).isinf()  # what the trainer saw
    norm = clip_grad_norm(means, 50.0)
    assert math.isfinite(norm.item()) and norm.item() > 1e19
    clipped = torch.linalg.vector_norm(torch.cat([m.grad.flatten() for m in means]).double())
    assert clipped.item() <= 50.0 * (1 + 1e-5)


def test_deep_enough_the_gradient_itself_overflows() -> None:
    # Sixteen aligned layers (the level flows' depth) pass float32's range in the gradient
    # itself: there clipping cannot help, and the trainer stops, naming the step and level.
    loss, means = aligned_chain(16)
    loss.backward()
    assert math.isfinite(loss.item())
    assert not all(torch.isfinite(m.grad).all() for m in means)
