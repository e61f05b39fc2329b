"""train.memory = "recompute": gradients equal the stored path's, and saved memory is flat in depth.

Every comparison runs the same module twice on the same batch, once storing activations and
once rebuilding them with the inverse (`flowkit.contracts.reversible`), and compares every
parameter's gradient, the input's and the context's. Losses are per dimension (bits/dim
scale), so the gradients are of order one and a 1e-5 tolerance means what it says. In
float32, as training runs, except one float64 test showing the difference is round-off only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import Tensor, nn

import flowkit
from flowkit.bench.timing import saved_for_backward
from flowkit.contracts.transform import Sequential, use_recompute
from flowkit.testing import randomize_

ROOT = Path(__file__).resolve().parents[2]
TINY_NET = {"use": "glow_cnn", "hidden": 8}
GATED_NET = {"use": "gated_resnet", "hidden": 8, "blocks": 1, "heads": 2}


def glow_step(coupling: str = "affine", invconv: str = "lu") -> dict:
    return {"use": "glow", "invconv": invconv, "coupling": {"use": coupling, "net": TINY_NET}}


def multiscale(in_shape: tuple[int, int, int], **params) -> nn.Module:  # noqa: ANN003
    table = {"levels": 2, "depth": 2, "step": glow_step(), **params}
    model = flowkit.build("model", "multiscale", in_shape=in_shape, **table)
    model.initialize(torch.rand(16, *in_shape))
    return randomize_(model, 0.05)


def uses_reversible(output: Tensor) -> bool:
    """Whether the graph behind ``output`` goes through the reversible function at least once."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "Reversible" in node.name():
            return True
        stack += [next_node for next_node, _ in node.next_functions]
    return False


