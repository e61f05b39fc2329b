"""Training with Flow++'s variational dequantizer, fast: its optimizer group, its initialisation,
log q in the loss and in the evaluation, and an exact resume."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowkit.plugins import Plugins
from flowkit.recipes.load import load_recipe
from flowkit.runs.checkpoint import latest_checkpoint
from flowkit.runs.rundir import RunDir
from flowkit.runs.session import build_session
from flowkit.runs.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "flowpp.toml"
# The smoke preset made smaller still: 16 training images, batches of 4, a 2-step dequantizer.
TINY = ("train.device=cpu", "train.threads=1", "train.batch_size=4", "train.init_batch_size=8",
        "train.eval_batch_size=8", "train.log_every=1", "train.eval_every=0", "data.limit_train=16",
        "data.limit_test=8", "dequantizer.steps=2", "dequantizer.context_channels=4",
        "dequantizer.context_blocks=1")


def make_trainer(plugins: Plugins, out: Path, *overrides: str, resume: bool = False) -> Trainer:
    recipe = load_recipe(RECIPE, plugins.registries, preset="smoke", overrides=[*TINY, *overrides])
    rundir = RunDir(out) if resume else RunDir.create(recipe.meta.name, out=out)
    return Trainer(build_session(recipe, plugins), rundir)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def actnorms(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules with an ``initialized`` flag (actnorm: data-dependent initialisation)."""
    return [m for m in module.modules() if isinstance(getattr(m, "initialized", None), torch.Tensor)]


def test_the_dequantizer_is_its_own_optimizer_group_and_is_initialized_and_trained(
    plugins: Plugins, tmp_path: Path,
) -> None:
    trainer = make_trainer(plugins, tmp_path / "run", "train.steps=2")
    deq = trainer.s.dequantizer
    params = [p for p in deq.parameters() if p.requires_grad]
    assert params
    groups = {g["name"]: g["params"] for g in trainer.optimizer.param_groups}
    assert {id(p) for p in groups["dequantizer"]} == {id(p) for p in params}
    others = {id(p) for name, group in groups.items() if name != "dequantizer" for p in group}
    assert others and not others & {id(p) for p in params}, "the model's groups hold no dequantizer parameter"
    norms = actnorms(deq)
    assert norms and not any(bool(m.initialized) for m in norms)
    before = {name: p.detach().clone() for name, p in deq.named_parameters()}

    trainer.train()

    assert all(bool(m.initialized) for m in norms), "the dequantizer's initialize ran"
    # Every parameter that got a gradient from the loss (Adam's first moment is not zero) moved,
    # and that is all of them but a few elements: the empty triangles of 1x1 LU convolutions on
    # a 1-channel image, which no loss can move.
    got_gradient = {name for name, p in deq.named_parameters() if trainer.optimizer.state[p]["exp_avg"].any()}
    for name, p in deq.named_parameters():
        assert name not in got_gradient or not torch.equal(p, before[name]), name
    idle = sum(p.numel() for name, p in deq.named_parameters() if name not in got_gradient)
    assert idle <= 0.001 * sum(p.numel() for p in params), sorted(set(before) - got_gradient)


