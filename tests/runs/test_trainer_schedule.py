"""The trainer's data order, schedule and budget, per-group clipping and its non-finite branch."""

from __future__ import annotations

import json
import math
from itertools import islice
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowkit.errors import TrainingError
from flowkit.plugins import Plugins
from flowkit.recipes.load import load_recipe
from flowkit.runs.checkpoint import CheckpointError
from flowkit.runs.rundir import RunDir
from flowkit.runs.session import build_session
from flowkit.runs.trainer import Trainer, batches

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "wavelet_flow_affine.toml"
# cos(pi/4) and cos(pi/8), by hand: 0.5 (1 + cos) at a quarter and an eighth of the budget.
QUARTER = 0.5 + math.sqrt(2.0) / 4
EIGHTH = 0.5 + math.sqrt(2.0 + math.sqrt(2.0)) / 4


def make_trainer(plugins: Plugins, out: Path, *overrides: str) -> Trainer:
    """The smoke preset of Wavelet Flow on the CPU, one thread, the levels trained jointly."""
    recipe = load_recipe(RECIPE, plugins.registries, preset="smoke", overrides=[
        "train.device=cpu", "train.threads=1", "train.level_threads=1", *overrides])
    return Trainer(build_session(recipe, plugins), RunDir.create(recipe.meta.name, out=out))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- batches -----------------------------------------------------------------------------
def epochs(n: int, batch_size: int, seed: int, count: int) -> list[list[list[int]]]:
    per_epoch = n // min(batch_size, n)
    flat = [b.tolist() for b in islice(batches(n, batch_size, seed, 0), per_epoch * count)]
    return [flat[i * per_epoch : (i + 1) * per_epoch] for i in range(count)]


def test_every_index_comes_once_per_epoch_in_a_fresh_order() -> None:
    seen = epochs(12, 4, seed=3, count=4)
    for epoch in seen:
        assert [len(b) for b in epoch] == [4, 4, 4]
        assert sorted(sum(epoch, [])) == list(range(12))
    orders = [tuple(sum(epoch, [])) for epoch in seen]
    assert len(set(orders)) == 4, "each epoch draws a new permutation"
    assert epochs(12, 4, seed=3, count=4) == seen, "the order is a function of the seed"
    assert epochs(12, 4, seed=4, count=1) != seen[:1]


def test_a_partial_last_batch_is_dropped_and_a_different_image_left_out_each_epoch() -> None:
    seen = epochs(10, 3, seed=0, count=6)
    for epoch in seen:
        indices = sum(epoch, [])
        assert [len(b) for b in epoch] == [3, 3, 3]
        assert len(set(indices)) == 9 and set(indices) <= set(range(10))
    left_out = {(set(range(10)) - set(sum(epoch, []))).pop() for epoch in seen}
    assert len(left_out) > 1


@pytest.mark.parametrize("start", [0, 1, 2, 3, 4, 5, 7, 9])
def test_starting_at_step_k_continues_the_stream_of_an_uninterrupted_run(start: int) -> None:
    # 4 batches per epoch: the starts cover the middle of an epoch and both sides of its boundaries.
    straight = [b.tolist() for b in islice(batches(17, 4, 5, 0), start + 10)]
    resumed = [b.tolist() for b in islice(batches(17, 4, 5, start), 10)]
    assert resumed == straight[start:]


def test_a_batch_size_above_the_dataset_size_gives_the_whole_dataset_each_step() -> None:
    stream = [b.tolist() for b in islice(batches(5, 8, 1, 0), 6)]
    for batch in stream:
        assert sorted(batch) == [0, 1, 2, 3, 4]
    assert len({tuple(b) for b in stream}) > 1, "one epoch per step, each in a new order"
    assert [b.tolist() for b in islice(batches(5, 8, 1, 4), 2)] == stream[4:6]


