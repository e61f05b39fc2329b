"""Checkpoints: round trip, pruning, and ``latest.json`` naming a complete checkpoint at every instant."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from flowkit.errors import FlowkitError
from flowkit.runs.checkpoint import KEEP, latest_checkpoint, load_checkpoint, save_checkpoint


def make_parts(seed: int) -> tuple[dict[str, nn.Module], torch.optim.Optimizer]:
    """Two small modules (one with a buffer) and an Adam optimizer that has taken one step."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    extra = nn.Linear(2, 2)
    optimizer = torch.optim.Adam([{"params": model.parameters(), "name": "model"},
                                  {"params": extra.parameters(), "name": "extra"}], lr=1e-2)
    loss = model(torch.randn(5, 3)).square().sum() + extra(torch.randn(5, 2)).square().sum()
    loss.backward()
    optimizer.step()
    return {"model": model, "extra": extra}, optimizer


def save(directory: Path, step: int, seed: int) -> Path:
    """Checkpoint ``step`` of the parts built from ``seed``; its trainer tensor records the seed."""
    modules, optimizer = make_parts(seed)
    return save_checkpoint(directory, step, modules, optimizer, {"seed": torch.tensor([seed])},
                           {"train_seconds": 1.5 * step, "images": 10 * step, "recent": [float(seed)]})


def loaded_seed(directory: Path) -> int:
    """Loads the checkpoint latest.json names into fresh parts; returns the seed it was saved from."""
    modules, optimizer = make_parts(999)
    tensors, state = load_checkpoint(latest_checkpoint(directory), modules, optimizer)
    seed = int(tensors["seed"])
    expected, _ = make_parts(seed)
    for name, module in modules.items():  # weights and trainer tensors come from one and the same save
        for key, value in module.state_dict().items():
            assert torch.equal(value, expected[name].state_dict()[key]), (name, key)
    assert state["recent"] == [float(seed)]
    return seed


def as_lists(groups: list[dict]) -> list[dict]:
    """Param groups with tuples as lists: JSON gives back Adam's betas as a list."""
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in groups]


def test_round_trip_restores_weights_optimizer_and_trainer_state(tmp_path: Path) -> None:
    modules, optimizer = make_parts(1)
    rng = torch.get_rng_state()
    path = save_checkpoint(tmp_path, 7, modules, optimizer, {"torch_rng": rng},
                           {"train_seconds": 12.5, "images": 70, "recent": [3.25, 3.0]})
    assert latest_checkpoint(tmp_path) == path

    fresh, fresh_optimizer = make_parts(2)
    tensors, state = load_checkpoint(path, fresh, fresh_optimizer)
    assert state == {"step": 7, "train_seconds": 12.5, "images": 70, "recent": [3.25, 3.0]}
    assert torch.equal(tensors["torch_rng"], rng)
    for name, module in modules.items():
        for key, value in module.state_dict().items():  # BatchNorm's running stats included
            assert torch.equal(fresh[name].state_dict()[key], value), (name, key)
    want, got = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert as_lists(got["param_groups"]) == as_lists(want["param_groups"])
    assert got["state"].keys() == want["state"].keys() and len(want["state"]) == 6
    for pid, slots in want["state"].items():
        assert got["state"][pid].keys() == slots.keys()
        for slot, value in slots.items():
            assert torch.equal(torch.as_tensor(got["state"][pid][slot]), torch.as_tensor(value)), (pid, slot)
    # The restored optimizer takes the same next step.
    for parts, opt in ((modules, optimizer), (fresh, fresh_optimizer)):
        torch.manual_seed(5)
        opt.zero_grad()
        (parts["model"](torch.randn(5, 3)).sum() + parts["extra"](torch.randn(5, 2)).sum()).backward()
        opt.step()
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            assert torch.equal(fresh[name].state_dict()[key], value), (name, key)


def test_pruning_keeps_exactly_the_keep_newest(tmp_path: Path) -> None:
    for step in range(1, 6):
        save(tmp_path, step, seed=step)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([f"step-{s:08d}" for s in range(6 - KEEP, 6)] + ["latest.json"])
    assert json.loads((tmp_path / "latest.json").read_text()) == {"step": 5, "path": "step-00000005"}
    assert loaded_seed(tmp_path) == 5


