"""Level jobs: `flowkit run RECIPE --level i --out DIR` for every level at once, in separate
processes, writing into one run directory that evaluation and sampling then use whole."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import tomllib
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import flowkit.cli
from flowkit.errors import FlowkitError
from flowkit.plugins import Plugins
from flowkit.recipes.load import Recipe, load_recipe
from flowkit.runs import level_jobs
from flowkit.runs import run as run_module
from flowkit.runs.lock import RunInUseError
from flowkit.runs.run import start_run
from flowkit.runs.trained import load_trained
from flowkit.runs.trainer import SilentReporter

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "wavelet_flow_affine.toml"
LEVELS = ["base", "level1", "level2"]  # the smoke preset: model.levels = 2, so three terms


def flowkit_cli(*args: str):  # noqa: ANN201 - click.testing.Result
    flowkit.cli._add_commands()
    return CliRunner().invoke(flowkit.cli.cli, list(args), env={"FLOWKIT_DEBUG": ""})


def job(level: int, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flowkit", "run", str(RECIPE), "--preset", "smoke",
                             "--level", str(level), "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory filled by one job per level, all started at once and running side by side."""
    out = tmp_path_factory.mktemp("level_jobs") / "run"
    jobs = [job(i, out) for i in range(len(LEVELS))]
    results = [(p.wait(timeout=300), *p.communicate()) for p in jobs]
    for rc, stdout, stderr in results:
        assert rc == 0, stdout + stderr
    return out


