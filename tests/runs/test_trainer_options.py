"""The trainer options the paper presets need: gradient accumulation, one global clipping norm,
exponential decay, weight averaging (EMA) for evaluation, shift augmentation, and the
importance-weighted estimate from the recipe (eval.iw_samples)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flowkit.plugins import Plugins
from flowkit.recipes.load import load_recipe
from flowkit.runs.checkpoint import latest_checkpoint, load_weights
from flowkit.runs.ema import WeightAverage
from flowkit.runs.run import start_run
from flowkit.runs.rundir import RunDir
from flowkit.runs.session import build_session
from flowkit.runs.trainer import SilentReporter, Trainer, random_shift

ROOT = Path(__file__).resolve().parents[2]
GLOW = ROOT / "recipes" / "glow.toml"


def make_trainer(plugins: Plugins, out: Path, *overrides: str) -> Trainer:
    """Glow's smoke preset on the CPU (no dropout, uniform dequantization), one thread."""
    recipe = load_recipe(GLOW, plugins.registries, preset="smoke",
                         overrides=["train.device=cpu", "train.threads=1", *overrides])
    return Trainer(build_session(recipe, plugins), RunDir.create(recipe.meta.name, out=out))


def gradients(trainer: Trainer, x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    trainer.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    trainer.backward(x)
    return {n: p.grad.clone() for n, p in trainer.s.model.named_parameters() if p.grad is not None}


def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch(plugins: Plugins, tmp_path: Path) -> None:
    whole = make_trainer(plugins, tmp_path / "whole", "train.batch_size=8")
    split = make_trainer(plugins, tmp_path / "split", "train.batch_size=8", "train.accumulate=4")
    whole.initialize()
    split.s.model.load_state_dict(whole.s.model.state_dict())  # initialised: split keeps these values
    x = whole.s.train_x[:8]
    # The dequantization noise of 4 micro-batches of 2 is the same stream as of one batch of 8.
    a, b = gradients(whole, x, seed=5), gradients(split, x, seed=5)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_accumulate_must_divide_the_batch(plugins: Plugins) -> None:
    from flowkit.errors import RecipeError

    with pytest.raises(RecipeError, match="accumulate = 3 must be >= 1 and divide batch_size = 8"):
        load_recipe(GLOW, plugins.registries, preset="smoke", overrides=["train.batch_size=8", "train.accumulate=3"])


def test_global_clipping_scales_every_group_by_one_factor(plugins: Plugins, tmp_path: Path) -> None:
    trainer = make_trainer(plugins, tmp_path / "t", "train.grad_clip=1e-3", "train.grad_clip_scope=global")
    x = trainer.s.train_x[:8]
    trainer.initialize()
    raw = gradients(trainer, x, seed=1)
    total = math.sqrt(sum(float(g.square().sum()) for g in raw.values()))
    assert total > 1e-3
    norms = trainer.clip()
    assert len(norms) == 1 and float(norms[0]) == pytest.approx(total, rel=1e-5)
    for name, p in trainer.s.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, raw[name] * (1e-3 / total), rtol=1e-4, atol=1e-12, msg=name)


def test_exponential_decay_multiplies_each_step_after_the_warm_up(plugins: Plugins, tmp_path: Path) -> None:
    trainer = make_trainer(plugins, tmp_path / "t", "train.lr=1e-2", "train.warmup_steps=4", "train.decay=exponential",
                           "train.decay_rate=0.5")
    assert [trainer.lr_at(s, 0.0) for s in range(3)] == pytest.approx([2.5e-3, 5e-3, 7.5e-3])
    assert [trainer.lr_at(s, 0.0) for s in (3, 4, 5, 7)] == pytest.approx([1e-2, 5e-3, 2.5e-3, 6.25e-4])


