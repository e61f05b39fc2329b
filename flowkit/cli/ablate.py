"""``flowkit ablate ABLATION.toml`` and ``flowkit compare RUN_DIR...``: comparisons with one report."""

from __future__ import annotations

from pathlib import Path

import click

from flowkit.cli.console import console
from flowkit.cli.public import get_plugins


def register(cli: click.Group) -> None:
    @cli.command()
    @click.argument("ablation", type=click.Path(path_type=Path))
    @click.option("--preset", help="A preset of the ablation file (e.g. smoke).")
    @click.option("--out", type=click.Path(path_type=Path), help="Output folder (default runs/ablations/<name>).")
    @click.option("--jobs", type=click.IntRange(min=1), help="Runs at a time with the local executor.")
    @click.option("--executor", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
                  help="local: child processes here; slurm: one job per run through submitit ([slurm] table).")
    @click.option("--cluster", type=click.Choice(["slurm", "local"]),
                  help="With --executor slurm: override [slurm] cluster (local: submitit's jobs run here).")
    @click.option("--retry-failed", is_flag=True, help="Run failed runs again (they are kept failed otherwise).")
    @click.pass_context
    def ablate(ctx: click.Context, ablation: Path, preset: str | None, out: Path | None, jobs: int | None,
               executor: str, cluster: str | None, retry_failed: bool) -> None:
        """Run the variants of ABLATION at one budget over seeds, then write report.md, report.json,
        report.csv and plots. Rerunning resumes: finished runs are kept, interrupted ones resume."""
        from flowkit.runs.ablation import run_ablation

        report = run_ablation(ablation, get_plugins(ctx).registries, preset=preset, out=out, jobs=jobs,
                              executor=executor, cluster=cluster, retry_failed=retry_failed, say=console.print)
        console.print(f"wrote {report}")

    @cli.command()
    @click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
    @click.option("--out", type=click.Path(path_type=Path), default=Path("comparison"), show_default=True)
    @click.option("--temperature", type=float, default=1.0, show_default=True, help="Temperature of the sample mosaic.")
    def compare(run_dirs: tuple[Path, ...], out: Path, temperature: float) -> None:
        """The comparison report of existing RUN_DIRS (runs of one recipe up to the seed are one variant)."""
        from flowkit.runs.ablation import compare as make

        console.print(f"wrote {make(list(run_dirs), out, temperature=temperature)}")