def test_jobs_started_at_once_each_train_their_level_into_one_directory(trained: Path) -> None:
    assert tomllib.loads((trained / "recipe.toml").read_text())["train"]["level"] == -1
    for name in LEVELS:
        job_dir = trained / "levels" / name
        assert (job_dir / "checkpoints" / "latest.json").is_file()
        summary = json.loads((job_dir / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["trained_part"] == name
        assert f"level = {LEVELS.index(name)}" in (job_dir / "recipe.toml").read_text()
    whole = json.loads((trained / "summary.json").read_text())
    assert whole["status"] == "finished" and whole["level"] == -1
    assert sorted(whole["levels"]) == LEVELS and sorted(whole["test_bpd_per_part"]) == LEVELS
    for name in LEVELS:  # the per-level figures of the whole model are the jobs' own
        assert whole["test_bpd_per_part"][name] == pytest.approx(whole["levels"][name]["test_bpd"], rel=1e-6)
    assert (trained / "report.md").is_file() and whole["samples"]
    assert all((trained / p).is_file() for p in whole["samples"])


def _latest_weights(trained: Path, name: str) -> dict[str, torch.Tensor]:
    latest = json.loads((trained / "levels" / name / "checkpoints" / "latest.json").read_text())
    return load_file(str(trained / "levels" / name / "checkpoints" / latest["path"] / "weights.safetensors"))


def test_loading_the_directory_takes_every_level_from_its_own_jobs_checkpoint(
    trained: Path, plugins: Plugins,
) -> None:
    _, session = load_trained(trained, plugins)
    checkpoints = {name: _latest_weights(trained, name) for name in LEVELS}
    for name in LEVELS:
        prefix = f"flows.{name}."
        loaded = {k[len(prefix):]: v for k, v in session.model.state_dict().items() if k.startswith(prefix)}
        assert loaded
        for key, value in loaded.items():
            torch.testing.assert_close(value, checkpoints[name][f"model.{prefix}{key}"], atol=0, rtol=0)
        # The check can fail: another job's checkpoint holds this level untrained.
        other = checkpoints[LEVELS[(LEVELS.index(name) + 1) % len(LEVELS)]]
        assert any(not torch.equal(value, other[f"model.{prefix}{key}"]) for key, value in loaded.items())


def test_flowkit_sample_uses_the_whole_model_and_reproduces_its_grid(trained: Path) -> None:
    result = flowkit_cli("sample", str(trained), "--n", "4")
    assert result.exit_code == 0, result.output
    # The run's own grid used the same seed and n (the smoke preset's sample.n = 4): the same images.
    for t in ("T1", "T0.7"):
        np.testing.assert_array_equal(np.load(trained / "samples" / f"sample-{t}.npy"),
                                      np.load(trained / "samples" / f"samples-{t}.npy"))


def test_a_directory_missing_a_level_names_it_and_the_command_that_trains_it(
    trained: Path, tmp_path: Path, plugins: Plugins,
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    shutil.rmtree(copy / "levels" / "level2")
    (copy / "levels" / "level1" / "summary.json").unlink()  # as while it trains, or after it was stopped
    with pytest.raises(FlowkitError) as info:
        load_trained(copy, plugins)
    message = str(info.value)
    assert "missing 2 of its 3 levels" in message and "base" not in message.split("levels:")[1]
    train = f"flowkit run {copy / 'recipe.toml'} --level 2 --out {copy}"
    assert f"level2 (not started; train it with `{train}`)" in message
    assert f"flowkit run --resume {copy / 'levels' / 'level1'}" in message
    result = flowkit_cli("sample", str(copy), "--n", "4")
    assert result.exit_code == 2 and "level2 (not started" in result.output


def test_the_missing_level_then_completes_the_directory(
    trained: Path, tmp_path: Path, plugins: Plugins, monkeypatch: pytest.MonkeyPatch,
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    shutil.rmtree(copy / "levels" / "level2")
    (copy / "summary.json").unlink()
    # The level's session is gone when the assembly builds the whole model's: never two in memory.
    level_model: list[weakref.ref] = []
    alive_at_assembly: list[bool] = []
    build = run_module.build_session

    def level_session(*args: object, **kwargs: object) -> object:
        session = build(*args, **kwargs)
        level_model.append(weakref.ref(session.model))
        return session

    def whole_session(*args: object, **kwargs: object) -> object:
        alive_at_assembly.append(level_model[0]() is not None)
        return build(*args, **kwargs)

    monkeypatch.setattr(run_module, "build_session", level_session)
    monkeypatch.setattr(level_jobs, "build_session", whole_session)
    # The shared recipe.toml is itself a recipe that trains the missing level.
    rundir, summary = start_run(copy / "recipe.toml", plugins, SilentReporter(), overrides=("train.level=2",),
                                out=copy)
    assert rundir.path == copy and summary["level"] == -1 and sorted(summary["levels"]) == LEVELS
    assert alive_at_assembly == [False]
    # Seeded and deterministic: the same whole-model figure as the jobs started at once.
    together = json.loads((trained / "summary.json").read_text())
    assert summary["test_bpd"] == pytest.approx(together["test_bpd"])


def test_a_level_trained_again_marks_the_whole_models_figures_as_those_of_old_weights(
    trained: Path, tmp_path: Path, plugins: Plugins, monkeypatch: pytest.MonkeyPatch,
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    before = json.loads((copy / "summary.json").read_text())
    assert before["status"] == "finished" and (copy / "report.md").is_file()
    seen: list[dict] = []
    execute = level_jobs.execute

    def watched(*args: object, **kwargs: object) -> object:  # while the level trains again
        seen.append(json.loads((copy / "summary.json").read_text()))
        assert not (copy / "report.md").exists() and (copy / "report.previous.md").is_file()
        return execute(*args, **kwargs)

    monkeypatch.setattr(level_jobs, "execute", watched)
    _, summary = start_run(copy / "recipe.toml", plugins, SilentReporter(),
                           overrides=("train.level=1",), out=copy, overwrite=True)
    assert seen == [{"status": "retraining", "retraining": ["level1"], "previous": before}]
    # The job that finished last assembled the new weights: a finished summary and report again.
    after = json.loads((copy / "summary.json").read_text())
    assert after["status"] == "finished" and summary["level"] == -1 and (copy / "report.md").is_file()
    assert not (copy / "report.previous.md").exists()
    # Seeded and deterministic: the level trained again has the same weights, so the same figure.
    assert after["test_bpd"] == pytest.approx(before["test_bpd"])


def test_a_second_job_for_a_level_that_is_training_is_refused(tmp_path: Path, plugins: Plugins) -> None:
    out = tmp_path / "run"
    first = job(0, out, "--set", "train.steps=100000")
    try:
        deadline = time.monotonic() + 120
        while not (out / "levels" / "base" / "recipe.toml").is_file():  # written once it holds the lock
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first job did not start"
            time.sleep(0.2)
        with pytest.raises(RunInUseError, match=f"levels/base is in use by process {first.pid}"):
            start_run(RECIPE, plugins, SilentReporter(), preset="smoke", out=out,
                      overrides=("train.steps=100000", "train.level=0"))
    finally:
        first.terminate()
        first.wait(timeout=120)


def _recipe(plugins: Plugins, level: int, *overrides: str) -> Recipe:
    return load_recipe(RECIPE, plugins.registries, preset="smoke",
                       overrides=(f"train.level={level}", *overrides))


def test_a_job_whose_recipe_differs_beyond_the_level_is_refused_naming_the_keys(
    tmp_path: Path, plugins: Plugins,
) -> None:
    out = tmp_path / "run"
    level_jobs.join(out, _recipe(plugins, 0))
    level_jobs.join(out, _recipe(plugins, 1))  # only the level differs: joins
    with pytest.raises(FlowkitError, match=r"differs from this job's recipe in: model\.hidden, train\.lr\."):
        level_jobs.join(out, _recipe(plugins, 2, "train.lr=1e-3", "model.hidden=[16]"))
    shared = load_recipe(out / "recipe.toml", plugins.registries)
    assert shared.train.level == -1 and shared.train.lr == _recipe(plugins, 0).train.lr


def test_jobs_joining_in_the_same_instant_agree_on_one_recipe(tmp_path: Path, plugins: Plugins) -> None:
    out = tmp_path / "run"
    recipes = [_recipe(plugins, i % 3, f"train.lr={1e-3 if i % 2 else 2e-3}") for i in range(8)]
    barrier, errors = threading.Barrier(len(recipes)), [None] * len(recipes)

    def joiner(i: int) -> None:
        barrier.wait()
        try:
            level_jobs.join(out, recipes[i])
        except FlowkitError as exc:
            errors[i] = exc

    threads = [threading.Thread(target=joiner, args=(i,)) for i in range(len(recipes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = load_recipe(out / "recipe.toml", plugins.registries).train.lr
    # Exactly the jobs with the recipe that was written first joined; the others were refused.
    assert [e is None for e in errors] == [r.train.lr == winner for r in recipes]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], "no temporary file is left behind"


def test_a_file_system_without_hard_links_is_named_with_the_cause(
    tmp_path: Path, plugins: Plugins, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_hard_links(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    out = tmp_path / "run"
    with pytest.raises(FlowkitError, match=rf"recipe.toml in {out}: hard-linking .*\(Operation not permitted\)"):
        level_jobs.join(out, _recipe(plugins, 0))
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], "no temporary file is left behind"


def test_a_folder_holding_a_single_run_is_not_joined(tmp_path: Path, plugins: Plugins) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.toml").write_text("# a single run\n")
    with pytest.raises(FlowkitError, match="holds something other than level jobs"):
        level_jobs.join(out, _recipe(plugins, 0))
    assert not (out / "levels").exists()


def test_resume_of_the_shared_directory_points_at_its_levels(trained: Path, plugins: Plugins) -> None:
    with pytest.raises(FlowkitError, match="holds level jobs: resume one level's job"):
        start_run(None, plugins, SilentReporter(), resume=trained)