def gradients(module: nn.Module, loss_fn: Callable[[], Tensor], leaves: dict[str, Tensor],
              recompute: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss and the gradient of every parameter and of ``leaves``, with the RNG reseeded
    before the loss so that both paths draw the same dropout masks."""
    use_recompute(module, enabled=recompute)
    module.zero_grad(set_to_none=True)
    for leaf in leaves.values():
        leaf.grad = None
    with torch.random.fork_rng():
        torch.manual_seed(1)
        loss = loss_fn()
    assert uses_reversible(loss) == recompute
    loss.backward()
    found = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    found.update({name: leaf.grad.clone() for name, leaf in leaves.items()})
    return loss.detach(), found


def assert_same_gradients(module: nn.Module, loss_fn: Callable[[], Tensor],
                          leaves: dict[str, Tensor] | None = None, *, tol: float = 1e-5) -> None:
    leaves = leaves or {}
    stored_loss, stored = gradients(module, loss_fn, leaves, recompute=False)
    loss, recomputed = gradients(module, loss_fn, leaves, recompute=True)
    torch.testing.assert_close(loss, stored_loss, atol=tol, rtol=tol)
    expected = {name for name, p in module.named_parameters() if p.requires_grad} | set(leaves)
    assert set(stored) == set(recomputed) == expected
    for name, grad in stored.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(recomputed[name], grad, atol=tol, rtol=tol,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(("coupling", "invconv"), [("affine", "lu"), ("affine", "plain"), ("additive", "lu"),
                                                   ("additive", "plain")])
def test_glow_gradients_equal_the_stored_path(coupling: str, invconv: str) -> None:
    in_shape = (2, 8, 8)
    model = multiscale(in_shape, step=glow_step(coupling, invconv))
    y = torch.rand(4, *in_shape, requires_grad=True)
    dims = math.prod(in_shape)
    assert_same_gradients(model, lambda: -model.log_prob(y).mean() / dims, {"input": y})


def test_in_float64_the_only_difference_is_round_off() -> None:
    in_shape = (2, 8, 8)
    model = multiscale(in_shape).double()
    y = torch.rand(4, *in_shape, dtype=torch.float64, requires_grad=True)
    assert_same_gradients(model, lambda: -model.log_prob(y).mean() / 128, {"input": y}, tol=1e-10)


def test_a_data_batch_without_grad_and_frozen_parameters_work() -> None:
    in_shape = (2, 8, 8)
    model = multiscale(in_shape)
    frozen = [p for name, p in model.named_parameters() if name.endswith("log_s")]
    for p in frozen:
        p.requires_grad_(False)
    y = torch.rand(4, *in_shape)
    assert_same_gradients(model, lambda: -model.log_prob(y).mean() / 128)
    assert all(p.grad is None for p in frozen)


def test_nested_sequentials_of_a_split_flow_macow_equal_the_stored_path() -> None:
    in_shape = (2, 8, 8)
    macow = {"use": "macow", "units": 1, "glow": glow_step("affine")}
    split_step = {"use": "glow", "coupling": {"use": "additive", "net": TINY_NET}}
    model = multiscale(in_shape, step=macow, split_flow=True, split_step=split_step,
                       split_prior={"use": "gaussian"}, depth=1)
    nested = model.flow.chains()[0].transforms[-1]  # level 1's stage: (K steps, split step)
    assert isinstance(nested.transforms[0], Sequential) and isinstance(nested.transforms[1], Sequential)
    # Unrolled to the layers (MaCow unit, its Glow step, the split step), so backward
    # recomputes one layer at a time, each only once.
    units = nested.units()
    assert len(units) == 6 + 3 + 3 and not any(isinstance(unit, Sequential) for unit in units)
    y = torch.rand(3, *in_shape, requires_grad=True)
    assert_same_gradients(model, lambda: -model.log_prob(y).mean() / 128, {"input": y})


def wavelet_flow() -> nn.Module:
    model = flowkit.build("model", "wavelet_flow", in_shape=(1, 8, 8), levels=1, depth=[3], hidden=[4],
                          cond_channels=3, cond_depth=1,
                          base_step={"use": "glow", "coupling": {"use": "affine", "mask": "checkerboard"}})
    model.initialize(torch.rand(16, 1, 8, 8))
    return randomize_(model, 0.1)


def test_wavelet_flow_gradients_reach_the_conditioner_through_the_context() -> None:
    model = wavelet_flow()
    y = torch.rand(4, 1, 8, 8, requires_grad=True)
    assert_same_gradients(model, lambda: -model.log_prob(y).mean() / 64, {"input": y})


def test_a_conditioned_level_flow_gives_the_input_and_the_context_their_gradients() -> None:
    level = wavelet_flow().flows["level1"]
    flow, context_shape = level.flow, level.flow.context_shape
    x = torch.randn(4, 3, 4, 4, requires_grad=True)
    context = torch.randn(4, *context_shape, requires_grad=True)
    weights = torch.randn(3, 4, 4)

    def loss() -> Tensor:
        z, logabsdet = flow(x, context)
        return (z * weights).mean() + logabsdet.mean() / 48

    assert_same_gradients(flow, loss, {"input": x, "context": context})


def test_flowpp_mixlogistic_with_dropout_equals_the_stored_path() -> None:
    """The bisection inverse stops within tol = 1e-6 (plus float32 ulps), so the input of each
    mixlogistic coupling is rebuilt to about 1e-6; the gradients then agree to 1e-5. Dropout
    is on (training mode), so the RNG replay is needed too."""
    net = {**GATED_NET, "dropout": 0.2}
    step = {"use": "glow", "coupling": {"use": "mixlogistic", "components": 3, "net": net}}
    model = flowkit.build("model", "flowpp", in_shape=(1, 4, 4), step=step,
                          layout=["checkerboard", "checkerboard", "squeeze", "channel", "channel"])
    model.initialize(torch.rand(16, 1, 4, 4))
    model = randomize_(model, 0.1).train()
    y = torch.rand(4, 1, 4, 4, requires_grad=True)
    assert_same_gradients(model, lambda: -model.log_prob(y).mean() / 16, {"input": y})


def test_no_grad_and_inverse_are_unchanged() -> None:
    in_shape = (2, 8, 8)
    model = multiscale(in_shape)
    y = torch.rand(4, *in_shape)
    with torch.no_grad():
        stored = model.log_prob(y)
        latents, _ = model.encode(y)
        use_recompute(model)
        assert model.flow.chains()[0].recompute and model.flow.chains()[0].transforms[-1].recompute
        torch.testing.assert_close(model.log_prob(y), stored, atol=0, rtol=0)
        torch.testing.assert_close(model.decode(latents), y, atol=1e-5, rtol=0)


def saved_for_backward_bytes(model: nn.Module, y: Tensor, loss_of: Any = None) -> int:
    """Bytes of the distinct storages autograd saves for backward in ``-log_prob(y).mean()``
    (or ``loss_of(model, y)``), the parameters' own storages left out (they are held whatever
    autograd does): `flowkit.bench.timing.saved_for_backward`, which ``flowkit bench`` reports."""
    loss_of = loss_of or (lambda m, v: -m.log_prob(v).mean())
    return saved_for_backward(lambda: loss_of(model, y), [model])


@pytest.mark.parametrize("split_flow", [False, True])
def test_saved_memory_is_flat_in_depth_under_recompute_and_linear_when_stored(split_flow: bool) -> None:
    """Deterministic: the bytes autograd holds for backward, counted by storage (with
    split_flow each stage is a Sequential of two Sequentials)."""
    in_shape = (2, 8, 8)
    y = torch.rand(4, *in_shape)
    stored, recomputed = [], []
    for depth in (1, 2, 4):
        torch.manual_seed(0)
        model = multiscale(in_shape, depth=depth, split_flow=split_flow)
        stored.append(saved_for_backward_bytes(model, y))
        use_recompute(model)
        recomputed.append(saved_for_backward_bytes(model, y))
    assert recomputed[0] == recomputed[1] == recomputed[2]
    per_step = stored[1] - stored[0]
    assert per_step > 0 and stored[2] - stored[1] == 2 * per_step
    assert recomputed[0] < stored[0]


def flowpp(steps: int) -> nn.Module:
    step = {"use": "glow", "coupling": {"use": "affine", "net": GATED_NET}}
    return flowkit.build("model", "flowpp", in_shape=(2, 4, 4), step=step, layout=["checkerboard"] * steps)


def variational(steps: int) -> nn.Module:
    step = {"use": "glow", "coupling": {"use": "affine", "net": GATED_NET}}
    return flowkit.build("dequantizer", "variational", in_shape=(2, 4, 4), steps=steps, step=step,
                         context_channels=4, context_blocks=1, dropout=0.0)


@pytest.mark.parametrize("build", [flowpp, variational], ids=["flowpp", "variational"])
def test_flowpp_and_its_dequantizer_keep_one_steps_memory_under_recompute(build: Any) -> None:
    """Flow++ and the variational dequantizer run their steps themselves (Flow++'s own
    checkpoint option, the dequantizer's context); under recompute they hand the whole chain to
    `Sequential`, so the bytes saved for backward do not grow with the number of steps."""
    if build is flowpp:
        data, loss_of = torch.rand(4, 2, 4, 4), None
    else:
        data = torch.randint(0, 8, (4, 2, 4, 4), dtype=torch.uint8)
        loss_of = lambda deq, x: deq(x, 3)[1].mean()  # noqa: E731 - log q(u | x)
    stored, recomputed = [], []
    for steps in (1, 2, 4):
        torch.manual_seed(0)
        module = build(steps)
        stored.append(saved_for_backward_bytes(module, data, loss_of))
        use_recompute(module)
        torch.manual_seed(1)  # the dequantizer's noise: the same in both counts
        recomputed.append(saved_for_backward_bytes(module, data, loss_of))
    assert recomputed[0] == recomputed[1] == recomputed[2]
    assert stored[2] - stored[1] == 2 * (stored[1] - stored[0]) > 0


@pytest.mark.parametrize("memory", ["store", "recompute"])
def test_the_recipe_key_sets_the_switch_on_every_sequential_of_the_session(memory: str) -> None:
    from flowkit.plugins import make_plugins
    from flowkit.runs.session import build_session

    recipe = flowkit.load_recipe(ROOT / "recipes" / "glow.toml", preset="smoke",
                                 overrides=[f"train.memory={memory}"])
    session = build_session(recipe, make_plugins())
    sequentials = [m for m in session.model.modules() if isinstance(m, Sequential)]
    assert sequentials and all(m.recompute == (memory == "recompute") for m in sequentials)


def test_recompute_with_level_threads_is_refused_naming_both_keys() -> None:
    """The replay restores torch's global RNG while the other term threads draw from it."""
    from flowkit.errors import RecipeError
    from flowkit.plugins import make_plugins
    from flowkit.runs.session import build_session

    path = ROOT / "recipes" / "wavelet_flow_affine.toml"
    plugins = make_plugins()
    recipe = flowkit.load_recipe(path, preset="smoke", overrides=["train.memory=recompute", "train.level_threads=2"])
    with pytest.raises(RecipeError) as raised:
        build_session(recipe, plugins)
    message = str(raised.value)
    assert 'train.memory = "recompute"' in message and "train.level_threads = 2" in message, message
    assert "Set train.level_threads = 1" in message and str(path) in message, message
    one_thread = flowkit.load_recipe(path, preset="smoke", overrides=["train.memory=recompute", "train.level_threads=1"])
    assert build_session(one_thread, plugins).model is not None


@pytest.mark.slow
def test_a_glow_smoke_run_with_recompute_finishes_with_finite_bpd(tmp_path: Path) -> None:
    from flowkit.cli import _add_commands, cli

    _add_commands()
    out = tmp_path / "run"
    args = ["run", str(ROOT / "recipes" / "glow.toml"), "--preset", "smoke",
            "--set", "train.memory=recompute", "--out", str(out)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["test_bpd"]) and summary["steps"] > 0
    assert 'memory = "recompute"' in (out / "recipe.toml").read_text()
