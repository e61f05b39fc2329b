"""The sampling options of every command that draws samples (``sample``, ``superres``, ``swap``,
``interpolate``), declared once so that they read and behave the same everywhere.

A command decorated with `sampling_options` receives one keyword argument, ``sampling``, a
`SamplingOptions`::

    @cli.command()
    @click.argument("run_dir", type=click.Path(path_type=Path))
    @sampling_options(n=16, n_help="Pairs to interpolate.")
    def interpolate(run_dir: Path, sampling: SamplingOptions) -> None:
        temperatures = sampling.temperatures_or(session.recipe.sample.temperatures)
        ...

Annealed sampling (``--mcmc``) runs through `flowkit.runs.mcmc.annealed_sample`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from flowkit.runs.mcmc import TARGET_ACCEPT, LevelReport, MCMCSettings

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_MCMC = MCMCSettings()
#: click parameter name -> the option users type, for the MCMC options that need --mcmc.
MCMC_FLAGS = {"mcmc_warmup": "--mcmc-warmup", "mcmc_samples": "--mcmc-samples", "mcmc_step": "--mcmc-step",
              "mcmc_max_depth": "--mcmc-max-depth"}


@dataclass(frozen=True)
class SamplingOptions:
    """What the user asked for, with the command's defaults; empty temperatures and a ``None``
    seed mean the recipe's (`temperatures_or`, `seed_or`)."""

    n: int
    temperatures: tuple[float, ...]
    seed: int | None
    mcmc: MCMCSettings | None  #: None: plain temperature sampling

    def temperatures_or(self, default: Sequence[float]) -> tuple[float, ...]:
        return self.temperatures or tuple(default)

    def seed_or(self, default: int) -> int:
        return default if self.seed is None else self.seed


def sampling_options(*, n: int = 64, n_help: str = "Images to sample.", n_aliases: Sequence[str] = (),
                     temperatures: Sequence[float] | None = None, seed: int | None = None,
                     temperature_help: str = "Sampling temperature T", mcmc: bool = True) -> Callable[[F], F]:
    """Adds ``--n``, ``--temperature`` (repeatable), ``--seed``, ``--mcmc`` and ``--mcmc-warmup``,
    ``--mcmc-samples``, ``--mcmc-step``, ``--mcmc-max-depth`` to a click command, which gets them
    as ``sampling: SamplingOptions``.

    Args:
        n: the default of ``--n``; ``n_help`` its help and ``n_aliases`` other names for it
            (``superres`` keeps its ``--samples``).
        temperatures, seed: the command's own defaults; ``None`` means the recipe's ``[sample]``
            values, which the command resolves with `SamplingOptions.temperatures_or`/``seed_or``.
        temperature_help: what T scales, for commands where it is not the whole latent
            (``swap``: the standard deviation of q(z|x)).
        mcmc: offer ``--mcmc`` and its settings; false for commands whose draws are not from the
            model's latent density (``swap``, ``interpolate``).
    """
    shown_temperatures = "the recipe's" if temperatures is None else ", ".join(f"{t:g}" for t in temperatures)
    shown_seed = "the recipe's" if seed is None else str(seed)
    options = [
        click.option("--n", *n_aliases, "sampling_n", type=click.IntRange(min=1), default=n, show_default=True,
                     help=n_help),
        click.option("--temperature", "sampling_temperatures", type=click.FloatRange(min=0.0), multiple=True,
                     help=f"{temperature_help} (repeatable, one output each; default: {shown_temperatures})."),
        click.option("--seed", "sampling_seed", type=int, default=None,
                     help=f"Seed of the sampling noise (default: {shown_seed})."),
    ]
    mcmc_options = [
        click.option("--mcmc", is_flag=True,
                     help="Annealed sampling: NUTS per level on p^(1/T²) in the latent space (needs the mcmc extra)."),
        click.option("--mcmc-warmup", type=click.IntRange(min=0), default=DEFAULT_MCMC.warmup, show_default=True,
                     help="NUTS iterations adapting the step size (towards acceptance 0.6)."),
        click.option("--mcmc-samples", type=click.IntRange(min=1), default=DEFAULT_MCMC.samples, show_default=True,
                     help="NUTS iterations after adaptation; the last state is the sample."),
        click.option("--mcmc-step", type=click.FloatRange(min=0.0, min_open=True), default=DEFAULT_MCMC.step,
                     show_default=True, help="Initial leapfrog step size."),
        click.option("--mcmc-max-depth", type=click.IntRange(min=1), default=DEFAULT_MCMC.max_depth,
                     show_default=True, help="Maximum NUTS tree depth (at most 2^depth - 1 leapfrog steps)."),
    ]

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs["sampling"] = SamplingOptions(
                n=kwargs.pop("sampling_n"),
                temperatures=tuple(kwargs.pop("sampling_temperatures")) or tuple(temperatures or ()),
                seed=_or(kwargs.pop("sampling_seed"), seed),
                mcmc=_mcmc_settings(kwargs) if mcmc else None,
            )
            return command(*args, **kwargs)

        decorated: Any = wrapper
        for option in reversed(options + (mcmc_options if mcmc else [])):
            decorated = option(decorated)
        return decorated

    return decorate


def _or(given: int | None, default: int | None) -> int | None:
    return default if given is None else given


def _mcmc_settings(kwargs: dict[str, Any]) -> MCMCSettings | None:
    """The ``--mcmc`` settings popped from a command's arguments; None without ``--mcmc``, where
    an ``--mcmc-*`` option given on the command line is refused."""
    annealed = kwargs.pop("mcmc")
    values = {name: kwargs.pop(name) for name in MCMC_FLAGS}
    ctx = click.get_current_context()
    given = [flag for name, flag in MCMC_FLAGS.items() if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
    if given and not annealed:
        raise click.UsageError(f"{', '.join(given)} only apply with --mcmc; add --mcmc or drop them.")
    if not annealed:
        return None
    return MCMCSettings(warmup=values["mcmc_warmup"], samples=values["mcmc_samples"], step=values["mcmc_step"],
                        max_depth=values["mcmc_max_depth"])


def mcmc_progress(n: int) -> Callable[[float, LevelReport], None]:
    """Prints a header now, then each level's chain as it ends (``on_level`` of
    `flowkit.runs.mcmc.annealed_sample`): a level can take minutes on a CPU."""
    from flowkit.cli.console import console

    console.print(f"annealed sampling: one NUTS chain per level on the joint latent of {n} images "
                  f"(γ = 1/T²; adaptation aims at acceptance {TARGET_ACCEPT})", soft_wrap=True)

    def show(temperature: float, report: LevelReport) -> None:
        console.print(f"  T{temperature:g} {report.summary()}", soft_wrap=True)

    return show
