"""``flowkit bench RECIPE``: training, evaluation and sampling speed and memory in one table,
optionally beside a reference implementation the model offers (``--against nflows``: multiscale's
Glow composed from nflows' transforms)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from flowkit.cli.console import console
from flowkit.cli.public import get_plugins
from flowkit.cli.inspect_cmd import _shape


def register(cli: click.Group) -> None:
    @cli.command(name="bench")
    @click.argument("recipe", type=click.Path(path_type=Path))
    @click.option("--preset", help="A preset of the recipe (e.g. smoke, paper).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (repeatable).")
    @click.option("--batch", type=click.IntRange(min=1), help="Images per training step (= --set train.batch_size=B).")
    @click.option("--device", help='Device (= --set train.device=D): "cpu", "cuda", "cuda:1", ...')
    @click.option("--shape", help="Synthetic uint8 images of this shape C,H,W instead of the recipe's dataset.")
    @click.option("--against", metavar="NAME",
                  help="Also time the model's reference implementation NAME, in alternating rounds (multiscale "
                       "offers nflows: the same Glow from nflows' transforms).")
    @click.option("--rounds", type=click.IntRange(min=1), default=6, show_default=True,
                  help="Alternating rounds per implementation (figures: the best and the median).")
    @click.option("--steps", type=click.IntRange(min=1), default=5, show_default=True,
                  help="Training steps (and evaluation batches) per round.")
    @click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object instead of the table.")
    @click.pass_context
    def bench_command(ctx: click.Context, recipe: Path, preset: str | None, overrides: tuple[str, ...],
                      batch: int | None, device: str | None, shape: str | None, against: str | None, rounds: int,
                      steps: int, as_json: bool) -> None:
        """Time RECIPE's training step (the trainer's own: loss, backward, clipping, optimiser),
        its evaluation (log-likelihood without gradients) and its sampling, and measure memory.
        With --against NAME, a reference implementation the model offers (multiscale: nflows, the
        same Glow built from nflows' transforms) with flowkit's weights copied in (their
        log-likelihoods are checked equal) is timed in the same process."""
        from flowkit.bench.side_by_side import run_bench
        from flowkit.bench.table import bench_table
        result = run_bench(recipe, get_plugins(ctx), preset=preset, overrides=overrides, shape=_shape(shape),
                           batch=batch, device=device, against=against, rounds=rounds, steps=steps)
        if as_json:
            click.echo(json.dumps(result.to_dict(), indent=2))
            return
        console.print(bench_table(result))