def test_weight_average_follows_the_ema_formula_and_swaps_back() -> None:
    model = torch.nn.Linear(2, 1)
    average = WeightAverage({"model": model}, 0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update()
    expected = 0.9 * start + 0.1 * (start + 1.0)
    torch.testing.assert_close(average.get_buffer("model__weight"), expected)
    trained = model.weight.detach().clone()
    with average.swapped_in():
        torch.testing.assert_close(model.weight.detach(), expected)
    torch.testing.assert_close(model.weight.detach(), trained)


def test_a_run_with_ema_evaluates_and_samples_the_average_and_checkpoints_it(plugins: Plugins, tmp_path: Path) -> None:
    out = tmp_path / "run"
    rundir, summary = start_run(GLOW, plugins, SilentReporter(), preset="smoke", out=out,
                                overrides=("train.device=cpu", "train.threads=1", "train.ema=0.5", "train.steps=3"))
    assert summary["weights"] == "exponential moving average, decay 0.5"
    recipe = load_recipe(rundir.recipe_path, plugins.registries)
    session = build_session(recipe, plugins)
    load_weights(latest_checkpoint(rundir.checkpoints), session.modules(), "cpu")
    assert session.average is not None
    trained = {k: v.clone() for k, v in session.model.state_dict().items()}
    session.average.copy_to_weights()
    averaged = session.model.state_dict()
    assert any(not torch.equal(trained[k], averaged[k]) for k in trained), "the average equals the weights"
    # The summary's test bits/dim is that of the averaged weights (same noise seed as the run).
    from flowkit.runs.evaluate import evaluate

    result = evaluate(session, session.test_x, batch_size=recipe.train.eval_batch_size, seed=recipe.train.seed + 1)
    assert result["bpd"] == pytest.approx(summary["test_bpd"], rel=1e-6)


def test_eval_iw_samples_reports_the_importance_weighted_estimate(plugins: Plugins, tmp_path: Path) -> None:
    _, summary = start_run(GLOW, plugins, SilentReporter(), preset="smoke", out=tmp_path / "run",
                           overrides=("train.device=cpu", "train.threads=1", "eval.iw_samples=3", "eval.iw_images=8"))
    assert summary["iw_samples"] == 3 and summary["iw_images"] == 8
    # With uniform dequantization log q = 0 and the estimate is at least as tight as one sample;
    # it is over 8 images, the bound over all, so only finiteness and range are comparable here.
    assert math.isfinite(summary["test_bpd_iw"]) and 0 < summary["test_bpd_iw"] < 16
    recorded = (tmp_path / "run" / "recipe.toml").read_text()
    assert "iw_samples = 3" in recorded


def test_random_shift_moves_whole_pixels_by_bilinear_interpolation_and_floors() -> None:
    torch.manual_seed(0)
    x = (torch.arange(100, dtype=torch.float32).view(1, 1, 10, 10) * 2).to(torch.uint8).repeat(64, 1, 1, 1)
    assert torch.equal(random_shift(x, 0.0), x)
    moved = random_shift(x, 0.1)
    assert moved.dtype == torch.uint8 and moved.shape == x.shape
    assert (moved != x).any(dim=(1, 2, 3)).float().mean() > 0.9, "almost every image moves"
    # A shift of at most one pixel (10% of 10) in each direction: every output pixel lies between
    # the smallest and largest input pixel of its 3x3 neighbourhood (edges repeated).
    padded = torch.nn.functional.pad(x.float(), (1, 1, 1, 1), mode="replicate")
    low = -torch.nn.functional.max_pool2d(-padded, 3, stride=1)
    high = torch.nn.functional.max_pool2d(padded, 3, stride=1)
    assert (moved.float() >= low.floor()).all() and (moved.float() <= high).all()
    save = torch.get_rng_state()
    again = random_shift(x, 0.1)
    torch.set_rng_state(save)
    assert torch.equal(random_shift(x, 0.1), again), "the shifts come from the global RNG (checkpointed)"


def test_shift_augment_trains(plugins: Plugins, tmp_path: Path) -> None:
    _, summary = start_run(GLOW, plugins, SilentReporter(), preset="smoke", out=tmp_path / "run",
                           overrides=("train.device=cpu", "train.threads=1", "train.shift_augment=0.1"))
    assert summary["steps"] == 4 and math.isfinite(summary["test_bpd"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "finished"
