"""The metrics sink (metrics.jsonl, TensorBoard), the [log] section, and report.md with its plots,
on one smoke run with TensorBoard on, a training record every step, an evaluation and a
checkpoint at step 2."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flowkit.cli import _add_commands, cli
from flowkit.errors import FlowkitError, RecipeError
from flowkit.plugins import Plugins
from flowkit.recipes.load import load_recipe, validate_recipe
from flowkit.runs.metrics import MetricsSink, require_tensorboard, scalar_tags
from flowkit.runs.report import NO_MATPLOTLIB, per_level_curves, read_metrics

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "wavelet_flow_affine.toml"
_add_commands()


def flowkit(*args: str):  # noqa: ANN201 - click Result
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def events(folder: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("observed") / "run"
    result = flowkit("run", str(RECIPE), "--preset", "smoke", "--out", str(out), "--set", "log.tensorboard=true",
                     "--set", "train.log_every=1", "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2",
                     "--set", "train.threads=1")
    assert result.exit_code == 0, result.output
    return out


# -- the sink -----------------------------------------------------------------------------------
def test_scalar_tags_group_train_and_test_keys_and_skip_what_is_not_a_number() -> None:
    record = {"step": 4, "train_bpd": 3.5, "lr": 1e-3, "images_per_s": 90.0, "images": 64, "eval_images": 32,
              "test_bpd/level1": 2.5, "test_bpd_share/level2": 0.7, "final": True, "nonfinite": "bpd", "other": 1}
    assert scalar_tags(record) == {
        "train/bpd": 3.5, "train/lr": 1e-3, "train/images_per_s": 90.0, "train/images": 64.0, "test/images": 32.0,
        "test/bpd/level1": 2.5, "test/bpd_share/level2": 0.7, "other": 1.0}


def test_the_sink_writes_jsonl_always_and_tensorboard_once_opened(tmp_path: Path) -> None:
    sink = MetricsSink(tmp_path / "metrics.jsonl")
    sink.record({"step": 1, "train_bpd": 4.0})
    sink.image("samples/T1", np.zeros((6, 6, 1), np.uint8), 1)  # nowhere to go yet: no error
    sink.open_tensorboard(tmp_path / "tb")
    sink.record({"step": 2, "train_bpd": 3.0, "lr": 0.5})
    sink.record({"step": 3, "error": "the loss became nan at step 3 in level1."})
    sink.image("samples/T1", np.full((6, 8, 3), 200, np.uint8), 3)
    sink.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    tb = events(tmp_path / "tb")
    assert [(e.step, e.value) for e in tb.Scalars("train/bpd")] == [(2, 3.0)]
    assert [(e.step, e.value) for e in tb.Scalars("train/lr")] == [(2, 0.5)]
    image = tb.Images("samples/T1")[0]
    assert (image.step, image.width, image.height) == (3, 8, 6)
    text = tb.Tensors("error/text_summary")[0]
    assert text.step == 3 and b"the loss became nan" in text.tensor_proto.string_val[0]


def test_missing_tensorboard_is_named_with_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # an import of it now fails
    with pytest.raises(FlowkitError, match=r"pip install 'flowkit\[tensorboard\]'"):
        require_tensorboard()


def test_a_run_asking_for_missing_tensorboard_stops_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(RECIPE), "--preset", "smoke", "--out", str(out),
                                      "--set", "log.tensorboard=true"])
    assert result.exit_code == 2
    assert "log.tensorboard = true needs the tensorboard package" in result.output
    assert "flowkit[tensorboard]" in result.output and "Traceback" not in result.output
    assert not out.exists()


# -- the [log] section --------------------------------------------------------------------------
def test_the_log_section_is_validated_and_written_to_the_resolved_recipe(plugins: Plugins, tmp_path: Path) -> None:
    recipe = load_recipe(RECIPE, plugins.registries, preset="smoke", overrides=["log.tensorboard=true"])
    assert recipe.log.tensorboard is True
    assert load_recipe(RECIPE, plugins.registries).log.tensorboard is False
    resolved = tmp_path / "recipe.toml"
    resolved.write_text(recipe.to_toml())
    assert "[log]\ntensorboard = true" in resolved.read_text()
    assert load_recipe(resolved, plugins.registries).log == recipe.log
    with pytest.raises(RecipeError, match=r'log.tensorbord is not a parameter.*Did you mean "tensorboard"'):
        load_recipe(RECIPE, plugins.registries, overrides=["log.tensorbord=true"])
    with pytest.raises(RecipeError, match="log.tensorboard"):
        load_recipe(RECIPE, plugins.registries, overrides=["log.tensorboard=1"])
    with pytest.raises(RecipeError, match=r"\[log\] should be a table"):
        validate_recipe(plugins.registries, {**recipe.to_dict(), "log": 3}, "x.toml")


# -- one run, observed -------------------------------------------------------------------------
def test_tensorboard_holds_the_metrics_jsonl_scalars_and_the_sample_grids(run_dir: Path) -> None:
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if "train_bpd" in r]
    periodic = [r for r in records if "eval_images" in r]
    final = [r for r in records if r.get("final")]
    assert [r["step"] for r in train] == [1, 2, 3] and [r["step"] for r in periodic] == [2] and len(final) == 1
    tb = events(run_dir / "tb")
    for tag, key, rows in [("train/bpd", "train_bpd", train), ("train/lr", "lr", train),
                           ("train/images_per_s", "images_per_s", train),
                           ("test/bpd", "test_bpd", periodic + final),
                           ("test/bpd/level1", "test_bpd/level1", periodic + final)]:
        got = [(e.step, e.value) for e in tb.Scalars(tag)]
        assert got == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows], tag
    assert set(tb.Tags()["scalars"]) >= {"test/bpd/base", "test/bpd/level2"}
    for temperature in ("T1", "T0.7"):
        (image,) = tb.Images(f"samples/{temperature}")
        grid = np.load(run_dir / "samples" / f"samples-{temperature}.npy")
        assert image.step == 3 and (image.width, image.height) == (2 * 28 + 3 * 2, 2 * 28 + 3 * 2)
        assert grid.shape == (4, 28, 28, 1)


def test_a_resumed_run_has_one_tensorboard_point_per_step(run_dir: Path, tmp_path: Path) -> None:
    """As if killed after step 3 was logged but before its checkpoint: the events the killed
    process wrote after step 2 are hidden, and the resumed run's replace them."""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("recipe.toml", "metrics.jsonl"):
        shutil.copy(run_dir / name, resumed / name)
    shutil.copytree(run_dir / "tb", resumed / "tb")
    shutil.copytree(run_dir / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    (resumed / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "path": "step-00000002"}))
    assert flowkit("run", "--resume", str(resumed)).exit_code == 0
    original, again = events(run_dir / "tb"), events(resumed / "tb")
    for tag in ("train/bpd", "test/bpd", "test/bpd/level2"):
        want = [(e.step, e.value) for e in original.Scalars(tag)]
        assert [(e.step, e.value) for e in again.Scalars(tag)] == want, tag
    assert [e.step for e in again.Images("samples/T1")] == [3]