def test_the_training_loss_includes_log_q(plugins: Plugins, tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = make_trainer(plugins, out, "train.steps=1")
    s = trainer.s
    seen: dict = {}

    def capture(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled() and not seen:  # the first training step (not the initialisation)
            seen["rng"] = torch.get_rng_state()
            seen["x"] = (args[0] if args else kwargs["x"]).clone()
            seen["states"] = {name: copy.deepcopy(m.state_dict()) for name, m in s.modules().items()}

    s.dequantizer.register_forward_pre_hook(capture, with_kwargs=True)
    trainer.train()
    logged = next(m["train_bpd"] for m in metrics(out) if m.get("step") == 1 and "train_bpd" in m)

    # Replay step 1 by hand: its weights, its batch, its noise.
    for name, module in s.modules().items():
        module.load_state_dict(seen["states"][name])
        module.train()
    with torch.random.fork_rng(), torch.no_grad():
        torch.set_rng_state(seen["rng"])
        y, log_q = s.dequantizer(seen["x"], s.n_bits)
        log_p = s.model.log_prob(y)
    dims = seen["x"][0].numel()
    assert dims == 784 and y.shape == seen["x"].shape
    nats_per_bit = dims * math.log(2.0)
    expected = ((-log_p.double() + log_q.double()) / nats_per_bit + s.n_bits).mean().item()
    without_q = (-log_p.double() / nats_per_bit + s.n_bits).mean().item()
    assert logged == pytest.approx(expected, abs=1e-5)
    assert abs(without_q - expected) > 1e-2, "log q is large enough here for the check to tell"


def test_the_evaluation_includes_log_q(plugins: Plugins, tmp_path: Path) -> None:
    # log q raised by a constant c moves every bits/dim by c / (D log 2) and no gradient: with
    # c = 0.25 D log 2, the logged train and test bits/dim move by exactly 0.25 and the weights not at all.
    shift = 0.25
    runs = {}
    for name, c in (("plain", 0.0), ("shifted", shift * 784 * math.log(2.0))):
        out = tmp_path / name
        trainer = make_trainer(plugins, out, "train.steps=2", "train.eval_every=1")
        if c:
            def raise_log_q(_module: torch.nn.Module, _inputs: tuple, output: tuple, c: float = c) -> tuple:
                return output[0], output[1] + c

            trainer.s.dequantizer.register_forward_hook(raise_log_q)
        trainer.train()
        runs[name] = (metrics(out), {k: v.clone() for k, v in trainer.s.model.state_dict().items()})
    (plain, plain_weights), (shifted, shifted_weights) = runs["plain"], runs["shifted"]
    pairs = list(zip(plain, shifted, strict=True))
    test = [(m["test_bpd"], n["test_bpd"]) for m, n in pairs if "test_bpd" in m]
    train = [(m["train_bpd"], n["train_bpd"]) for m, n in pairs if "train_bpd" in m]
    assert len(test) == 1 and len(train) == 2
    for a, b in test:
        assert b - a == pytest.approx(shift, abs=1e-6)
    for a, b in train:
        assert b - a == pytest.approx(shift, abs=1e-4)
    for key, value in plain_weights.items():
        torch.testing.assert_close(shifted_weights[key], value, rtol=0, atol=0, msg=key)


class Interrupted(BaseException):
    """The run is killed."""


def test_resume_continues_exactly(plugins: Plugins, tmp_path: Path) -> None:
    budget = ("train.steps=4", "train.checkpoint_every=1")
    straight = tmp_path / "straight"
    make_trainer(plugins, straight, *budget).train()

    # The same run killed during step 3: its last checkpoint is step 2.
    killed = tmp_path / "killed"
    trainer = make_trainer(plugins, killed, *budget)
    calls = []

    def kill_at_step_3(_module: torch.nn.Module, _args: tuple) -> None:
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 3:
                raise Interrupted

    trainer.s.dequantizer.register_forward_pre_hook(kill_at_step_3)
    with pytest.raises(Interrupted):
        trainer.train()
    assert json.loads((killed / "checkpoints" / "latest.json").read_text())["step"] == 2

    resumed = tmp_path / "resumed"
    shutil.copytree(killed, resumed)
    trainer = make_trainer(plugins, resumed, *budget, resume=True)
    trainer.train(resume=True)
    assert trainer.state.step == 4

    a = load_file(str(latest_checkpoint(straight / "checkpoints") / "weights.safetensors"))
    b = load_file(str(latest_checkpoint(resumed / "checkpoints") / "weights.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("dequantizer.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The same losses at steps 3 and 4, computed after the resume.
    def losses(out: Path) -> list[float]:
        return [m["train_bpd"] for m in metrics(out) if "train_bpd" in m and m["step"] in (3, 4)]

    assert len(losses(resumed)) == 2 and losses(resumed) == losses(straight)
