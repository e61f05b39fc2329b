"""``flowkit sample RUN_DIR``: sample grids from a trained run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from flowkit.cli.public import SamplingOptions, console, load_trained, mcmc_progress, sampling_options
from flowkit.runs.session import Session


def register(cli: click.Group) -> None:
    @cli.command()
    @click.argument("run_dir", type=click.Path(path_type=Path))
    @sampling_options(n=64, n_help="Images in the grid.")
    @click.option("--solver", type=click.Choice(["sequential", "jacobi"]), default=None,
                  help="How steps that invert position by position (TarFlow's) solve their inverse: sequential "
                       "(exact, one net call per token) or jacobi (all tokens at once, iterated) (default: the "
                       "recipe's sample.solver).")
    @click.option("--jacobi-tol", type=click.FloatRange(min=0.0), default=None,
                  help="--solver jacobi: stop when no value moves by more than this (default: sample.jacobi_tol).")
    @click.option("--jacobi-max-iter", type=click.IntRange(min=0), default=None,
                  help="--solver jacobi: at most this many iterations per step, 0: as many as tokens (default: "
                       "sample.jacobi_max_iter).")
    @click.option("--denoise", is_flag=True,
                  help="One step of score-based denoising, y + sigma^2 grad log p(y), for a run trained with Gaussian "
                       "noise (dequantizer gaussian; TarFlow's denoising): grids sample-denoised-T<t>.png.")
    @click.option("--class", "class_", default=None, metavar="C",
                  help="A class-conditional run: draw class C (an index, a class name, or 'none' for the "
                       "unconditional model); default: one grid row per class, and a 'no class' grid.")
    @click.option("--guidance", type=float, default=None, metavar="W",
                  help="A class-conditional run: classifier-free guidance h = h_c + W (h_c - h_u) on every "
                       "net's output (0: plain conditional sampling); a guided sample has no exact density.")
    @click.pass_context
    def sample(ctx: click.Context, run_dir: Path, sampling: SamplingOptions, solver: str | None,
               jacobi_tol: float | None, jacobi_max_iter: int | None, denoise: bool, class_: str | None,
               guidance: float | None) -> None:
        """Write sample grids (PNG) from the trained model in RUN_DIR. With --mcmc, annealed
        samples, each level's chain reported here and in a JSON next to its grid. A directory of
        level jobs (run --level i --out RUN_DIR) is sampled with every level, each from its own
        checkpoint; a missing level is an error naming it. --solver and --denoise are for
        TarFlow-like models (sequential inverses) and runs trained on noisy images. A
        class-conditional run (data.labels) samples by class: --class and --guidance."""
        if sampling.mcmc is not None and (denoise or solver):
            raise click.UsageError("--denoise and --solver apply to plain sampling; drop them or --mcmc.")
        rundir, session = load_trained(ctx, run_dir)
        n = sampling.n
        temps = sampling.temperatures_or(session.recipe.sample.temperatures)
        seed = sampling.seed_or(session.recipe.sample.seed)
        settings = session.recipe.sample
        chosen = {k: v for k, v in (("solver", solver), ("jacobi_tol", jacobi_tol),
                                    ("jacobi_max_iter", jacobi_max_iter)) if v is not None}
        inverse = dataclasses.replace(settings, **chosen).inverse_solver()
        if session.conditioning is not None or class_ is not None or guidance is not None:
            from flowkit.runs.classes import class_grids

            labels = pick_class(session, class_, guidance, mcmc=sampling.mcmc is not None)
            paths, overflowed = class_grids(session, rundir.samples, n=n, temperatures=temps, seed=seed,
                                            prefix="sample" if class_ is None else f"sample-class{class_}",
                                            labels=labels, guidance=() if guidance is None else (guidance,),
                                            solver=inverse, denoised=denoise)
        elif sampling.mcmc is None:
            from flowkit.runs.sampling import sample_grids

            paths, overflowed = sample_grids(session, rundir.samples, n=n, temperatures=temps, seed=seed,
                                             prefix="sample", solver=inverse, denoised=denoise)
        else:
            from flowkit.runs.mcmc import annealed_grids

            paths, overflowed, _ = annealed_grids(session, rundir.samples, n=n, temperatures=temps, seed=seed,
                                                  settings=sampling.mcmc, on_level=mcmc_progress(n))
        for path in paths:
            console.print(f"wrote {path}")
        for temperature, count in overflowed.items():
            if count:
                console.print(f"{count} images of the grid {temperature} overflowed in the inverse (saturated).")


def pick_class(session: Session, class_: str | None, guidance: float | None, *, mcmc: bool) -> int | None | str:
    """--class as class_grids takes it: "rows" (every class, a row each), an index, or None ("none")."""
    conditioning = session.conditioning
    if conditioning is None:
        option = "--class" if class_ is not None else "--guidance"
        raise click.UsageError(f"{option}: this run of {session.recipe.model.use} is not class-conditional "
                               "(data.labels = false in its recipe.toml).")
    if mcmc:
        raise click.UsageError("--mcmc samples the unconditional density; it does not combine with a "
                               "class-conditional run's class sampling.")
    if class_ is None:
        return "rows"
    names = [str(c) for c in session.dataset.classes]
    if class_.lower() == "none":
        if guidance is not None:
            raise click.UsageError('--guidance steers a class away from "no class": give --class a class.')
        return None
    if class_ in names:
        return names.index(class_)
    if class_.isdigit() and int(class_) < conditioning.num_classes:
        return int(class_)
    raise click.UsageError(f"--class {class_} is not a class of this run; classes: "
                           f"{', '.join(f'{i} ({name})' for i, name in enumerate(names))}, or none.")
