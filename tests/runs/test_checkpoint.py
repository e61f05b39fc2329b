"""Checkpoints: round trip, pruning, ``latest.json`` naming a complete checkpoint at every
instant, files synced before they are published, and damaged files detected and named."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from flowkit.errors import FlowkitError
from flowkit.runs import checkpoint as checkpoint_module
from flowkit.runs import rundir as rundir_module
from flowkit.runs.checkpoint import (
    KEEP,
    CheckpointError,
    checkpoint_to_resume,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)


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


# -- durability: synced before published ---------------------------------------------------


def test_every_file_and_its_folder_are_synced_before_the_rename_that_publishes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = checkpoint_module.fsync_path, os.replace
    fsync = lambda path: (events.append(("fsync", str(path))), real_fsync(path))[1]  # noqa: E731
    # The checkpoint's own files and folders, and latest.json through the one atomic writer.
    monkeypatch.setattr(checkpoint_module, "fsync_path", fsync)
    monkeypatch.setattr(rundir_module, "fsync_path", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", f"{a} -> {b}")), real_replace(a, b))[1])
    final = save(tmp_path, 1, seed=1)
    publish = next(i for i, (kind, what) in enumerate(events) if kind == "replace" and what.endswith(str(final)))
    tmp = events[publish][1].split(" -> ")[0]
    synced_before = {what for kind, what in events[:publish] if kind == "fsync"}
    assert {f"{tmp}/{name}" for name in checkpoint_module._FILES} | {tmp} <= synced_before
    after = [what for kind, what in events[publish + 1:] if kind == "fsync"]
    assert str(tmp_path) in after, "the folder holding the renamed checkpoint is synced after the rename"
    pointer = next(i for i, (kind, what) in enumerate(events) if kind == "replace" and what.endswith("latest.json"))
    assert pointer > publish and ("fsync", str(tmp_path)) in events[pointer + 1:], "latest.json's rename is synced"


# -- integrity: damaged files are detected and named ----------------------------------------


def test_state_json_records_the_size_and_sha256_of_every_tensor_file(tmp_path: Path) -> None:
    path = save(tmp_path, 1, seed=1)
    files = json.loads((path / "state.json").read_text())["files"]
    assert set(files) == {"weights.safetensors", "optimizer.safetensors", "trainer.safetensors"}
    for name, want in files.items():
        data = (path / name).read_bytes()
        assert want == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-7])


def flip_a_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF  # in the tensor data: the safetensors framing stays valid, the sha256 does not
    file.write_bytes(bytes(data))


def garble_header(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[9] = ord("#")  # the first byte after the 8-byte length: the JSON header no longer parses
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["weights.safetensors", "optimizer.safetensors", "trainer.safetensors"])
@pytest.mark.parametrize(("damage", "reason"), [
    (truncate, "truncated or overwritten"),
    (flip_a_byte, "sha256 differs"),
    (garble_header, "header is not readable"),
    (Path.unlink, "is missing"),
])
def test_a_damaged_file_of_the_latest_checkpoint_is_named_with_the_intact_one_to_resume_from(
    tmp_path: Path, name: str, damage: Callable[[Path], None], reason: str,
) -> None:
    directory = tmp_path / "run" / "checkpoints"
    save(directory, 1, seed=1)
    latest = save(directory, 2, seed=2)
    damage(latest / name)
    with pytest.raises(CheckpointError) as raised:
        loaded_seed(directory)
    message = str(raised.value)
    assert f"{latest / name} is damaged" in message and reason in message
    assert f"flowkit run --resume {tmp_path / 'run'} --from-checkpoint step-00000001" in message
    # The one offered loads.
    modules, optimizer = make_parts(999)
    load_checkpoint(checkpoint_to_resume(directory, "step-00000001"), modules, optimizer)


def test_sampling_needs_only_intact_weights(tmp_path: Path) -> None:
    latest = save(tmp_path, 1, seed=1)
    truncate(latest / "optimizer.safetensors")
    modules, _ = make_parts(999)
    load_weights(latest, modules)  # the optimizer's file is not read, so not checked
    truncate(latest / "weights.safetensors")
    with pytest.raises(CheckpointError, match="weights.safetensors is damaged"):
        load_weights(latest, modules)


@pytest.mark.parametrize(("content", "reason"), [
    ("{", "not readable JSON"),
    ('{"step": 1}', "lacks the step, trainer, optimizer or files"),
    (None, "state.json is damaged: it is missing"),
])
def test_a_damaged_state_json_is_named(tmp_path: Path, content: str | None, reason: str) -> None:
    latest = save(tmp_path, 1, seed=1)
    if content is None:
        (latest / "state.json").unlink()
    else:
        (latest / "state.json").write_text(content)
    with pytest.raises(CheckpointError, match=reason):
        loaded_seed(tmp_path)


def test_a_checkpoint_from_before_digests_still_gets_its_framing_checked(tmp_path: Path) -> None:
    latest = save(tmp_path, 1, seed=1)
    state = json.loads((latest / "state.json").read_text())
    del state["files"]
    (latest / "state.json").write_text(json.dumps(state))
    assert loaded_seed(tmp_path) == 1  # intact: loads as before
    truncate(latest / "weights.safetensors")
    with pytest.raises(CheckpointError, match="weights.safetensors is damaged: it is .* bytes but its header"):
        loaded_seed(tmp_path)


def test_with_no_intact_checkpoint_left_the_message_says_to_start_again(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "checkpoints"
    first = save(directory, 1, seed=1)
    latest = save(directory, 2, seed=2)
    flip_a_byte(first / "weights.safetensors")
    truncate(latest / "trainer.safetensors")
    with pytest.raises(CheckpointError, match="No intact checkpoint is left") as raised:
        loaded_seed(directory)
    assert f"flowkit run {tmp_path / 'run' / 'recipe.toml'} --out NEW_DIR" in str(raised.value)


# -- choosing the checkpoint to resume from ---------------------------------------------------


def test_the_checkpoint_to_resume_from_is_named_by_folder_or_step(tmp_path: Path) -> None:
    save(tmp_path, 1, seed=1)
    save(tmp_path, 2, seed=2)
    resaved = save(tmp_path, 2, seed=3)  # step-00000002-1 supersedes step-00000002
    assert checkpoint_to_resume(tmp_path) == resaved
    assert checkpoint_to_resume(tmp_path, "step-1") == tmp_path / "step-00000001"
    assert checkpoint_to_resume(tmp_path, "1") == tmp_path / "step-00000001"
    assert checkpoint_to_resume(tmp_path, "step-00000001") == tmp_path / "step-00000001"
    assert checkpoint_to_resume(tmp_path, "step-2") == resaved
    assert checkpoint_to_resume(tmp_path, resaved.name) == resaved
    for bad in ("step-3", "latest", "step-00000002-7", ""):
        with pytest.raises(CheckpointError, match="the checkpoints kept are: step-00000001, step-00000002-1"):
            checkpoint_to_resume(tmp_path, bad)


def test_a_run_without_checkpoints_has_nothing_to_resume_from(tmp_path: Path) -> None:
    assert checkpoint_to_resume(tmp_path / "checkpoints") is None  # the folder does not exist yet
    (tmp_path / "checkpoints").mkdir()
    assert checkpoint_to_resume(tmp_path / "checkpoints") is None
    with pytest.raises(CheckpointError, match="has no checkpoint 'step-1'.*kept are: none"):
        checkpoint_to_resume(tmp_path / "checkpoints", "step-1")


def test_a_published_checkpoint_without_latest_json_is_resumed_from(tmp_path: Path) -> None:
    """A crash between publishing the first checkpoint and writing latest.json."""
    first = save(tmp_path, 1, seed=1)
    (tmp_path / "latest.json").unlink()
    assert checkpoint_to_resume(tmp_path) == first


def test_resuming_from_an_older_checkpoint_replaces_the_later_ones_and_keeps_that_one(tmp_path: Path) -> None:
    save(tmp_path, 2, seed=2)
    damaged = save(tmp_path, 4, seed=4)
    truncate(damaged / "weights.safetensors")
    # --from-checkpoint step-2: the resumed run's next save is step 3.
    save(tmp_path, 3, seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-00000002", "step-00000003"]
    assert loaded_seed(tmp_path) == 3


def test_a_broken_latest_json_offers_the_checkpoints_kept(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "checkpoints"
    save(directory, 1, seed=1)
    save(directory, 2, seed=2)
    (directory / "latest.json").write_text('{"step": 2, "pa')
    with pytest.raises(CheckpointError, match="is not a checkpoint pointer") as raised:
        latest_checkpoint(directory)
    assert f"flowkit run --resume {tmp_path / 'run'} --from-checkpoint step-00000002" in str(raised.value)


@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_a_channels_last_weight_resumes_with_its_moments_in_its_own_layout(tmp_path: Path, kind: str) -> None:
    """safetensors stores tensors contiguous; Adam's moments of a channels-last weight come back in
    its layout, so the fused kernel (which walks weight, gradient and moments as flat memory)
    pairs each weight with its own moments and the resumed step equals the uninterrupted one."""
    def parts() -> tuple[nn.Conv2d, torch.optim.Optimizer]:
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 5, 3).to(memory_format=torch.channels_last)
        return conv, torch.optim.Adam(conv.parameters(), lr=1e-2, **{kind: True})

    def step(conv: nn.Conv2d, optimizer: torch.optim.Optimizer, seed: int) -> None:
        optimizer.zero_grad()
        x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
        conv(x.contiguous(memory_format=torch.channels_last)).square().sum().backward()
        optimizer.step()

    conv, optimizer = parts()
    step(conv, optimizer, 1)
    path = save_checkpoint(tmp_path, 1, {"conv": conv}, optimizer, {}, {"train_seconds": 0.0, "images": 0, "recent": []})
    fresh, fresh_optimizer = parts()
    load_checkpoint(path, {"conv": fresh}, fresh_optimizer)
    assert fresh_optimizer.state[fresh.weight]["exp_avg"].stride() == fresh.weight.stride() != (45, 9, 3, 1)
    step(conv, optimizer, 2)
    step(fresh, fresh_optimizer, 2)
    assert torch.equal(fresh.weight, conv.weight) and torch.equal(fresh.bias, conv.bias)
