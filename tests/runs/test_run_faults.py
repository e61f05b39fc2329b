"""Runs that survive faults, in process: a damaged latest checkpoint, a run stopped before its
first checkpoint, and SIGINT/SIGTERM during training (the handler's flag, the checkpoint, the
exit status, an exact resume). tests/runs/test_run_signals.py does the same with real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from flowkit.cli import _add_commands, cli
from flowkit.plugins import Plugins
from flowkit.recipes.load import load_recipe
from flowkit.runs.checkpoint import latest_checkpoint
from flowkit.runs.rundir import RunDir
from flowkit.runs.session import build_session
from flowkit.runs.signals import RunInterrupted
from flowkit.runs.trainer import SilentReporter, Trainer

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "wavelet_flow_affine.toml"
SMOKE = ("--preset", "smoke", "--set", "train.level_threads=1", "--set", "train.threads=1", "--set", "train.log_every=1")
_add_commands()


def flowkit(*args: str):  # noqa: ANN201 - click Result
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def weights(run: Path) -> dict[str, torch.Tensor]:
    # Copies: load_file maps the file, so damaging it later would change tensors read before.
    return {k: v.clone() for k, v in load_file(str(latest_checkpoint(run / "checkpoints") / "weights.safetensors")).items()}


def said(result) -> str:  # noqa: ANN001 - click Result
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def metric_steps(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train_bpd" in r]


# -- a damaged latest checkpoint ---------------------------------------------------------


def test_a_truncated_latest_checkpoint_is_named_and_the_run_resumes_from_the_one_before(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # Checkpoints of steps 3 and 4: step 4 is the final one, not a periodic one.
    result = flowkit("run", str(RECIPE), *SMOKE, "--set", "train.steps=4", "--set", "train.checkpoint_every=3",
                     "--out", str(run))
    assert result.exit_code == 0, result.output
    finished = weights(run)
    damaged = run / "checkpoints" / "step-00000004" / "weights.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-100])

    offer = f"flowkit run --resume {run} --from-checkpoint step-00000003"
    for command in (["sample", str(run), "--n", "2"], ["superres", str(run), "--from-level", "1", "--images", "1"],
                    ["run", "--resume", str(run)]):
        result = flowkit(*command)
        assert result.exit_code == 2, (command, result.output)
        assert f"{damaged} is damaged" in said(result) and offer in said(result), (command, result.output)

    result = flowkit("run", "--resume", str(run), "--from-checkpoint", "step-00000003")
    assert result.exit_code == 0, result.output
    # The same trajectory from the step-3 checkpoint, and a new final checkpoint beside the damaged one's name.
    assert_same_weights(weights(run), finished)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000003", "step-00000004-1"]
    assert flowkit("sample", str(run), "--n", "2").exit_code == 0


def test_from_checkpoint_needs_resume_and_a_kept_checkpoint(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["run", str(RECIPE), "--from-checkpoint", "step-2"])
    assert result.exit_code == 2 and "give --resume too" in said(result)
    run = tmp_path / "run"
    assert flowkit("run", str(RECIPE), *SMOKE, "--out", str(run)).exit_code == 0
    result = flowkit("run", "--resume", str(run), "--from-checkpoint", "step-1")
    assert result.exit_code == 2 and "has no checkpoint 'step-1'" in said(result)
    assert "the checkpoints kept are: step-00000003" in said(result)


# -- stopped before the first checkpoint ---------------------------------------------------


def test_resuming_a_run_without_a_checkpoint_starts_it_from_the_beginning(tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert flowkit("run", str(RECIPE), *SMOKE, "--set", "train.steps=4", "--out", str(straight)).exit_code == 0
    # What a run killed during step 3, before any checkpoint, leaves: its recipe and two metrics lines.
    killed.mkdir()
    shutil.copy(straight / "recipe.toml", killed / "recipe.toml")
    lines = (straight / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])  # the last one cut short

    result = flowkit("run", "--resume", str(killed))
    assert result.exit_code == 0, result.output
    assert "has no checkpoint yet: starting it from the beginning" in said(result)
    assert_same_weights(weights(killed), weights(straight))
    assert metric_steps(killed) == metric_steps(straight) == [1, 2, 3, 4]
    assert json.loads((killed / "summary.json").read_text())["status"] == "finished"


# -- SIGINT and SIGTERM, delivered in this process -----------------------------------------


class SignalAfter(SilentReporter):
    """Sends this process ``signals`` once step ``at`` is done; Python runs the handler then."""

    def __init__(self, at: int, *signals: int) -> None:
        self.at, self.signals = at, signals

    def step(self, step: int, metrics: dict[str, float]) -> None:
        if step == self.at:
            for signum in self.signals:
                os.kill(os.getpid(), signum)


@pytest.fixture
def outer_handlers() -> Iterator[list[int]]:
    """Handlers of this test's own for SIGINT and SIGTERM: a signal that reaches one escaped the
    trainer's; the trainer must also put them back when it is done."""
    leaked: list[int] = []
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def outer(signum: int, _frame: object) -> None:
        leaked.append(signum)

    for signum in before:
        signal.signal(signum, outer)
    try:
        yield leaked
        for signum in before:
            assert signal.getsignal(signum) is outer, "the trainer put back the handlers it found"
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def make_trainer(plugins: Plugins, out: Path, reporter: SilentReporter | None = None, *,
                 resume: bool = False) -> Trainer:
    recipe = load_recipe(RECIPE, plugins.registries, preset="smoke",
                         overrides=["train.steps=4", "train.level_threads=1", "train.threads=1", "train.log_every=1"])
    rundir = RunDir(out) if resume else RunDir.create(recipe.meta.name, out=out)
    if not resume:
        rundir.recipe_path.write_text(recipe.to_toml(), encoding="utf-8")
    return Trainer(build_session(recipe, plugins), rundir, reporter)


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_the_step_writes_a_checkpoint_and_the_resumed_run_is_exact(
    plugins: Plugins, tmp_path: Path, outer_handlers: list[int], signum: int, status: int,
) -> None:
    straight = make_trainer(plugins, tmp_path / "straight")
    straight.train()
    stopped = make_trainer(plugins, tmp_path / "stopped", SignalAfter(2, signum))
    with pytest.raises(RunInterrupted) as raised:
        stopped.train()
    assert outer_handlers == [], "the trainer's handler took the signal"
    assert raised.value.exit_code == status and raised.value.checkpointed
    message = str(raised.value)
    assert f"after step 2, with a checkpoint of it; continue with: flowkit run --resume {tmp_path / 'stopped'}" \
        in message and "\n" not in message
    assert json.loads((tmp_path / "stopped" / "checkpoints" / "latest.json").read_text())["step"] == 2

    resumed = make_trainer(plugins, tmp_path / "stopped", resume=True)
    resumed.train(resume=True)
    assert resumed.state.step == 4
    assert_same_weights(weights(tmp_path / "stopped"), weights(tmp_path / "straight"))
    assert metric_steps(tmp_path / "stopped") == [1, 2, 3, 4]


def test_a_second_signal_stops_at_once_without_a_checkpoint(
    plugins: Plugins, tmp_path: Path, outer_handlers: list[int],
) -> None:
    trainer = make_trainer(plugins, tmp_path / "run", SignalAfter(2, signal.SIGINT, signal.SIGINT))
    with pytest.raises(RunInterrupted) as raised:
        trainer.train()
    assert outer_handlers == []
    assert raised.value.exit_code == 130 and not raised.value.checkpointed
    assert "second SIGINT" in str(raised.value)
    assert not (tmp_path / "run" / "checkpoints" / "latest.json").exists()
    assert trainer.term_threads is None


def test_handlers_are_installed_only_while_training(plugins: Plugins, tmp_path: Path) -> None:
    trainer = make_trainer(plugins, tmp_path / "run")
    seen = []

    class Look(SilentReporter):
        def step(self, step: int, metrics: dict[str, float]) -> None:
            seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))

    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    trainer.reporter = Look()
    trainer.train()
    assert seen and all(h == (trainer.stop._handle, trainer.stop._handle) for h in seen)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
