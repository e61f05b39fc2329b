"""A run's ``report.md``, made from its files alone: ``summary.json``, ``recipe.toml``,
``metrics.jsonl`` and ``samples/``.

The run engine writes it at the end of every run and ``flowkit report RUN_DIR`` writes it
again (after installing matplotlib, say), so both give the same report. The plots go to
``plots/``: bits/dim by step (training and test), per-level test bits/dim for models whose
terms are densities of their own (Wavelet Flow's levels), and the sample grids. Without
matplotlib the report says so and keeps everything else.

The plots use matplotlib's object API (`matplotlib.figure.Figure`), never pyplot: a report
written from a notebook (`flowkit.train`) must not switch the notebook's backend, which
``matplotlib.use("Agg")`` in the comparison plots (`flowkit.runs.ablation.plots`) would.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from flowkit.errors import FlowkitError
from flowkit.runs.bpd import FIGURE_KEYS, FIGURE_NAMES
from flowkit.runs.images import grid
from flowkit.runs.rundir import RunDir

NO_MATPLOTLIB = ("No plots: matplotlib is not installed (`pip install matplotlib`, or "
                 "`pip install 'flowkit[ablate]'`); `flowkit report RUN_DIR` draws them once it is.")
_TABLE_KEYS = ("test_bpd", "test_noisy_nll", "test_bpd_marginal", "test_bpd_conditional", "test_noisy_nll_marginal",
               "test_noisy_nll_conditional", "bayes_accuracy",
               "class_images", "test_bpd_iw", "iw_samples", "iw_images", "train_bpd", "train_noisy_nll",
               "params", "steps", "train_images_per_s", "peak_memory_bytes", "wall_s", "device", "weights")


def summary_figure(summary: dict[str, Any]) -> tuple[str, str]:
    """The key of a summary's figure and its name in words: ``("bpd", "bits/dim")``, or
    ``("noisy_nll", "noisy-data NLL")`` for a run trained on noisy images
    (`flowkit.runs.bpd.FIGURE_KEYS`; summaries before the key existed are bits/dim)."""
    figure = summary.get("figure", "bits_per_dim")
    return FIGURE_KEYS[figure], FIGURE_NAMES[figure]


def part_rows(summary: dict[str, Any]) -> list[tuple[str, float]]:
    """Per-term figures labelled for what they are (the report and the final table)."""
    key, words = summary_figure(summary)
    rows = [(f"test {words} of {part} (over its own dims)", v) for part, v in summary[f"test_{key}_per_part"].items()]
    shares = summary[f"test_{key}_share_per_part"]
    if len(shares) > 1:
        rows += [(f"share of test {words} from {part} (-log p term / (D log 2))", v) for part, v in shares.items()]
    return rows


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line cut short by a crash is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def finished_summary(rundir: RunDir) -> dict[str, Any]:
    summary = rundir.read_summary()
    if summary.get("status") != "finished":
        state = f'its summary.json says status "{summary["status"]}"' if "status" in summary \
            else "it has no summary.json"
        if summary.get("error"):
            state += f": {summary['error']}"
        raise FlowkitError(f"{rundir.path} holds no finished run ({state}); report.md is written for finished "
                           "runs only.")
    return summary


def write_report(rundir: RunDir) -> tuple[Path, list[Path] | None]:
    """Writes ``report.md`` (and ``plots/``) of a finished run; returns it and the plots drawn
    (None when matplotlib is missing)."""
    summary = finished_summary(rundir)
    recipe = tomllib.loads(rundir.recipe_path.read_text(encoding="utf-8"))
    meta = recipe.get("recipe", {})
    lines = [f"# {meta.get('name', rundir.path.name)}", "", meta.get("description", ""), "",
             "| metric | value |", "| --- | --- |"]
    for key in _TABLE_KEYS:
        if key in summary:
            value = summary[key]
            lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    for label, value in part_rows(summary):
        lines.append(f"| {label} | {value:.4f} |")
    n = recipe.get("sample", {}).get("n", "?")
    for temperature, count in summary.get("samples_overflowed", {}).items():
        lines.append(f"| samples overflowed at {temperature} | {count} of {n} |")
    if summary.get("nonfinite"):
        lines.append(f"| **not finite** | {', '.join(summary['nonfinite'])} |")
    lines += ["", f"Density reported: {summary.get('density', '?')}.", "", "## Plots", ""]
    plots = draw_plots(rundir, summary)
    if plots is None:
        lines += [NO_MATPLOTLIB, ""]
    for path, caption in plots or []:
        lines += [f"![{caption}]({path.relative_to(rundir.path).as_posix()})", ""]
    if summary.get("samples"):
        lines += ["## Sample grids", ""] + [f"![{p}]({p})" for p in summary["samples"]]
    rundir.write_report("\n".join(lines).rstrip("\n") + "\n")
    return rundir.report_path, None if plots is None else [path for path, _ in plots]


def draw_plots(rundir: RunDir, summary: dict[str, Any]) -> list[tuple[Path, str]] | None:
    """The plots that have data, with captions; None when matplotlib is missing. Plots of an
    earlier report are replaced, so none is left over from data that is gone."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    folder = rundir.plots
    folder.mkdir(exist_ok=True)
    for stale in folder.glob("*.png"):
        stale.unlink()
    records = read_metrics(rundir.metrics_path)
    key, words = summary_figure(summary)
    made = [
        (bpd_curve(folder / f"{key}.png", records, key, words), f"{words} by step"),
        (per_level_curves(folder / f"per_level_{key}.png", records, key, words),
         f"test {words} of each level over its own dims"),
        (sample_panels(folder / "samples.png", rundir, summary), "sample grids"),
    ]
    return [(path, caption) for path, caption in made if path is not None]


