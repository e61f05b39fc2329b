"""The comparison report of a set of run directories: one row per variant, statistics over
seeds, the overrides that distinguish the variants, the time to a target bits/dim, and plots.

Every number comes from the runs' own files (summary.json, metrics.jsonl, recipe.toml), so
`flowkit compare RUN_DIR...` gives the same report for runs made in any way.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowkit.runs.ablation.spec import comparable

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
        return {r.seed: r.summary["test_bpd"] for r in self.runs if r.ok}


def read_run(path: Path, variant: str = "", seed: int | None = None, recipe: dict[str, Any] | None = None) -> RunResult:
    """A run directory's summary, recipe (or the one given: a run that failed before writing
    its own), learning curve and error (if it failed)."""
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else None
    if (path / "recipe.toml").is_file():
        recipe = tomllib.loads((path / "recipe.toml").read_text())
    recipe = recipe or {}
    curve = []
    if (path / "metrics.jsonl").is_file():
        for line in (path / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            if "eval_images" in row and isinstance(row.get("test_bpd"), (int, float)):
                curve.append({"train_seconds": row["train_seconds"], "images": row["images"], "bpd": row["test_bpd"]})
    error = ""
    if (path / "error.txt").is_file():
        error = (path / "error.txt").read_text().strip().splitlines()[0]
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


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def row_record(row: VariantRow, first: VariantRow, target: float | None) -> dict[str, Any]:
    bpd = row.values("test_bpd")
    diff = paired_difference(row, first) if row is not first else None
    record: dict[str, Any] = {
        "variant": row.name,
        "seeds": [r.seed for r in row.runs if r.ok],
        "test_bpd_mean": sum(bpd) / len(bpd) if bpd else None,
        "test_bpd_std": statistics.stdev(bpd) if len(bpd) > 1 else None,
        "train_bpd_mean": _mean(row.values("train_bpd")),
        "diff_to_first": diff[0] if diff else None,
        "diff_ci95": diff[1] if diff else None,
        "test_bpd_iw": _mean(row.values("test_bpd_iw")),
        "params": _mean(row.values("params")),
        "train_images_per_s": _mean(row.values("train_images_per_s")),
        "steps": _mean(row.values("steps")),
        "peak_memory_mib": max(row.values("peak_memory_bytes"), default=0) / 2**20 or None,
        "wall_s": _mean(row.values("wall_s")),
        "time_to_target_s": time_to(row, target) if target is not None and any(r.ok for r in row.runs) else None,
        "overrides": row.overrides,
        "errors": [f"seed {r.seed}: {r.error}" for r in row.runs if not r.ok],
        "duplicate_of": row.duplicate_of,
        "runs": [str(r.path) for r in row.runs],
    }
    return record


#: Beyond this many differing values, variants are different recipes: the list shows the
#: parts in use and the training settings; report.json has every value.
SHOWN = 12


def _shown_overrides(overrides: dict[str, Any]) -> str:
    items = {k: v for k, v in overrides.items() if v is not None}
    if len(items) > SHOWN:
        kept = {k: v for k, v in items.items() if k.startswith(("train.", "data.")) or k.endswith(".use")
                and k.count(".") == 1}
        rest = len(items) - len(kept)
        return ", ".join(f"`{k} = {json.dumps(v)}`" for k, v in kept.items()) + \
            f" (and {rest} more values of a different recipe: report.json lists them)"
    return ", ".join(f"`{k} = {json.dumps(v)}`" for k, v in items.items())


def _test_images(rows: list[VariantRow]) -> str:
    counts = sorted({r.summary.get("test_images") for row in rows for r in row.runs if r.ok} - {None})
    if not counts:
        return "the test images"
    return f"{counts[0]:,} test images" if len(counts) == 1 else "each run's test images (" + \
        ", ".join(f"{c:,}" for c in counts) + ")"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def write_report(out: Path, rows: list[VariantRow], *, title: str, description: str = "",
                 notes: list[str] | None = None, target_bpd: float = 0.0, temperature: float = 1.0) -> Path:
    """report.md, report.json, report.csv and plots/*.png in ``out``; returns report.md."""
    from flowkit.runs.ablation import plots

    out.mkdir(parents=True, exist_ok=True)
    distinguishing(rows)
    live = [r for r in rows if any(run.ok for run in r.runs)]
    finals = [r.curve[-1]["bpd"] for row in live for r in row.runs if r.curve]
    target = target_bpd or (max(finals) if finals else None)
    first = rows[0]
    records = [row_record(row, first, target) for row in rows]
    (out / "report.json").write_text(json.dumps({"title": title, "target_bpd": target, "variants": records},
                                                indent=2), encoding="utf-8")
    columns = ["variant", "test_bpd_mean", "test_bpd_std", "train_bpd_mean", "diff_to_first", "diff_ci95", "test_bpd_iw", "params",
               "train_images_per_s", "steps", "peak_memory_mib", "wall_s", "time_to_target_s"]
    with open(out / "report.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*columns, "seeds", "overrides", "errors"])
        for rec in records:
            writer.writerow([rec[c] for c in columns] + [" ".join(map(str, rec["seeds"])),
                            json.dumps(rec["overrides"]), " | ".join(rec["errors"])])
    made = plots.make_all(out / "plots", rows, temperature=temperature)
    lines = [*(f"> {n}" for n in notes or []), *([""] if notes else []), f"# {title}", ""]
    if description:
        lines += [description, ""]
    lines += [
        f"Test bits/dim: the dequantized bound over {_test_images(rows)} and all their dims, mean ± std over seeds; "
        "Δ: paired difference to the first variant over common seeds, with a 95% interval (Student's t) "
        "where there are two or more.", "",
        "| variant | test bits/dim | train bits/dim | Δ vs first | IW | params | train img/s | steps | peak MiB | wall s | "
        + (f"time to {target:.3f} bpd (s) |" if target is not None else "time to target (s) |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rec in records:
        bpd = _fmt(rec["test_bpd_mean"]) + (f" ± {rec['test_bpd_std']:.4f}" if rec["test_bpd_std"] else "")
        diff = "" if rec["diff_to_first"] is None else f"{rec['diff_to_first']:+.4f}" + (
            f" ± {rec['diff_ci95']:.4f}" if rec["diff_ci95"] is not None else " (1 seed)")
        reached = rec["time_to_target_s"]
        lines.append(
            f"| {rec['variant']} | {bpd} | {_fmt(rec['train_bpd_mean'])} | {diff} | {_fmt(rec['test_bpd_iw'])} | {_fmt(rec['params'], 0)} | "
            f"{_fmt(rec['train_images_per_s'], 1)} | {_fmt(rec['steps'], 0)} | {_fmt(rec['peak_memory_mib'], 0)} | "
            f"{_fmt(rec['wall_s'], 1)} | {'not reached' if reached is None and target and rec['seeds'] else _fmt(reached, 1)} |"
        )
    lines += ["", "What distinguishes the variants (resolved values):", ""]
    for rec in records:
        shown = _shown_overrides(rec["overrides"])
        lines.append(f"- **{rec['variant']}**: {shown or '(no resolved value differs)'}")
        if rec["duplicate_of"]:
            lines.append(f"  - resolves to the same recipe as **{rec['duplicate_of']}**: not run again.")
        for error in rec["errors"]:
            lines.append(f"  - failed: {error}")
    lines += [""] + [f"![{p.stem}](plots/{p.name})" for p in made]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
