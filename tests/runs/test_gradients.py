"""flowkit.runs.gradients.clip_grad_norm: torch's clipping rule with a norm that cannot overflow."""

from __future__ import annotations

import math

import pytest
import torch

from flowkit.runs.gradients import clip_grad_norm


def params_with_grads(*grads: list[float]) -> list[torch.nn.Parameter]:
    out = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(len(g)))
        p.grad = torch.tensor(g)
        out.append(p)
    return out


def test_matches_torch_where_the_float32_norm_is_finite() -> None:
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.zeros(5, 3)), torch.nn.Parameter(torch.zeros(7))]
    theirs = [torch.nn.Parameter(torch.zeros(5, 3)), torch.nn.Parameter(torch.zeros(7))]
    for a, b in zip(ours, theirs, strict=True):
        a.grad = 10 * torch.randn_like(a)
        b.grad = a.grad.clone()
    norm = clip_grad_norm(ours, 1.5)
    want = torch.nn.utils.clip_grad_norm_(theirs, 1.5)
    assert norm.item() == pytest.approx(want.item(), rel=1e-6) and norm.item() > 1.5
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def test_a_finite_gradient_beyond_float32s_norm_range_is_clipped_not_infinite() -> None:
    # 1e20 squared overflows float32: torch's norm is inf, its factor 0, the gradient erased.
    params = params_with_grads([1e20, 1.0], [3.0])
    assert torch.nn.utils.get_total_norm([p.grad for p in params]).isinf()
    norm = clip_grad_norm(params, 50.0)
    assert math.isfinite(norm.item()) and norm.item() == pytest.approx(1e20, rel=1e-6)
    grads = torch.cat([p.grad for p in params])
    assert torch.linalg.vector_norm(grads.double()).item() == pytest.approx(50.0, rel=1e-5)
    assert grads[0].item() == pytest.approx(50.0, rel=1e-5), "the direction is kept"


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_element_gives_a_non_finite_norm(bad: float) -> None:
    norm = clip_grad_norm(params_with_grads([1.0, bad]), 50.0)
    assert not math.isfinite(norm.item())


def test_below_the_limit_and_without_a_limit_the_gradients_are_untouched() -> None:
    params = params_with_grads([3.0, 4.0])
    assert clip_grad_norm(params, 5.5).item() == pytest.approx(5.0)
    assert params[0].grad.tolist() == [3.0, 4.0]
    params = params_with_grads([3e30, 4e30])
    assert clip_grad_norm(params, float("inf")).item() == pytest.approx(5e30)
    assert params[0].grad.tolist() == [pytest.approx(3e30), pytest.approx(4e30)]
    assert clip_grad_norm([torch.nn.Parameter(torch.zeros(2))], 1.0).item() == 0.0
