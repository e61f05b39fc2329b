"""Run directories: created once, never overwritten unless asked, used by one process at a time."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from flowkit.errors import FlowkitError
from flowkit.runs.checkpoint import write_json_atomic
from flowkit.runs.lock import LOCK_NAME, RunLock
from flowkit.runs.metrics import MetricsSink


class RunDir:
    """``recipe.toml``, ``metrics.jsonl``, ``summary.json``, ``checkpoints/``, ``samples/``, and
    ``tb/`` with ``[log] tensorboard = true``; ``.lock``: the process that trains into the directory
    holds it (`flowkit.runs.lock`), so a second ``flowkit run --out`` or ``--resume`` of it is
    refused instead of interleaved."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = RunLock(self.path)
        self.metrics = MetricsSink(self.path / "metrics.jsonl")  # every record; TensorBoard when opened

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
        if not (path / "recipe.toml").is_file():
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
        return self.path / "recipe.toml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples(self) -> Path:
        d = self.path / "samples"
        d.mkdir(exist_ok=True)
        return d

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
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.path / "summary.json", summary)

    def read_summary(self) -> dict[str, Any]:
        p = self.path / "summary.json"
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
    if not (out / "recipe.toml").is_file():
        raise FlowkitError(f"{out} is not a flowkit run directory (no recipe.toml); refusing to overwrite it.")
