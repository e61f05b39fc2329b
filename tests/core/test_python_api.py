"""The Python API on a finished smoke run: `flowkit.train` runs a recipe and `flowkit.load_run`
loads it back, reproducing the run's own figures and sample grids."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import flowkit
from flowkit.api import override_strings
from flowkit.contracts.model import DensityModel
from flowkit.runs.rundir import RunDir
from flowkit.runs.trained import TrainedRun

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "wavelet_flow_affine.toml"
N_BITS = 5  # fewer than 8 bits, so that data levels and 0..255 pixels differ


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("api") / "run"
    return flowkit.train(RECIPE, preset="smoke", out=out,
                         overrides={"train.threads": 1, "data": {"n_bits": N_BITS}, "sample.temperatures": [1.0, 0.5]})


@pytest.fixture(scope="module")
def run(summary: dict[str, Any]) -> TrainedRun:
    return flowkit.load_run(summary["run_dir"], device="cpu")


def test_train_returns_the_summary_it_wrote_and_records_the_overrides(summary: dict[str, Any]) -> None:
    run_dir = Path(summary["run_dir"])
    written = json.loads((run_dir / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if k != "run_dir"} == written
    assert written["status"] == "finished" and written["n_bits"] == N_BITS and written["steps"] == 3
    header = (run_dir / "recipe.toml").read_text().splitlines()[0]
    assert "--set train.threads=1 data.n_bits=5 sample.temperatures=[1.0, 0.5]" in header


def test_load_run_puts_model_and_dequantizer_on_the_device_in_eval_mode(run: TrainedRun) -> None:
    assert run.device == torch.device("cpu") and run.n_bits == N_BITS and run.shape == (1, 28, 28)
    assert all(p.device.type == "cpu" for p in run.model.parameters())
    assert not run.model.training and not run.dequantizer.training
    assert run.test_x.dtype == torch.uint8 and int(run.test_x.max()) <= 2**N_BITS - 1


def test_bpd_with_the_default_seed_is_the_runs_test_figure(run: TrainedRun, summary: dict[str, Any]) -> None:
    bpd = run.bpd(run.test_x)
    assert bpd.shape == (len(run.test_x),) and bpd.dtype == torch.float64
    assert float(bpd.mean()) == pytest.approx(summary["test_bpd"], abs=1e-9)
    # Another seed is another draw of the dequantization noise: close, not equal.
    other = run.bpd(run.test_x, seed=99)
    assert not torch.equal(other, bpd) and float((other - bpd).abs().max()) < 0.05


def test_log_prob_is_the_same_bound_in_nats_per_image(run: TrainedRun) -> None:
    x = run.test_x[:5]
    dims = 28 * 28
    torch.testing.assert_close(run.log_prob(x), -run.bpd(x) * dims * math.log(2.0), atol=1e-9, rtol=0)
    # A lower bound on the log-probability of a discrete image, so below 0.
    assert torch.isfinite(run.log_prob(x)).all() and (run.log_prob(x) < 0).all()


def test_sample_with_the_default_seed_is_the_runs_own_grid(run: TrainedRun, summary: dict[str, Any]) -> None:
    images, overflowed = run.sample(4, temperature=0.5)
    assert images.shape == (4, 1, 28, 28) and images.dtype == torch.uint8
    assert int(images.max()) <= 2**N_BITS - 1
    grid = np.load(Path(summary["run_dir"]) / "samples" / "samples-T0.5.npy")  # NHWC, shown on 0..255
    shown = torch.round(images.float() * (255.0 / (2**N_BITS - 1))).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(shown, grid)
    assert overflowed == summary["samples_overflowed"]["T0.5"]
    assert not torch.equal(run.sample(4, temperature=0.5, seed=7).images, images)


def test_superres_gives_the_model_exactly_the_low_resolution_image(run: TrainedRun,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    x_low = run.downsample(run.test_x[:3], 1)
    assert x_low.shape == (3, 1, 14, 14) and x_low.dtype == torch.uint8
    seen = {}
    original = run.model.superres

    def spy(low: torch.Tensor, from_level: int, temperature: float = 1.0) -> torch.Tensor:
        seen["image"] = run.model.low_to_image(low, from_level)
        return original(low, from_level, temperature)

    monkeypatch.setattr(run.model, "superres", spy)
    high, overflowed = run.superres(x_low, 1, temperature=0.8)
    assert high.shape == (3, 1, 28, 28) and high.dtype == torch.uint8 and overflowed >= 0
    # Haar: the low-pass image the model conditions on is x_low itself (at the centre of each level).
    torch.testing.assert_close(seen["image"], (x_low.float() + 0.5) / 2**N_BITS, atol=1e-6, rtol=0)


def test_superres_from_the_full_resolution_returns_the_images(run: TrainedRun) -> None:
    x = run.test_x[:2]
    result = run.superres(x, run.model.levels)
    assert torch.equal(result.images, x) and result.overflowed == 0


def test_superres_needs_the_capability(run: TrainedRun) -> None:
    plain = TrainedRun(RunDir(run.path), dataclasses.replace(run.session, model=DensityModel()))
    with pytest.raises(flowkit.FlowkitError, match="cannot super-resolve"):
        plain.superres(run.test_x[:1], 0)


@pytest.mark.parametrize(("make", "message"), [
    (lambda x: x.float(), "must be uint8 data levels 0..31, got dtype torch.float32"),
    (lambda x: x[0], r"must have shape \(B, 1, 28, 28\), got \(1, 28, 28\); for one image use x\[None\]"),
    (lambda x: torch.full_like(x, 40), "holds the value 40, but this run models n_bits = 5"),
])
def test_bad_images_are_refused_naming_what_is_expected(run: TrainedRun, make: Any, message: str) -> None:
    with pytest.raises(flowkit.FlowkitError, match=message):
        run.bpd(make(run.test_x[:2]))


def test_a_level_out_of_range_is_refused(run: TrainedRun) -> None:
    with pytest.raises(flowkit.FlowkitError, match=r"level = 3 is out of range; this model has levels 0..2"):
        run.downsample(run.test_x[:1], 3)


def test_loading_leaves_the_callers_random_state_and_threads_alone(summary: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    state = torch.get_rng_state()
    flowkit.load_run(summary["run_dir"])
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == 1


def test_dict_overrides_become_set_strings() -> None:
    assert override_strings({"train.lr": 3e-4, "model.step.coupling": {"use": "additive"},
                             "sample.temperatures": [1.0, 0.7], "log.tensorboard": True}) == (
        "train.lr=0.0003", 'model.step.coupling.use="additive"', "sample.temperatures=[1.0, 0.7]",
        "log.tensorboard=true")
    assert override_strings(["train.lr=3e-4"]) == ("train.lr=3e-4",)
    with pytest.raises(flowkit.RecipeError, match="train.lr = None is not a value a recipe can hold"):
        override_strings({"train.lr": None})


def test_a_bad_override_raises_the_recipe_error_the_cli_prints(tmp_path: Path) -> None:
    with pytest.raises(flowkit.RecipeError, match='Did you mean "levels"'):
        flowkit.train(RECIPE, preset="smoke", overrides={"model.levles": 2}, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_docs_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    text = (ROOT / "docs" / "python-api.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 2 and "flowkit.train(" in blocks[0] and "flowkit.load_run(" in blocks[1]
    monkeypatch.chdir(tmp_path)  # the example writes runs/api-demo
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(block.replace('"recipes/', f'"{ROOT}/recipes/'), namespace)  # noqa: S102 - our own docs
    assert (tmp_path / "runs" / "api-demo" / "summary.json").is_file()
    assert namespace["high"].shape == (8, 1, 28, 28) and namespace["x_low"].shape == (8, 1, 14, 14)
    printed = capsys.readouterr().out
    assert "TrainedRun('runs/api-demo', model='wavelet_flow', shape=(1, 28, 28), n_bits=8, device='cpu')" in printed
