"""RunDir names every file of a run directory, and write_atomic is the one atomic writer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flowkit.runs import rundir as rundir_module
from flowkit.runs.rundir import RunDir, grid_name, write_atomic, write_json_atomic


def test_write_atomic_replaces_the_file_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "summary.json"
    write_atomic(path, "old")
    write_atomic(path, b"new bytes")
    assert path.read_bytes() == b"new bytes"
    assert sorted(p.name for p in path.parent.iterdir()) == ["summary.json"]


def test_exclusive_write_creates_once_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "recipe.toml"
    assert write_atomic(path, "first", exclusive=True) is True
    assert write_atomic(path, "second", exclusive=True) is False
    assert path.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.toml"]


def test_data_is_synced_before_the_rename_and_the_folder_after(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    monkeypatch.setattr(rundir_module, "fsync_path",
                        lambda p: events.append(f"folder {Path(p).name}"))
    write_json_atomic(tmp_path / "summary.json", {"status": "finished"})
    assert events == ["fsync", "replace", f"folder {tmp_path.name}"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "report.md"
    write_atomic(path, "old")
    with pytest.raises(TypeError):
        write_atomic(path, 12345)  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_every_file_of_a_run_directory_is_named_by_rundir(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.recipe_path.name == "recipe.toml" and run.summary_path.name == "summary.json"
    assert run.metrics_path.name == "metrics.jsonl" and run.report_path.name == "report.md"
    assert run.level("level1").path == tmp_path / "levels" / "level1"
    assert run.sample_grid(0.7) == tmp_path / "samples" / "samples-T0.7.png"
    assert grid_name("sample-mcmc", 1.0, ".json") == "sample-mcmc-T1.json"
