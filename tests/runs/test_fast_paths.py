"""The speed options change speed only: train.channels_last, train.compile and the fused
multi-tensor optimisers give the loss and gradients of the plain path on a fixed batch (issue 11: identical
log-likelihoods to 1e-4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowkit.plugins import Plugins
from flowkit.recipes.load import load_recipe
from flowkit.runs.rundir import RunDir
from flowkit.runs.session import build_session
from flowkit.runs.trainer import Trainer, make_optimizer

ROOT = Path(__file__).resolve().parents[2]


def trainer(plugins: Plugins, out: Path, *overrides: str) -> Trainer:
    recipe = load_recipe(ROOT / "recipes" / "glow.toml", plugins.registries, preset="smoke",
                         overrides=["train.device=cpu", "train.threads=1", *overrides])
    t = Trainer(build_session(recipe, plugins), RunDir.create(recipe.meta.name, out=out))
    t.initialize()
    return t


def loss_and_gradients(t: Trainer, x: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    t.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # the same dequantization noise
    if t.cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    loss, _ = t.backward(x)
    return loss.item(), {n: p.grad.clone() for n, p in t.s.model.named_parameters() if p.grad is not None}


def same_weights(a: Trainer, b: Trainer) -> None:
    b.s.model.load_state_dict(a.s.model.state_dict())
    with torch.no_grad():  # away from initialisation, where zero last layers hide differences
        gen = torch.Generator().manual_seed(0)
        for p, q in zip(a.s.model.parameters(), b.s.model.parameters(), strict=True):
            noise = 0.05 * torch.randn(p.shape, generator=gen)
            p.add_(noise)
            q.add_(noise)


def check_same(plain: Trainer, fast: Trainer) -> None:
    x = plain.s.train_x[:8]
    loss_a, grads_a = loss_and_gradients(plain, x)
    loss_b, grads_b = loss_and_gradients(fast, x)
    assert abs(loss_a - loss_b) < 1e-4, (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_channels_last_gives_the_loss_and_gradients_of_the_plain_layout(plugins: Plugins, tmp_path: Path) -> None:
    plain = trainer(plugins, tmp_path / "a")
    fast = trainer(plugins, tmp_path / "b", "train.channels_last=true")
    convs = [m for m in fast.s.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    same_weights(plain, fast)
    check_same(plain, fast)


@pytest.mark.slow  # compiling even the smoke model takes tens of seconds on 2 cores
def test_compiled_terms_give_the_loss_and_gradients_of_eager(plugins: Plugins, tmp_path: Path) -> None:
    plain = trainer(plugins, tmp_path / "a")
    fast = trainer(plugins, tmp_path / "b", "train.compile=default")
    assert fast.objective._parts is not fast.s.model.log_prob_parts  # the compiled function is in use
    same_weights(plain, fast)
    check_same(plain, fast)


@pytest.mark.parametrize("name", ["adam", "adamw", "adamax"])
def test_fast_optimisers_take_the_default_implementations_step(name: str) -> None:
    """Fused Adam/AdamW and foreach Adamax: the step of torch's one-tensor-at-a-time default."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fast = make_optimizer(name, [{"params": params}], lr=1e-2, weight_decay=1e-3)
    cls = type(fast)
    default = cls([{"params": twins}], lr=1e-2, weight_decay=1e-3, foreach=False)
    assert fast.defaults.get("fused" if name != "adamax" else "foreach")
    for step in range(5):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twins, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        fast.step()
        default.step()
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_parameter_that_is_a_strided_view_gets_the_foreach_kernel() -> None:
    """The fused kernel reads each parameter as flat memory; a strided view would pair elements wrongly."""
    base = torch.randn(4, 6)
    strided = torch.nn.Parameter(base[:, ::2])
    assert not strided.is_contiguous()
    optimizer = make_optimizer("adam", [{"params": [strided, torch.nn.Parameter(torch.randn(3))]}], 1e-2, 0.0)
    assert optimizer.defaults.get("foreach") and not optimizer.defaults.get("fused")
    assert make_optimizer("adam", [{"params": [torch.nn.Parameter(torch.randn(3))]}], 1e-2, 0.0).defaults["fused"]