def test_saving_the_same_step_again_replaces_it_and_keeps_the_step_before(tmp_path: Path) -> None:
    save(tmp_path, 1, seed=1)
    save(tmp_path, 2, seed=2)
    same = save(tmp_path, 2, seed=2)  # the final checkpoint after a periodic one: identical files
    assert same.name == "step-00000002" and loaded_seed(tmp_path) == 2
    changed = save(tmp_path, 2, seed=3)  # e.g. a resumed run passing a step a crash left behind
    assert latest_checkpoint(tmp_path) == changed and loaded_seed(tmp_path) == 3
    checkpoints = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert checkpoints == ["step-00000001", changed.name]  # the superseded step-2 is gone, step 1 kept
    save(tmp_path, 3, seed=4)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [changed.name, "step-00000003"]
    assert loaded_seed(tmp_path) == 4


class Crash(BaseException):
    """The process dies: raised at the chosen file-system change and at every one after it."""


def crash_at(monkeypatch: pytest.MonkeyPatch, at: int | None) -> list[str]:
    """Counts renames and removals (``shutil.rmtree`` goes through ``os.unlink``/``os.rmdir``);
    the ``at``-th one (1-based) and all later ones raise `Crash` instead of happening."""
    calls: list[str] = []

    def wrap(name: str, real: Callable) -> Callable:
        def fake(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls.append(f"{name}{args}")
            if at is not None and len(calls) >= at:
                raise Crash(calls[-1])
            return real(*args, **kwargs)
        return fake

    for name in ("replace", "rename", "unlink", "remove", "rmdir"):
        monkeypatch.setattr(os, name, wrap(name, getattr(os, name)))
    return calls


def interrupted_resaves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Checkpoints 1 and 2, then a re-save of step 2 with new contents that crashes at its first,
    second, ... rename or removal: one folder per crash point."""
    def start(directory: Path) -> None:
        save(directory, 1, seed=1)
        save(directory, 2, seed=2)

    start(tmp_path / "dry")
    with monkeypatch.context() as m:
        calls = crash_at(m, None)
        save(tmp_path / "dry", 2, seed=3)
    assert len(calls) >= 2, calls
    directories = []
    for at in range(1, len(calls) + 1):
        directory = tmp_path / f"crash-at-{at}"
        start(directory)
        with monkeypatch.context() as m:
            crash_at(m, at)
            with pytest.raises(Crash):
                save(directory, 2, seed=3)
        directories.append(directory)
    return directories


def test_latest_names_a_complete_checkpoint_whenever_a_resave_of_a_step_is_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for directory in interrupted_resaves(tmp_path, monkeypatch):
        # latest.json names a folder whose files are all there and all from one save.
        assert loaded_seed(directory) in (2, 3), directory.name


def test_the_save_after_an_interrupted_one_succeeds_and_clears_what_the_crash_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for directory in interrupted_resaves(tmp_path, monkeypatch):
        save(directory, 3, seed=4)
        assert loaded_seed(directory) == 4
        # No temporaries; KEEP = 2 checkpoints: step 3 and one of step 2 (the old or the new one).
        left = sorted(p.name for p in directory.iterdir())
        assert len(left) == 3, (directory.name, left)
        assert left[0] == "latest.json" and left[2] == "step-00000003", (directory.name, left)
        assert left[1] in ("step-00000002", "step-00000002-1"), (directory.name, left)


def test_a_crash_while_writing_a_new_step_keeps_the_previous_one_as_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    save(tmp_path, 1, seed=1)
    with monkeypatch.context() as m:
        crash_at(m, 1)
        with pytest.raises(Crash):
            save(tmp_path, 2, seed=2)
    assert loaded_seed(tmp_path) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no latest.json"),
        ("", "is not a checkpoint pointer"),
        ('{"step": 2, "pa', "is not a checkpoint pointer"),
        ('{"step": 2}', "is not a checkpoint pointer"),
        ("[]", "is not a checkpoint pointer"),
        ('{"step": 2, "path": "../../elsewhere"}', "not a step-* checkpoint folder"),
        ('{"step": 2, "path": 2}', "not a step-* checkpoint folder"),
        ('{"step": 3, "path": "step-00000003"}', "step-00000003, which does not exist"),
    ],
)
def test_a_missing_or_corrupt_latest_json_is_a_flowkit_error(tmp_path: Path, content: str | None,
                                                            message: str) -> None:
    save(tmp_path, 2, seed=2)
    pointer = tmp_path / "latest.json"
    if content is None:
        pointer.unlink()
    else:
        pointer.write_text(content)
    with pytest.raises(FlowkitError, match=message.replace("*", r"\*")):
        latest_checkpoint(tmp_path)


def test_a_checkpoint_folder_removed_by_hand_is_reported_not_loaded(tmp_path: Path) -> None:
    path = save(tmp_path, 2, seed=2)
    shutil.rmtree(path)
    with pytest.raises(FlowkitError, match="does not exist"):
        latest_checkpoint(tmp_path)
