"""``flowkit run``: train, evaluate and sample one recipe, with a progress bar and a summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from flowkit.cli.console import console
from flowkit.cli.public import get_plugins, progress_enabled
from flowkit.runs.bpd import FIGURE_KEYS
from flowkit.runs.report import part_rows, summary_figure


class RichReporter:
    """Progress bar with bpd, images/s and ETA; plain lines when not on a terminal."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task = None
        self.by_time = False
        self.total_seconds = 0.0
        self.last_line = 0.0

    def start(self, total_steps: int | None, total_seconds: float | None, done_steps: int) -> None:
        self.by_time = total_steps is None
        self.total_seconds = total_seconds or 0.0
        total = total_seconds if self.by_time else total_steps
        if progress_enabled():
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=total, info="", completed=0 if self.by_time else done_steps)
        else:
            budget = f"{total_steps} steps" if total_steps else ""
            if total_seconds:
                budget += (" or " if budget else "") + f"{total_seconds / 60:g} minutes"
            console.print(f"Training for {budget} (from step {done_steps}).")

    def step(self, step: int, metrics: dict[str, float]) -> None:
        name = next(k for k in FIGURE_KEYS.values() if k in metrics)  # bpd, or noisy_nll for noisy images
        info = f"step {step}  {name} {metrics[name]:.3f}  {metrics['images_per_s']:.0f} img/s"
        if self.progress is not None:
            completed = min(metrics["train_seconds"], self.total_seconds) if self.by_time else step
            self.progress.update(self.task, completed=completed, info=info)
        elif metrics["train_seconds"] - self.last_line >= 30:
            self.last_line = metrics["train_seconds"]
            console.print(f"{info}  ({metrics['train_seconds']:.0f} s)")

    def message(self, text: str) -> None:
        console.print(text)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def summary_table(summary: dict[str, Any], run_dir: Path) -> Table:
    table = Table(title=f"{summary['recipe']} → {run_dir}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    key, words = summary_figure(summary)
    table.add_row(f"test {words}", fmt(summary[f"test_{key}"]))
    if "test_bpd_iw" in summary:
        table.add_row(f"test bits/dim, importance-weighted ({summary['iw_samples']} samples, "
                      f"{summary['iw_images']} images)", fmt(summary["test_bpd_iw"]))
    if f"test_{key}_marginal" in summary:  # a class-conditional run: the image's own density, the classifier
        images = f"{summary['class_images']:,} images"
        table.add_row(f"test {words}, marginal over classes ({images})", fmt(summary[f"test_{key}_marginal"]))
        table.add_row(f"Bayes classifier accuracy ({images})", f"{summary['bayes_accuracy']:.1%}")
    if "weights" in summary:
        table.add_row("evaluated weights", summary["weights"])
    table.add_row(f"train {words}", fmt(summary[f"train_{key}"]))
    for label, value in part_rows(summary):
        table.add_row(f"  {label}", fmt(value))
    table.add_row("parameters", f"{summary['params']:,}")
    table.add_row("steps", str(summary["steps"]))
    table.add_row("train images/s", f"{summary['train_images_per_s']:.0f}")
    table.add_row("peak memory", f"{summary['peak_memory_bytes'] / 2**20:.0f} MiB ({summary['peak_memory_kind']})")
    table.add_row("wall time", f"{summary['wall_s']:.1f} s")
    table.add_row("device", summary["device"])
    for path in summary.get("samples", []):
        table.add_row("samples", path)
    for temperature, count in summary.get("samples_overflowed", {}).items():
        table.add_row(f"samples overflowed at {temperature}", str(count))
    return table


def register(cli: click.Group) -> None:
    @cli.command()
    @click.argument("recipe", required=False, type=click.Path(path_type=Path))
    @click.option("--preset", help="Apply a named preset of the recipe (e.g. smoke, paper).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a recipe key, e.g. --set train.lr=3e-4 (repeatable).")
    @click.option("--level", type=int,
                  help="Train one term alone, for models whose terms are densities of their own "
                       "(a Wavelet Flow level; 0 = base). With --out DIR: a level job, into DIR/levels/<level>/ "
                       "beside the jobs of the other levels (run them at once, in other processes or on "
                       "other machines); the last to finish evaluates and samples the whole model.")
    @click.option("--out", type=click.Path(path_type=Path), help="Run directory (default runs/<name>-<time>).")
    @click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
    @click.option("--resume", type=click.Path(path_type=Path), help="Continue the run in this directory.")
    @click.option("--from-checkpoint", "from_checkpoint", metavar="step-N",
                  help="With --resume: continue from this kept checkpoint (a checkpoints/step-* folder) "
                       "instead of the latest, e.g. when the latest is damaged.")
    @click.option("--iw-samples", "iw_samples", type=click.IntRange(min=0), default=None,
                  help="Also report the importance-weighted test bits/dim with k samples (= --set eval.iw_samples=k).")
    @click.pass_context
    def run(ctx: click.Context, recipe: Path | None, preset: str | None, overrides: tuple[str, ...],
            level: int | None, out: Path | None, overwrite: bool, resume: Path | None, from_checkpoint: str | None,
            iw_samples: int | None) -> None:
        """Train, evaluate (bits/dim) and sample the model of RECIPE."""
        from flowkit.runs import distributed
        from flowkit.runs.run import start_run
        from flowkit.runs.trainer import SilentReporter

        if resume is None and recipe is None:
            raise click.UsageError("give a RECIPE file, or --resume RUN_DIR.")
        if resume is not None and (recipe or preset or overrides or level is not None or out or iw_samples is not None):
            raise click.UsageError("--resume continues a run with its own recipe.toml; "
                                   "it takes no RECIPE, --preset, --set, --level, --iw-samples or --out.")
        if from_checkpoint is not None and resume is None:
            raise click.UsageError("--from-checkpoint picks the checkpoint --resume RUN_DIR continues from; "
                                   "give --resume too.")
        if level is not None:
            overrides = (*overrides, f"train.level={level}")
        if iw_samples is not None:  # a recipe value like any other, so recipe.toml records it
            overrides = (*overrides, f"eval.iw_samples={iw_samples}")
        plugins = get_plugins(ctx)
        main = distributed.is_main()  # under torchrun, rank 0 alone reports; the others train quietly
        try:
            run_dir, summary = start_run(recipe, plugins, RichReporter() if main else SilentReporter(), preset=preset,
                                         overrides=overrides, out=out, overwrite=overwrite, resume=resume,
                                         from_checkpoint=from_checkpoint)
        finally:
            distributed.shutdown()
        if main and run_dir is not None:
            console.print(summary_table(summary, run_dir.path))