# -- learning rate -----------------------------------------------------------------------
def test_warm_up_is_linear_and_reaches_the_peak_at_step_warmup_minus_one(plugins: Plugins,
                                                                        tmp_path: Path) -> None:
    trainer = make_trainer(plugins, tmp_path / "run", "train.lr=0.01", "train.warmup_steps=4",
                           "train.decay=none", "train.steps=100")
    got = [trainer.lr_at(step, 0.0) for step in (0, 1, 2, 3, 4, 50, 99)]
    assert got == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01, 0.01], rel=1e-12)
    assert trainer.lr_at(2, 1e6) == pytest.approx(0.0075, rel=1e-12), "no time dependence without decay"


def test_cosine_decays_over_the_step_budget(plugins: Plugins, tmp_path: Path) -> None:
    trainer = make_trainer(plugins, tmp_path / "run", "train.lr=2.0", "train.warmup_steps=0",
                           "train.decay=cosine", "train.steps=8", "train.minutes=5.0")
    got = [trainer.lr_at(step, 17.0) for step in (0, 1, 2, 4, 6, 8, 12)]
    want = [2.0, 2 * EIGHTH, 2 * QUARTER, 1.0, 2 * (1 - QUARTER), 0.0, 0.0]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_cosine_decays_over_the_minutes_budget_when_there_is_no_step_budget(plugins: Plugins,
                                                                            tmp_path: Path) -> None:
    trainer = make_trainer(plugins, tmp_path / "run", "train.lr=1.0", "train.warmup_steps=0",
                           "train.decay=cosine", "train.steps=0", "train.minutes=2.0")
    got = [trainer.lr_at(1000, seconds) for seconds in (0.0, 15.0, 30.0, 60.0, 90.0, 120.0, 500.0)]
    want = [1.0, EIGHTH, QUARTER, 0.5, 1 - QUARTER, 0.0, 0.0]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_warm_up_and_cosine_multiply(plugins: Plugins, tmp_path: Path) -> None:
    trainer = make_trainer(plugins, tmp_path / "run", "train.lr=1.0", "train.warmup_steps=4",
                           "train.decay=cosine", "train.steps=8")
    assert trainer.lr_at(1, 0.0) == pytest.approx(0.5 * EIGHTH, rel=1e-12)
    assert trainer.lr_at(4, 0.0) == pytest.approx(0.5, rel=1e-12)