def _figure(width: float, height: float):  # noqa: ANN202 - matplotlib.figure.Figure
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def bpd_curve(path: Path, records: list[dict[str, Any]], key: str = "bpd", words: str = "bits/dim") -> Path | None:
    """Training bits/dim (the mean over each train.log_every steps), the periodic test
    evaluations (train.eval_every, on train.eval_images) and the final one (the whole test set);
    with ``key = "noisy_nll"`` the noisy images' NLL, so labelled."""
    train_key, test_key = f"train_{key}", f"test_{key}"
    train = [(r["step"], r[train_key]) for r in records if _number(r.get(train_key))]
    periodic = [(r["step"], r[test_key]) for r in records if _number(r.get(test_key)) and not r.get("final")]
    final = [(r["step"], r[test_key]) for r in records if _number(r.get(test_key)) and r.get("final")]
    if not (train or periodic or final):
        return None
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train, strict=True), label="train (mean over train.log_every steps)")
    if periodic:
        ax.plot(*zip(*periodic, strict=True), marker="o", label="test (periodic evaluations)")
    if final:
        ax.plot(*zip(*final, strict=True), linestyle="none", marker="*", markersize=12, label="test (final, all images)")
    ax.set_xlabel("step")
    ax.set_ylabel(words)
    ax.set_title(f"{words[0].upper()}{words[1:]} during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def per_level_curves(path: Path, records: list[dict[str, Any]], key: str = "bpd",
                     words: str = "bits/dim") -> Path | None:
    """One curve per term that is a density of its own (``test_bpd/<term>`` records)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    prefix = f"test_{key}/"
    for r in records:
        for name, value in r.items():
            if name.startswith(prefix) and _number(value):
                curves.setdefault(name.removeprefix(prefix), []).append((r["step"], value))
    if not curves:
        return None
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    for term, points in curves.items():
        ax.plot(*zip(*points, strict=True), marker="o", label=term)
    ax.set_xlabel("step")
    ax.set_ylabel(f"test {words} over the level's own dims")
    ax.set_title(f"Per-level test {words}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def sample_panels(path: Path, rundir: RunDir, summary: dict[str, Any]) -> Path | None:
    """The run's sample grids side by side, each titled with its temperature and how many of its
    images overflowed (from the ``.npy`` written beside each PNG)."""
    panels = []
    overflowed = summary.get("samples_overflowed", {})
    for rel in summary.get("samples", []):
        npy = (rundir.path / rel).with_suffix(".npy")
        if npy.is_file():
            images = np.load(npy)
            label = npy.stem.partition("-")[2]  # samples-T0.7 -> T0.7; samples-noclass-T0.7 -> noclass-T0.7
            kind, _, temperature = label.rpartition("-")  # "", "noclass", "guided2", "denoised"
            count = f", {overflowed[label]} of {len(images)} overflowed" if label in overflowed else ""
            # A class-conditional run's class grids (all but "noclass") have one row per class.
            classes = len(summary.get("classes", ())) if not kind.endswith("noclass") else 0
            ncol = max(1, len(images) // classes) if classes else None
            panels.append((f"{kind + ', ' if kind else ''}T = {temperature[1:]}{count}", grid(images, ncol)))
    if not panels:
        return None
    fig = _figure(3.2 * len(panels), 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, mosaic) in zip(axes, panels, strict=True):
        ax.imshow(mosaic[..., 0] if mosaic.shape[-1] == 1 else mosaic, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
