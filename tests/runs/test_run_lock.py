"""One process per run directory: the lock file, what RunDir.create does around it, and that a
killed holder leaves no stale lock."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from flowkit.errors import FlowkitError
from flowkit.runs import lock
from flowkit.runs.lock import LOCK_NAME, RunInUseError, RunLock
from flowkit.runs.rundir import RunDir

HOLD = """
import sys, time
from flowkit.runs.lock import RunLock
lock = RunLock(sys.argv[1]).acquire()  # kept: a collected lock is released
print("held", flush=True)
time.sleep(600)
"""


def a_run_folder(path: Path) -> Path:
    path.mkdir()
    (path / "recipe.toml").write_text("# a run's recipe\n")
    (path / "checkpoints").mkdir()
    return path


def test_another_process_holding_the_lock_refuses_create_and_resume_and_its_death_frees_it(tmp_path: Path) -> None:
    run = a_run_folder(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInUseError, match=f"in use by process {holder.pid}.*refusing to start a new run in"):
            RunDir.create("x", run, overwrite=True)
        assert (run / "recipe.toml").is_file() and (run / "checkpoints").is_dir(), "nothing was removed"
        with pytest.raises(RunInUseError, match=f"in use by process {holder.pid}.*refusing to resume"):
            RunDir.existing(run).lock("resume")
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    with RunDir.existing(run).lock("resume") as rundir:
        assert (rundir.path / LOCK_NAME).read_text().strip() != str(holder.pid)


def test_two_locks_on_one_folder_exclude_each_other_within_a_process_too(tmp_path: Path) -> None:
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunInUseError):
        RunLock(tmp_path).acquire()
    first.release()
    second = RunLock(tmp_path).acquire()
    assert second.held
    second.release()
    assert not second.held


def test_a_forgotten_lock_is_released_when_its_owner_is_collected(tmp_path: Path) -> None:
    RunLock(tmp_path).acquire()  # dropped at once
    RunLock(tmp_path).acquire().release()


def test_create_locks_the_new_folder_until_released(tmp_path: Path) -> None:
    rundir = RunDir.create("x", tmp_path / "run")
    (tmp_path / "run" / "recipe.toml").write_text("")
    with pytest.raises(RunInUseError):
        RunDir.existing(tmp_path / "run").lock()
    rundir.release()
    RunDir.existing(tmp_path / "run").lock().release()


def test_overwrite_empties_the_folder_and_keeps_its_lock_file_locked(tmp_path: Path) -> None:
    run = a_run_folder(tmp_path / "run")
    (run / LOCK_NAME).write_text("12345\n")  # left by a process that ended
    with RunDir.create("x", run, overwrite=True) as rundir:
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
        with pytest.raises(RunInUseError):
            RunLock(run).acquire()
        assert rundir.path == run


@pytest.mark.parametrize(("overwrite", "message"), [(False, "already exists and is not empty"),
                                                    (True, "is not a flowkit run directory")])
def test_a_folder_that_is_not_a_run_is_refused_and_gets_no_lock_file(tmp_path: Path, overwrite: bool,
                                                                     message: str) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FlowkitError, match=message):
        RunDir.create("x", folder, overwrite=overwrite)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_a_finished_run_is_refused_without_overwrite(tmp_path: Path) -> None:
    run = a_run_folder(tmp_path / "run")
    (run / LOCK_NAME).write_text("12345\n")
    with pytest.raises(FlowkitError, match="already exists and is not empty"):
        RunDir.create("x", run)
    RunLock(run).acquire().release()  # and the refusal gave the lock back


def test_a_file_system_that_cannot_lock_is_named_not_taken_for_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only EWOULDBLOCK (BlockingIOError) means another holder; ENOLCK (NFS without a lock daemon)
    and the like are reported with the lock file and the cause, waiting or not."""
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    run = a_run_folder(tmp_path / "run")
    for wait in (False, True):
        with pytest.raises(FlowkitError, match=rf"cannot lock {run / LOCK_NAME} .*No locks available \(ENOLCK\)") \
                as raised:
            RunLock(run).acquire("resume", wait=wait)
        assert not isinstance(raised.value, RunInUseError)