def test_the_run_writes_report_md_with_its_plots(run_dir: Path) -> None:
    report = (run_dir / "report.md").read_text()
    for name in ("bpd.png", "per_level_bpd.png", "samples.png"):
        assert f"(plots/{name})" in report
        with Image.open(run_dir / "plots" / name) as image:
            assert image.width > 300 and image.height > 200
    assert "| test bits/dim of level1 (over its own dims) |" in report
    assert "![samples/samples-T1.png](samples/samples-T1.png)" in report


def test_flowkit_report_regenerates_the_same_report(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    written = (copy / "report.md").read_text()
    (copy / "report.md").unlink()
    shutil.rmtree(copy / "plots")
    result = flowkit("report", str(copy))
    assert result.exit_code == 0, result.output
    assert (copy / "report.md").read_text() == written
    assert sorted(p.name for p in (copy / "plots").iterdir()) == ["bpd.png", "per_level_bpd.png", "samples.png"]


def test_report_without_matplotlib_says_so_and_keeps_the_rest(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = flowkit("report", str(copy))
    assert result.exit_code == 0 and "No plots: matplotlib is not installed" in result.output
    report = (copy / "report.md").read_text()
    assert NO_MATPLOTLIB in report and "(plots/" not in report
    assert "| test_bpd |" in report and "![samples/samples-T1.png](samples/samples-T1.png)" in report


def test_report_of_a_run_that_did_not_finish_exits_2(run_dir: Path, tmp_path: Path) -> None:
    failed = tmp_path / "failed"
    failed.mkdir()
    shutil.copy(run_dir / "recipe.toml", failed / "recipe.toml")
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "error": "the loss became nan."}))
    result = CliRunner().invoke(cli, ["report", str(failed)])
    assert result.exit_code == 2
    assert 'holds no finished run (its summary.json says status "failed": the loss became nan.)' in result.output
    assert not (failed / "report.md").exists()


def test_per_level_curves_only_for_terms_that_are_densities_of_their_own(tmp_path: Path) -> None:
    glow_like = [{"step": 2, "test_bpd": 3.0, "test_bpd_share/level0": 1.2, "test_bpd_share/level1": 1.8}]
    assert per_level_curves(tmp_path / "a.png", glow_like) is None
    wavelet = [{"step": 2, "test_bpd/base": 4.0, "test_bpd/level1": 3.0}]
    assert per_level_curves(tmp_path / "b.png", wavelet) == tmp_path / "b.png"
