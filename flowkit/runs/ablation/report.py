"""The comparison report of a set of run directories (`flowkit.runs.ablation.results`): one row
per variant, statistics over seeds, the overrides that distinguish the variants, the time to a
target bits/dim, and plots (`flowkit.runs.ablation.plots`).
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

from flowkit.runs.ablation import plots
from flowkit.runs.ablation.results import VariantRow, distinguishing, paired_difference, time_to
from flowkit.runs.rundir import write_atomic, write_json_atomic

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
        # Class-conditional runs (their test_bpd here is the marginal, `results.read_run`).
        "test_bpd_conditional": _mean(row.values("test_bpd_conditional")),
        "bayes_accuracy": _mean(row.values("bayes_accuracy")),
        "params": _mean(row.values("params")),
        "train_images_per_s": _mean(row.values("train_images_per_s")),
        "sample_images_per_s": _mean(row.values("sample_images_per_s")),
        "sample_solver": next((r.summary["sample_solver"] for r in row.runs if r.ok and "sample_solver" in r.summary),
                              None),
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


def _sampling(rec: dict[str, Any]) -> str:
    """Sampling images/s of the run's own grids, with the solver of a sequential inverse (TarFlow)."""
    rate = _fmt(rec["sample_images_per_s"], 1)
    return f"{rate} ({rec['sample_solver']})" if rec.get("sample_solver") and rec["sample_images_per_s"] else rate


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def write_report(out: Path, rows: list[VariantRow], *, title: str, description: str = "",
                 notes: list[str] | None = None, target_bpd: float = 0.0, temperature: float = 1.0) -> Path:
    """report.md, report.json, report.csv and plots/*.png in ``out``; returns report.md."""
    out.mkdir(parents=True, exist_ok=True)
    distinguishing(rows)
    live = [r for r in rows if any(run.ok for run in r.runs)]
    finals = [r.curve[-1]["bpd"] for row in live for r in row.runs if r.curve]
    target = target_bpd or (max(finals) if finals else None)
    first = rows[0]
    records = [row_record(row, first, target) for row in rows]
    write_json_atomic(out / "report.json", {"title": title, "target_bpd": target, "variants": records})
    columns = ["variant", "test_bpd_mean", "test_bpd_std", "train_bpd_mean", "diff_to_first", "diff_ci95", "test_bpd_iw", "params",
               "test_bpd_conditional", "bayes_accuracy", "train_images_per_s", "sample_images_per_s", "steps",
               "peak_memory_mib", "wall_s", "time_to_target_s"]
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
        "| variant | test bits/dim | train bits/dim | Δ vs first | IW | params | train img/s | sample img/s | steps | "
        "peak MiB | wall s | " + (f"time to {target:.3f} bpd (s) |" if target is not None else "time to target (s) |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rec in records:
        bpd = _fmt(rec["test_bpd_mean"]) + (f" ± {rec['test_bpd_std']:.4f}" if rec["test_bpd_std"] else "")
        diff = "" if rec["diff_to_first"] is None else f"{rec['diff_to_first']:+.4f}" + (
            f" ± {rec['diff_ci95']:.4f}" if rec["diff_ci95"] is not None else " (1 seed)")
        reached = rec["time_to_target_s"]
        lines.append(
            f"| {rec['variant']} | {bpd} | {_fmt(rec['train_bpd_mean'])} | {diff} | {_fmt(rec['test_bpd_iw'])} | {_fmt(rec['params'], 0)} | "
            f"{_fmt(rec['train_images_per_s'], 1)} | {_sampling(rec)} | {_fmt(rec['steps'], 0)} | "
            f"{_fmt(rec['peak_memory_mib'], 0)} | "
            f"{_fmt(rec['wall_s'], 1)} | {'not reached' if reached is None and target and rec['seeds'] else _fmt(reached, 1)} |"
        )
    conditional = [rec for rec in records if rec["test_bpd_conditional"] is not None]
    if conditional:
        lines += ["", "Class-conditional variants (data.labels): their test bits/dim above is the marginal, "
                  "-log2 sum_c p(x | c) p(c) / D, the density of the image that an unconditional variant's figure "
                  "is; beside it the conditional -log2 p(x | c) / D under each image's own class and the Bayes "
                  "classifier's test accuracy (means over seeds):", "",
                  "| variant | marginal (above) | conditional | Bayes accuracy |", "| --- | --- | --- | --- |"]
        lines += [f"| {rec['variant']} | {_fmt(rec['test_bpd_mean'])} | {_fmt(rec['test_bpd_conditional'])} | "
                  f"{_fmt(rec['bayes_accuracy'])} |" for rec in conditional]
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
    write_atomic(path, "\n".join(lines) + "\n")
    return path
