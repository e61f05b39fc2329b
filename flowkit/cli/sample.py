"""``flowkit sample RUN_DIR``: sample grids from a trained run."""

from __future__ import annotations

from pathlib import Path

import click

from flowkit.cli.public import SamplingOptions, console, load_trained, mcmc_progress, sampling_options


def register(cli: click.Group) -> None:
    @cli.command()
    @click.argument("run_dir", type=click.Path(path_type=Path))
    @sampling_options(n=64, n_help="Images in the grid.")
    @click.pass_context
    def sample(ctx: click.Context, run_dir: Path, sampling: SamplingOptions) -> None:
        """Write sample grids (PNG) from the trained model in RUN_DIR. With --mcmc, annealed
        samples, each level's chain reported here and in a JSON next to its grid. A directory of
        level jobs (run --level i --out RUN_DIR) is sampled with every level, each from its own
        checkpoint; a missing level is an error naming it."""
        rundir, session = load_trained(ctx, run_dir)
        n = sampling.n
        temps = sampling.temperatures_or(session.recipe.sample.temperatures)
        seed = sampling.seed_or(session.recipe.sample.seed)
        if sampling.mcmc is None:
            from flowkit.runs.sampling import sample_grids

            paths, overflowed = sample_grids(session, rundir.samples, n=n, temperatures=temps, seed=seed,
                                             prefix="sample")
        else:
            from flowkit.runs.mcmc import annealed_grids

            paths, overflowed, _ = annealed_grids(session, rundir.samples, n=n, temperatures=temps, seed=seed,
                                                  settings=sampling.mcmc, on_level=mcmc_progress(n))
        for path in paths:
            console.print(f"wrote {path}")
        for temperature, count in overflowed.items():
            if count:
                console.print(f"{count} of {n} images at {temperature} overflowed in the inverse (saturated).")
