"""``flowkit score RUN INPUT``: per-image scores of images under a trained run, to CSV; with
``--against OTHER``, how well each score tells the run's test set from OTHER (AUROC)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from flowkit.cli.public import console, get_plugins


def register(cli: click.Group) -> None:
    @cli.command(name="score")
    @click.argument("run_dir", type=click.Path(path_type=Path))
    @click.argument("source")
    @click.option("--out", type=click.Path(path_type=Path), help="CSV of per-image scores (default: RUN_DIR/scores-<INPUT>.csv).")
    @click.option("--against", "other", help="Another set (npz or folder): the AUROC of telling the run's test set "
                                              "from it, by every score.")
    @click.option("--reference", type=click.Path(path_type=Path),
                  help="A second run (a general-domain model) for the likelihood-ratio score.")
    @click.option("--compressor", type=click.Choice(["png", "jpeg2000"]), default="png", show_default=True,
                  help="Lossless compressor of the input-complexity score.")
    @click.option("--seed", type=int, help="Seed of the dequantization noise (default: the run's evaluation seed).")
    @click.option("--json", "as_json", is_flag=True, help="Print the AUROCs (with --against) as JSON.")
    @click.pass_context
    def score(ctx: click.Context, run_dir: Path, source: str, out: Path | None, other: str | None,
              reference: Path | None, compressor: str, seed: int | None, as_json: bool) -> None:
        """Score the images of SOURCE (an .npz, a folder of PNG/JPEG files, or `test`: the run's own
        test set) under the run in RUN_DIR, one CSV row per image: bits/dim, each term's, the
        compressor's bits/dim, input complexity (Serrà et al. 2020) and, with --reference, the
        likelihood ratio (Schirrmeister et al. 2020); higher is less like the training data.
        With --against OTHER, the AUROC of each score at telling the run's test set from OTHER."""
        from flowkit.runs.score import read_images, scores, separation
        from flowkit.runs.trained import TrainedRun, load_trained

        plugins = get_plugins(ctx)
        run = TrainedRun(*load_trained(run_dir, plugins))
        ref = TrainedRun(*load_trained(reference, plugins)) if reference is not None else None

        def images(name: str):  # noqa: ANN202 - uint8 tensor
            return run.test_x if name == "test" else read_images(name, run.shape, run.n_bits)

        mine = scores(run, images(source), compressor=compressor, reference=ref, seed=seed)
        out = out or run.path / f"scores-{Path(source).stem if source != 'test' else 'test'}.csv"
        keys = list(mine)
        with open(out, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["index", *keys])
            for i in range(len(mine["bpd"])):
                writer.writerow([i, *(f"{mine[k][i]:.6f}" for k in keys)])
        console.print(f"wrote {out} ({len(mine['bpd'])} images; mean bits/dim {mine['bpd'].mean():.4f})")
        if other is None:
            return
        inliers = mine if source == "test" else scores(run, run.test_x, compressor=compressor, reference=ref,
                                                       seed=seed)
        outliers = scores(run, images(other), compressor=compressor, reference=ref, seed=seed)
        result = separation(inliers, outliers)
        if as_json:
            click.echo(json.dumps({"inliers": "test", "outliers": other, "auroc": result,
                                   "mean": {k: [float(inliers[k].mean()), float(outliers[k].mean())]
                                            for k in result}}, indent=2))
            return
        table = Table(title=escape(f"telling {run.path.name}'s test set ({len(inliers['bpd'])}) from {other} "
                                   f"({len(outliers['bpd'])}): AUROC, 1 = perfect, 0.5 = chance"))
        table.add_column("score (higher: less like the training data)")
        table.add_column("mean, test set", justify="right")
        table.add_column("mean, other", justify="right")
        table.add_column("AUROC", justify="right")
        for key, value in result.items():
            table.add_row(escape(key), f"{inliers[key].mean():.4f}", f"{outliers[key].mean():.4f}", f"{value:.3f}")
        console.print(table)
