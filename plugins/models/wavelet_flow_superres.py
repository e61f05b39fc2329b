"""``flowkit superres RUN_DIR --from-level k``: super-resolution strips from a trained model that
can sample the missing detail of a low-resolution image (`flowkit.SuperResolution`: Wavelet Flow).

The command comes from this plugin through the ``flowkit_add_commands`` hook, as a third-party
command would; the core knows nothing of super-resolution beyond the capability.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flowkit import hookimpl

if TYPE_CHECKING:
    from flowkit.runs.mcmc import LevelReport, MCMCSettings


@torch.no_grad()
def superres_strip(session: Any, out: Path, *, from_level: int, n_images: int, n_samples: int,
                   temperature: float, seed: int, mcmc: MCMCSettings | None = None,
                   on_level: Callable[[float, LevelReport], None] | None = None) -> tuple[Path, list[LevelReport]]:
    """Rows, one per test image: the low-resolution input (upsampled), ``n_samples``
    super-resolved samples, the ground truth. With ``mcmc``, the samples are annealed
    (`flowkit.runs.mcmc.annealed_sample`, which calls ``on_level``); also each level's report
    (none without ``mcmc``)."""
    from flowkit.runs.images import grid, save_png, to_uint8
    from flowkit.runs.mcmc import annealed_sample, check_can_anneal, require_latent_levels
    from flowkit.runs.sampling import saturate, seeded_draw, super_resolution

    model = super_resolution(session.model, session.recipe.model.use, from_level, "--from-level")
    if mcmc is not None:
        levels = require_latent_levels(model, session.recipe.model.use)
        check_can_anneal([temperature])
        # Latent level j of Wavelet Flow generates I_j: the levels that remain follow from_level.
        remaining = levels.latent_levels()[from_level + 1 :]
    model.eval()
    x = session.test_x[:n_images].to(session.device)
    reports: list[LevelReport] = []
    lows: list[torch.Tensor] = []

    def draw() -> torch.Tensor:
        """Every sample of every image, sample-major: (n_samples * B, C, H, W)."""
        y, _ = session.objective.dequantize(x)
        low = model.reduce(y, from_level)
        lows.append(low)
        if mcmc is None or not remaining:
            return torch.cat([model.superres(low, from_level, temperature=temperature) for _ in range(n_samples)])
        # Annealed: every sample of every image in one chain per level.
        drawn, level_reports = annealed_sample(levels, n_samples * len(low), temperature, mcmc,
                                               given=low.repeat(n_samples, 1, 1, 1), levels=remaining,
                                               on_level=on_level)
        reports.extend(level_reports)
        return drawn

    drawn, _ = seeded_draw(session, draw, seed)
    samples, low = list(drawn.chunk(n_samples)), lows[0]
    side = x.shape[-1]
    up = torch.nn.functional.interpolate(model.low_to_image(low, from_level), size=(side, side), mode="nearest")
    columns = [up, *samples, (x.float() + 0.5) / 2**session.n_bits]
    rows = []
    for i in range(len(x)):
        rows.extend(to_uint8(saturate(torch.stack([c[i] for c in columns]))[0], session.n_bits))
    return save_png(grid(np.stack(rows), ncol=len(columns)), out, max(1, 96 // side)), reports


@hookimpl
def flowkit_add_commands(cli: Any) -> None:
    import click

    from flowkit.cli.public import SamplingOptions, console, load_trained, mcmc_progress, sampling_options

    @cli.command()
    @click.argument("run_dir", type=click.Path(path_type=Path))
    @click.option("--from-level", "from_level", type=int, required=True,
                  help="Start from the level-k low-pass image (0 = the base resolution).")
    @click.option("--images", default=8, show_default=True, help="Test images (rows).")
    @sampling_options(n=4, n_help="Super-resolved samples per image.", n_aliases=("--samples",),
                      temperatures=(0.8,), seed=0)
    @click.pass_context
    def superres(ctx: click.Context, run_dir: Path, from_level: int, images: int, sampling: SamplingOptions) -> None:
        """Reduce test images to level k, sample the details coarse to fine, write a strip per
        temperature: low-res input | samples | ground truth. With --mcmc, the details are annealed
        samples, each level's chain reported here and in a JSON next to the strip."""
        from flowkit.runs.mcmc import write_report
        from flowkit.runs.rundir import grid_name

        rundir, session = load_trained(ctx, run_dir)
        tag = "" if sampling.mcmc is None else "-mcmc"
        on_level = None if sampling.mcmc is None else mcmc_progress(sampling.n * images)
        for temperature in sampling.temperatures:
            out = rundir.samples / grid_name(f"superres-from-level{from_level}{tag}", temperature, ".png")
            path, reports = superres_strip(session, out, from_level=from_level, n_images=images,
                                           n_samples=sampling.n, temperature=temperature,
                                           seed=sampling.seed_or(0), mcmc=sampling.mcmc, on_level=on_level)
            if sampling.mcmc is not None:
                write_report(out.with_suffix(".json"), temperature=temperature, levels=reports,
                             settings=sampling.mcmc, n=sampling.n * images, seed=sampling.seed_or(0),
                             from_level=from_level)
            console.print(f"wrote {path}")
