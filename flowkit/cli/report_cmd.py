"""``flowkit report RUN_DIR``: write a finished run's report.md and plots again from its files."""

from __future__ import annotations

from pathlib import Path

import click

from flowkit.cli.console import console


def register(cli: click.Group) -> None:
    @cli.command()
    @click.argument("run_dir", type=click.Path(path_type=Path))
    def report(run_dir: Path) -> None:
        """Regenerate RUN_DIR/report.md with plots (plots/: bits/dim by step, per-level bits/dim,
        sample grids) from summary.json, metrics.jsonl and samples/; plots need matplotlib."""
        from flowkit.runs.report import NO_MATPLOTLIB, write_report
        from flowkit.runs.rundir import RunDir

        path, plots = write_report(RunDir.existing(run_dir))
        console.print(f"wrote {path}")
        if plots is None:
            console.print(NO_MATPLOTLIB)
        for plot in plots or []:
            console.print(f"wrote {plot}")
