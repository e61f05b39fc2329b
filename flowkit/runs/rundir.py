"""Run directories: created once, never overwritten unless asked."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from flowkit.errors import FlowkitError
from flowkit.runs.checkpoint import write_json_atomic


class RunDir:
    """``recipe.toml``, ``metrics.jsonl``, ``summary.json``, ``checkpoints/``, ``samples/``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, name: str, out: Path | None, *, overwrite: bool = False, root: Path = Path("runs")) -> RunDir:
        if out is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            out = root / f"{name}-{stamp}"
            n = 1
            while out.exists():
                n += 1
                out = root / f"{name}-{stamp}-{n}"
        out = Path(out)
        if out.exists() and any(out.iterdir()):
            if not overwrite:
                raise FlowkitError(
                    f"run directory {out} already exists and is not empty; choose another --out, "
                    "resume it with --resume, or pass --overwrite to replace it."
                )
            if not (out / "recipe.toml").is_file():
                raise FlowkitError(f"{out} is not a flowkit run directory (no recipe.toml); refusing to overwrite it.")
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        return cls(out)

    @classmethod
    def existing(cls, path: Path) -> RunDir:
        path = Path(path)
        if not (path / "recipe.toml").is_file():
            raise FlowkitError(f"{path} is not a flowkit run directory: it has no recipe.toml.")
        return cls(path)

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
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.path / "summary.json", summary)

    def read_summary(self) -> dict[str, Any]:
        p = self.path / "summary.json"
        return json.loads(p.read_text()) if p.is_file() else {}
