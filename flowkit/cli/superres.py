"""``flowkit superres RUN_DIR --from-level k``: Wavelet Flow super-resolution strips."""

from __future__ import annotations

from pathlib import Path

import click

from flowkit.cli.console import console


def register(cli: click.Group) -> None:
    @cli.command()
    @click.argument("run_dir", type=click.Path(path_type=Path))
    @click.option("--from-level", "from_level", type=int, required=True,
                  help="Start from the level-k low-pass image (0 = the base resolution).")
    @click.option("--images", default=8, show_default=True, help="Test images (rows).")
    @click.option("--samples", default=4, show_default=True, help="Super-resolved samples per image.")
    @click.option("--temperature", default=0.8, show_default=True, type=float)
    @click.option("--seed", default=0, show_default=True, type=int)
    @click.pass_context
    def superres(ctx: click.Context, run_dir: Path, from_level: int, images: int, samples: int,
                 temperature: float, seed: int) -> None:
        """Reduce test images to level k, sample the details coarse to fine, write a strip:
        low-res input | samples | ground truth."""
        from flowkit.cli.sample import load_trained
        from flowkit.runs.sampling import superres_strip

        rundir, session = load_trained(ctx, run_dir)
        out = rundir.samples / f"superres-from-level{from_level}-T{temperature:g}.png"
        path = superres_strip(session, out, from_level=from_level, n_images=images, n_samples=samples,
                              temperature=temperature, seed=seed)
        console.print(f"wrote {path}")
