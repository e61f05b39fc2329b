"""Run directories: created once, never overwritten unless asked, used by one process at a time.

`RunDir` names every file of a run directory, and `write_atomic` is the one way flowkit writes a
file there (and the level-jobs and comparison files beside it): a complete temporary file, synced,
renamed over the name, and the rename synced, so a reader or a crash sees the old file or the new
one, never half of one. The checkpoints under ``checkpoints/`` have their own layout, stated in
`flowkit.runs.checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from flowkit.errors import FlowkitError
from flowkit.runs.lock import LOCK_NAME, RunLock
from flowkit.runs.metrics import MetricsSink


def fsync_path(path: Path) -> None:
    """Flushes a file, or a folder's entries (a rename into it, a new file), to disk (folders:
    POSIX only). A descriptor opened read-only is enough: fsync flushes the file, not what was
    written through it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder on Windows cannot be opened; its renames are durable as they are
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes, *, exclusive: bool = False) -> bool:
    """Writes ``data`` (text as UTF-8) to ``path`` atomically and durably: a temporary file in the
    same folder, fsynced, then renamed over ``path`` and the folder synced.

    ``exclusive``: create ``path`` only if it does not exist, by hard-linking the complete
    temporary file to the name (``os.link`` fails when the name exists, on NFS too), so of
    processes racing to create it exactly one does; returns whether this call created it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    created = True
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if not exclusive:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                created = False  # another process linked its complete file first
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # left after a link, or after a failure before the rename
    fsync_path(path.parent)
    return created


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON, written by `write_atomic`."""
    write_atomic(path, json.dumps(obj, indent=2))


def grid_name(prefix: str, temperature: float, suffix: str) -> str:
    """The file name of a grid drawn at ``temperature``: ``samples-T0.7.png``."""
    return f"{prefix}-T{temperature:g}{suffix}"


class RunDir:
    """A run directory, and the name of every file in it::

        recipe.toml         the resolved recipe (every value that was built)
        metrics.jsonl       one JSON record per logged step and evaluation
        summary.json        the run's figures (flowkit.runs.execute.summarise)
        report.md, plots/   the report (flowkit.runs.report); report.previous.md while a level retrains
        checkpoints/        flowkit.runs.checkpoint's layout
        samples/            sample grids (PNG, and NHWC uint8 .npy)
        tb/                 TensorBoard events, with [log] tensorboard = true
        levels/<term>/      the run directories of level jobs (flowkit.runs.level_jobs)
        error.txt           why an ablation's variant failed (flowkit.runs.ablation)
        .lock               held by the process that writes here (flowkit.runs.lock), so a second
                            ``flowkit run --out`` or ``--resume`` of it is refused instead of interleaved
    """

    RECIPE = "recipe.toml"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    REPORT = "report.md"
    PREVIOUS_REPORT = "report.previous.md"
    PLOTS = "plots"
    CHECKPOINTS = "checkpoints"
    SAMPLES = "samples"
    TENSORBOARD = "tb"
    LEVELS = "levels"
    ERROR = "error.txt"
    LOCK = LOCK_NAME

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = RunLock(self.path)
        self.metrics = MetricsSink(self.metrics_path)  # every record; TensorBoard when opened

    @classmethod
    def create(cls, name: str, out: Path | None, *, overwrite: bool = False, root: Path = Path("runs")) -> RunDir:
        """A new, empty run directory, locked by this process until `release` (or the end of a
        ``with`` block, or of the process)."""
        if out is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            out = root / f"{name}-{stamp}"
            n = 1
            while out.exists():
                n += 1
                out = root / f"{name}-{stamp}-{n}"
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise FlowkitError(f"--out {out} is a file, not a directory; choose another --out.")
        if not (out / LOCK_NAME).exists():
            _refuse_contents(out, overwrite)  # before writing a lock file into a folder that is not a run's
        out.mkdir(parents=True, exist_ok=True)
        rundir = cls(out).lock("start a new run in")
        try:
            _refuse_contents(out, overwrite)  # again, now that no other flowkit process can write here
            for entry in _contents(out):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        except BaseException:
            rundir.release()
            raise
        return rundir

    @classmethod
    def existing(cls, path: Path) -> RunDir:
        path = Path(path)
        if not (path / cls.RECIPE).is_file():
            raise FlowkitError(f"{path} is not a flowkit run directory: it has no recipe.toml.")
        return cls(path)

    def lock(self, what: str = "use", *, wait: bool = False) -> RunDir:
        """Takes the directory's lock, or raises `RunInUseError` when a live process holds it
        (``wait``: waits for that process to release it)."""
        self._lock.acquire(what, wait=wait)
        return self

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    @property
    def recipe_path(self) -> Path:
        return self.path / self.RECIPE

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def summary_path(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def report_path(self) -> Path:
        return self.path / self.REPORT

    @property
    def previous_report_path(self) -> Path:
        return self.path / self.PREVIOUS_REPORT

    @property
    def plots(self) -> Path:
        return self.path / self.PLOTS

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def samples(self) -> Path:
        d = self.path / self.SAMPLES
        d.mkdir(exist_ok=True)
        return d

    @property
    def tensorboard(self) -> Path:
        return self.path / self.TENSORBOARD

    @property
    def levels(self) -> Path:
        return self.path / self.LEVELS

    @property
    def error_path(self) -> Path:
        return self.path / self.ERROR

    def sample_grid(self, temperature: float, suffix: str = ".png", prefix: str = "samples") -> Path:
        """A sample grid of ``samples/``: ``samples-T0.7.png``, and its images as ``.npy``."""
        return self.path / self.SAMPLES / grid_name(prefix, temperature, suffix)

    def level(self, term: str) -> RunDir:
        """The run directory of the level job that trains ``term`` (``levels/<term>``)."""
        return RunDir(self.levels / term)

    def write_recipe(self, text: str) -> None:
        write_atomic(self.recipe_path, text)

    def write_report(self, text: str) -> None:
        write_atomic(self.report_path, text)

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.record(record)

    def drop_metrics_after(self, step: int) -> None:
        """Forgets the metrics.jsonl records of steps after ``step``, final evaluations, and a
        line a kill cut short: a resumed run logs them again, so each step appears once."""
        self.metrics.drop_after(step)  # and in TensorBoard's curves
        path = self.metrics.jsonl
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step \
                    and not record.get("final"):
                kept.append(line + "\n")
        write_atomic(path, "".join(kept))

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.summary_path, summary)

    def read_summary(self) -> dict[str, Any]:
        p = self.summary_path
        return json.loads(p.read_text()) if p.is_file() else {}


def _contents(path: Path) -> list[Path]:
    """What a directory holds besides its lock file."""
    return [p for p in path.iterdir() if p.name != LOCK_NAME] if path.is_dir() else []


def _refuse_contents(out: Path, overwrite: bool) -> None:
    if not _contents(out):
        return
    if not overwrite:
        raise FlowkitError(
            f"run directory {out} already exists and is not empty; choose another --out, "
            "resume it with --resume, or pass --overwrite to replace it."
        )
    if not (out / RunDir.RECIPE).is_file():
        raise FlowkitError(f"{out} is not a flowkit run directory (no recipe.toml); refusing to overwrite it.")