def test_training_uses_the_scheduled_learning_rate_at_each_step(plugins: Plugins, tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = make_trainer(plugins, out, "train.lr=0.004", "train.warmup_steps=4", "train.decay=none",
                           "train.steps=3", "train.log_every=1")
    trainer.train()
    logged = [m["lr"] for m in metrics(out) if "lr" in m]
    assert logged == pytest.approx([0.001, 0.002, 0.003], rel=1e-12)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([0.003] * 3, rel=1e-12)


# -- budget ------------------------------------------------------------------------------
def test_done_after_the_step_budget(plugins: Plugins, tmp_path: Path) -> None:
    trainer = make_trainer(plugins, tmp_path / "run", "train.steps=3", "train.minutes=0.0")
    for step, done in ((0, False), (2, False), (3, True), (4, True)):
        trainer.state.step = step
        trainer.state.train_seconds = 1e6  # no time limit
        assert trainer.done() is done, step


def test_done_after_the_minutes_budget(plugins: Plugins, tmp_path: Path) -> None:
    trainer = make_trainer(plugins, tmp_path / "run", "train.steps=0", "train.minutes=0.5")
    for seconds, done in ((0.0, False), (29.99, False), (30.0, True), (31.0, True)):
        trainer.state.step = 10**6  # no step limit
        trainer.state.train_seconds = seconds
        assert trainer.done() is done, seconds


def test_either_budget_ends_training_when_both_are_set(plugins: Plugins, tmp_path: Path) -> None:
    trainer = make_trainer(plugins, tmp_path / "run", "train.steps=5", "train.minutes=1.0")
    for step, seconds, done in ((4, 59.0, False), (5, 0.0, True), (0, 60.0, True)):
        trainer.state.step, trainer.state.train_seconds = step, seconds
        assert trainer.done() is done, (step, seconds)


def test_training_stops_at_the_step_budget_and_checkpoints_it(plugins: Plugins, tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = make_trainer(plugins, out, "train.steps=3", "train.batch_size=16")
    trainer.train()
    assert trainer.state.step == 3 and trainer.state.images == 48
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 3


def test_a_spent_minutes_budget_stops_training_after_one_step(plugins: Plugins, tmp_path: Path) -> None:
    # 6e-8 seconds: the budget is spent by the first step, which always runs.
    trainer = make_trainer(plugins, tmp_path / "run", "train.steps=0", "train.minutes=1e-9")
    trainer.train()
    assert trainer.state.step == 1 and trainer.state.train_seconds > 1e-9 * 60


# -- clipping per parameter group ----------------------------------------------------------
def first_moment_norms(trainer: Trainer) -> dict[str, float]:
    """Per group, the norm of Adam's first moment after one step: (1 - beta1) x the applied gradient."""
    norms = {}
    for group in trainer.optimizer.param_groups:
        beta1 = group["betas"][0]
        squares = [trainer.optimizer.state[p]["exp_avg"].double().square().sum() for p in group["params"]
                   if p in trainer.optimizer.state]
        norms[group["name"]] = math.sqrt(sum(squares)) / (1 - beta1)
    return norms


def test_grad_clip_caps_each_groups_gradient_norm_separately(plugins: Plugins, tmp_path: Path) -> None:
    one_step = ("train.steps=1", "train.optimizer=adam", "train.weight_decay=0.0")
    free = make_trainer(plugins, tmp_path / "free", *one_step, "train.grad_clip=0.0")
    free.train()
    raw = first_moment_norms(free)
    assert set(raw) == {"base", "level1", "level2"}
    low, high = min(raw.values()), max(raw.values())
    assert high > 2 * low, f"the groups' gradient norms {raw} are too close to clip some and not others"
    clip = math.sqrt(low * high)

    clipped = make_trainer(plugins, tmp_path / "clipped", *one_step, f"train.grad_clip={clip!r}")
    clipped.train()
    got = first_moment_norms(clipped)
    for name, norm in raw.items():
        # Above the cap: scaled to exactly the cap. Below it: untouched, whatever the other groups do.
        want = clip if norm > clip else norm
        assert got[name] == pytest.approx(want, rel=1e-5), (name, norm, clip)
    # A clip of the joint norm would have scaled every group, the small ones included.
    assert any(norm < clip for norm in raw.values()) and any(norm > clip for norm in raw.values())


# -- non-finite loss or gradient -----------------------------------------------------------
def owner_of(model: torch.nn.Module, parameter: torch.nn.Parameter) -> torch.nn.Module:
    return next(m for m in model.modules() if any(p is parameter for p in m.parameters(recurse=False)))


def assert_failed_and_kept_step_2(out: Path, trainer: Trainer, error: TrainingError, group: str) -> None:
    assert "step 3" in str(error) and group in str(error), str(error)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "step 3" in summary["error"]
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 2
    weights = load_file(str(out / "checkpoints" / latest["path"] / "weights.safetensors"))
    assert weights and all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert trainer.state.step == 2, "the failing step is not counted"
    assert "the state of the last good checkpoint, step 2" in str(error), str(error)
    # The bad update was not applied: the weights in memory are still those of step 2, and so are
    # the optimizer's state and the counters (the whole state a resume would continue from).
    for key, value in trainer.s.modules()["model"].state_dict().items():
        assert torch.equal(value, weights[f"model.{key}"]), key
    assert trainer.optimizer.state and all(int(st["step"]) == 2 for st in trainer.optimizer.state.values())
    saved = json.loads((out / "checkpoints" / latest["path"] / "state.json").read_text())["trainer"]
    assert trainer.state.images == 2 * trainer.cfg.batch_size and trainer.state.recent == saved["recent"]
    assert trainer.state.train_seconds == saved["train_seconds"] and trainer.state.images == saved["images"]


def test_a_nan_gradient_stops_training_naming_the_step_and_group(plugins: Plugins, tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = make_trainer(plugins, out, "train.steps=5", "train.checkpoint_every=1")
    parameter = trainer.groups["level1"][0]
    calls = []

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return grad * float("nan") if len(calls) == 3 else grad

    parameter.register_hook(poison)  # the loss stays finite; one gradient of level 1 does not
    with pytest.raises(TrainingError) as caught:
        trainer.train()
    assert len(calls) == 3
    assert_failed_and_kept_step_2(out, trainer, caught.value, "level1")


def test_a_finite_gradient_too_large_for_a_float32_norm_is_clipped_and_training_goes_on(
    plugins: Plugins, tmp_path: Path,
) -> None:
    # A gradient of 1e25 is finite in float32, its square is not: a float32 norm reads inf and
    # stopped the run as "a gradient became NaN or Inf" (the mixture couplings' case,
    # tests/plugins/couplings/test_mixlogistic_gradient_growth.py). It is a step to clip.
    out = tmp_path / "run"
    trainer = make_trainer(plugins, out, "train.steps=4", "train.grad_clip=50.0", "train.optimizer=adam",
                           "train.weight_decay=0.0", "train.checkpoint_every=1")
    parameter = trainer.groups["level1"][0]
    calls = []
    parameter.register_hook(lambda grad: (calls.append(1), grad * 1e25 if len(calls) == 3 else grad)[1])
    trainer.train()
    assert trainer.state.step == 4 and len(calls) == 4
    assert all(torch.isfinite(p).all() for p in trainer.s.model.parameters())


def test_a_nan_loss_stops_training_naming_the_step_and_term(plugins: Plugins, tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = make_trainer(plugins, out, "train.steps=5", "train.checkpoint_every=1")
    module = owner_of(trainer.s.model, trainer.groups["level2"][0])
    calls = []

    def poison(_module: torch.nn.Module, _inputs: tuple, output):  # noqa: ANN001, ANN202
        if not torch.is_grad_enabled():  # initialisation and evaluation
            return output
        calls.append(1)
        if len(calls) != 3:
            return output
        if isinstance(output, tuple):
            return (output[0] * float("nan"), *output[1:])
        return output * float("nan")

    module.register_forward_hook(poison)  # a layer of level 2 outputs NaN at the third training step
    with pytest.raises(TrainingError) as caught:
        trainer.train()
    assert_failed_and_kept_step_2(out, trainer, caught.value, "level2")
    assert "base" not in str(caught.value) and "level1" not in str(caught.value)


def test_a_last_checkpoint_that_cannot_be_loaded_back_is_said_not_suppressed(
    plugins: Plugins, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    trainer = make_trainer(plugins, out, "train.steps=5", "train.checkpoint_every=1")
    parameter = trainer.groups["level1"][0]
    calls = []
    parameter.register_hook(lambda grad: (calls.append(1), grad * float("nan") if len(calls) == 2 else grad)[1])

    def damaged(path: Path, *args: object) -> None:
        raise CheckpointError(f"{path}/weights.safetensors is damaged: truncated.")

    monkeypatch.setattr("flowkit.runs.trainer.load_checkpoint", damaged)
    with pytest.raises(TrainingError) as caught:
        trainer.train()
    message = str(caught.value)
    assert "step 2" in message and "could not be loaded back" in message, message
    assert "weights.safetensors is damaged: truncated" in message and "state in memory is that after the bad step" in message
    assert json.loads((out / "summary.json").read_text())["error"] == message
