"""``flowkit sample RUN_DIR``: sample grids from a trained run."""

from __future__ import annotations

from pathlib import Path

import click

from flowkit.cli.console import console


def load_trained(ctx: click.Context, run_dir: Path):  # noqa: ANN201 - (RunDir, Session)
    """The run's recipe rebuilt and its latest weights loaded (no training data needed beyond the test split)."""
    from flowkit.cli import get_plugins
    from flowkit.recipes.load import load_recipe
    from flowkit.runs.checkpoint import latest_checkpoint, load_weights
    from flowkit.runs.rundir import RunDir
    from flowkit.runs.session import build_session

    rundir = RunDir.existing(run_dir)
    plugins = get_plugins(ctx)
    recipe = load_recipe(rundir.recipe_path, plugins.registries)
    session = build_session(recipe, plugins)
    load_weights(latest_checkpoint(rundir.checkpoints), session.modules(), session.device)
    return rundir, session


def register(cli: click.Group) -> None:
    @cli.command()
    @click.argument("run_dir", type=click.Path(path_type=Path))
    @click.option("--n", "n", default=64, show_default=True, help="Images in the grid.")
    @click.option("--temperature", "temperatures", type=float, multiple=True,
                  help="Sampling temperature (repeatable; default: the recipe's).")
    @click.option("--seed", default=None, type=int, help="Seed of the sampling noise.")
    @click.pass_context
    def sample(ctx: click.Context, run_dir: Path, n: int, temperatures: tuple[float, ...], seed: int | None) -> None:
        """Write sample grids (PNG) from the trained model in RUN_DIR."""
        from flowkit.runs.sampling import sample_grids

        rundir, session = load_trained(ctx, run_dir)
        temps = temperatures or session.recipe.sample.temperatures
        paths, overflowed = sample_grids(session, rundir.samples, n=n, temperatures=temps,
                             seed=session.recipe.sample.seed if seed is None else seed, prefix="sample")
        for path in paths:
            console.print(f"wrote {path}")
        for temperature, count in overflowed.items():
            if count:
                console.print(f"{count} of {n} images at {temperature} overflowed in the inverse (saturated).")
