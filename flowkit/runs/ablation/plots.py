"""The comparison plots (matplotlib, written as PNG): learning curves against training time and
against images seen (seeds shaded between their min and max), final bits/dim with error bars,
per-level bits/dim (models whose terms are densities of their own), a sample mosaic."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowkit.errors import FlowkitError
from flowkit.runs.ablation.results import VariantRow, mean_curve
from flowkit.runs.rundir import RunDir


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise FlowkitError("the comparison plots need matplotlib: pip install 'flowkit[ablate]'.") from None


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def make_all(folder: Path, rows: list[VariantRow], *, temperature: float) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    made = [curves(folder / f"bpd_vs_{x}.png", rows, x) for x in ("train_seconds", "images")]
    made += [final_bpd(folder / "final_bpd.png", rows), per_level(folder / "per_level_bpd.png", rows),
             sample_mosaic(folder / "samples.png", rows, temperature)]
    return [p for p in made if p is not None]


def curves(path: Path, rows: list[VariantRow], x: str) -> Path | None:
    data = [(row.name, mean_curve(row, x)) for row in rows]
    if not any(points for _, points in data):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in data:
        if not points:
            continue
        xs, mean, low, high = (np.array(v) for v in zip(*points, strict=True))
        line, = ax.plot(xs, mean, marker=".", label=name)
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("training seconds" if x == "train_seconds" else "training images seen")
    ax.set_ylabel("test bits/dim (fixed test subset)")
    ax.set_title("Learning curves: mean over seeds, shaded min–max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def final_bpd(path: Path, rows: list[VariantRow]) -> Path | None:
    named = [(row.name, row.values("test_bpd")) for row in rows]
    named = [(n, v) for n, v in named if v]
    if not named:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(named) + 2), 4))
    means = [float(np.mean(v)) for _, v in named]
    errors = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for _, v in named]
    ax.errorbar(range(len(named)), means, yerr=errors, fmt="o", capsize=5)
    for i, (_, values) in enumerate(named):
        ax.scatter([i] * len(values), values, s=10, color="grey", alpha=0.7, zorder=3)
    ax.set_xticks(range(len(named)), [n for n, _ in named], rotation=20, ha="right")
    ax.set_ylabel("test bits/dim (each run's test set)")
    ax.set_title("Final test bits/dim: mean ± std over seeds (grey: each seed)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def per_level(path: Path, rows: list[VariantRow]) -> Path | None:
    """Bits/dim of each term over its own dimensions, for variants whose terms are densities of
    their own (Wavelet Flow's levels); nothing for the others."""
    parts: dict[str, dict[str, float]] = {}
    for row in rows:
        values: dict[str, list[float]] = {}
        for run in row.runs:
            if run.ok:
                for part, v in run.summary.get("test_bpd_per_part", {}).items():
                    values.setdefault(part, []).append(v)
        if values:
            parts[row.name] = {k: float(np.mean(v)) for k, v in values.items()}
    if not parts:
        return None
    plt = _pyplot()
    names = list(parts)
    terms = list(dict.fromkeys(t for p in parts.values() for t in p))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(terms) * len(names) / 2 + 3), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar(np.arange(len(terms)) + i * width, [parts[name].get(t, np.nan) for t in terms], width, label=name)
    ax.set_xticks(np.arange(len(terms)) + 0.4 - width / 2, terms)
    ax.set_ylabel("test bits/dim of the level's own dims")
    ax.set_title("Per-level bits/dim (mean over seeds)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sample_mosaic(path: Path, rows: list[VariantRow], temperature: float, per_row: int = 8) -> Path | None:
    """One row per variant: the first samples of its first finished run at ``temperature``."""
    strips = []
    for row in rows:
        run = next((r for r in row.runs if r.ok and RunDir(r.path).sample_grid(temperature, ".npy").is_file()),
                   None)
        if run is not None:
            strips.append((row.name, np.load(RunDir(run.path).sample_grid(temperature, ".npy"))[:per_row]))
    if not strips:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(strips), 1, figsize=(per_row * 0.9 + 1.5, 1.1 * len(strips) + 0.4), squeeze=False)
    for ax, (name, images) in zip(axes[:, 0], strips, strict=True):
        strip = np.concatenate(list(images), axis=1)
        ax.imshow(strip[..., 0] if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=255)
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"Samples at T = {temperature:g}, one row per variant", fontsize=9)
    fig.tight_layout()
    fig.subplots_adjust(left=0.22)  # room for the variant names
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
