"""The runs of a comparison, read back from their directories, and the statistics over seeds that
the report prints and plots: one `VariantRow` of `RunResult` per variant, paired differences, mean
learning curves and the time to a target bits/dim.

Every number comes from the runs' own files (summary.json, metrics.jsonl, recipe.toml), so
`flowkit compare RUN_DIR...` gives the same figures for runs made in any way.
"""

from __future__ import annotations

import json
import math
import statistics
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowkit.runs.ablation.spec import comparable
from flowkit.runs.rundir import RunDir

#: Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: 1.96).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


@dataclass
class RunResult:
    variant: str
    seed: int
    path: Path
    summary: dict[str, Any] | None
    recipe: dict[str, Any]
    curve: list[dict[str, float]]  # periodic evaluations: train_seconds, images, bpd
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.summary is not None and self.summary.get("status") == "finished"


@dataclass
class VariantRow:
    name: str
    runs: list[RunResult]
    overrides: dict[str, Any] = field(default_factory=dict)
    duplicate_of: str = ""

    def values(self, key: str) -> list[float]:
        return [r.summary[key] for r in self.runs if r.ok and isinstance(r.summary.get(key), (int, float))]

    def by_seed(self) -> dict[int, float]:
        # A run trained on noisy images reports no bits/dim (test_noisy_nll): it takes no part.
        return {r.seed: r.summary["test_bpd"] for r in self.runs if r.ok and "test_bpd" in r.summary}


def read_run(path: Path, variant: str = "", seed: int | None = None, recipe: dict[str, Any] | None = None) -> RunResult:
    """A run directory's summary, recipe (or the one given: a run that failed before writing
    its own), learning curve and error (if it failed)."""
    rundir = RunDir(path)
    summary = rundir.read_summary() if rundir.summary_path.is_file() else None
    if summary is not None and "test_bpd_marginal" in summary:
        # A class-conditional run's test_bpd is -log2 p(x | c) / D, a density of the image given its
        # label; comparisons rank the density of the image itself, its marginal -log2 sum_c p(x|c) p(c) / D,
        # which is what an unconditional run's test_bpd is. The conditional figure stays beside it.
        summary = {**summary, "test_bpd": summary["test_bpd_marginal"],
                   "test_bpd_conditional": summary.get("test_bpd_conditional", summary["test_bpd"])}
    if rundir.recipe_path.is_file():
        recipe = tomllib.loads(rundir.recipe_path.read_text())
    recipe = recipe or {}
    curve = []
    if rundir.metrics_path.is_file():
        for line in rundir.metrics_path.read_text().splitlines():
            row = json.loads(line)
            if "eval_images" in row and isinstance(row.get("test_bpd"), (int, float)):
                curve.append({"train_seconds": row["train_seconds"], "images": row["images"], "bpd": row["test_bpd"]})
    error = ""
    if rundir.error_path.is_file():
        error = rundir.error_path.read_text().strip().splitlines()[0]
    elif summary is not None and summary.get("status") == "failed":
        error = summary.get("error", "failed")
    elif summary is None:
        error = "did not finish"
    elif summary.get("status") != "finished":  # e.g. "retraining": a level job trains a level again
        error = f'its summary.json says status "{summary.get("status")}"'
    return RunResult(variant or path.name, seed if seed is not None else recipe.get("train", {}).get("seed", 0),
                     path, summary, recipe, curve, error)


def distinguishing(rows: list[VariantRow]) -> None:
    """Sets each row's ``overrides``: the resolved values in which the variants differ."""
    flat = [comparable(row.runs[0].recipe) if row.runs and row.runs[0].recipe else None for row in rows]
    known = [f for f in flat if f is not None]
    keys = sorted({k for f in known for k in f})
    differing = [k for k in keys if len({json.dumps(f.get(k)) for f in known}) > 1]
    for row, f in zip(rows, flat, strict=True):
        row.overrides = {k: f.get(k) for k in differing} if f is not None else {}


def group_by_recipe(paths: list[Path]) -> list[VariantRow]:
    """Runs of the same resolved recipe up to the seed are one variant (`flowkit compare`)."""
    rows: list[VariantRow] = []
    keys: list[str] = []
    for path in paths:
        run = read_run(path)
        key = json.dumps(comparable(run.recipe), sort_keys=True)
        if key in keys:
            rows[keys.index(key)].runs.append(run)
        else:
            keys.append(key)
            rows.append(VariantRow(run.recipe.get("recipe", {}).get("name", path.name), [run]))
    names = [r.name for r in rows]
    for row in rows:  # same recipe name, different settings: tell them apart by run directory
        if names.count(row.name) > 1:
            row.name = f"{row.name} ({row.runs[0].path.name})"
    return rows


def paired_difference(row: VariantRow, first: VariantRow) -> tuple[float, float | None, int] | None:
    """Mean of (this - first) test bits/dim over the seeds both have, its 95% half-interval
    (Student's t over the paired differences; None with one seed), and the number of pairs."""
    mine, base = row.by_seed(), first.by_seed()
    diffs = [mine[s] - base[s] for s in mine if s in base]
    if not diffs:
        return None
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, None, 1
    sd = statistics.stdev(diffs)
    t = T975[len(diffs) - 2] if len(diffs) - 1 <= len(T975) else 1.96
    return mean, t * sd / math.sqrt(len(diffs)), len(diffs)


def mean_curve(row: VariantRow, x: str) -> list[tuple[float, float, float, float]]:
    """(x, mean, min, max) of the runs' curves, point by point (runs share an evaluation schedule)."""
    curves = [r.curve for r in row.runs if r.curve]
    if not curves:
        return []
    out = []
    for points in zip(*curves, strict=False):
        values = [p["bpd"] for p in points]
        out.append((sum(p[x] for p in points) / len(points), sum(values) / len(values), min(values), max(values)))
    return out


def time_to(row: VariantRow, target: float) -> float | None:
    """Training seconds until the mean curve first reaches ``target`` bits/dim (None: not reached)."""
    for seconds, value, _, _ in mean_curve(row, "train_seconds"):
        if value <= target:
            return seconds
    return None
