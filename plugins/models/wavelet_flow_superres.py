"""``flowkit superres RUN_DIR --from-level k``: super-resolution strips from a trained model that
can sample the missing detail of a low-resolution image (`flowkit.SuperResolution`: Wavelet Flow).

The command comes from this plugin through the ``flowkit_add_commands`` hook, as a third-party
command would; the core knows nothing of super-resolution beyond the capability.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowkit import FlowkitError, SuperResolution, hookimpl


@torch.no_grad()
def superres_strip(session: Any, out: Path, *, from_level: int, n_images: int, n_samples: int,
                   temperature: float, seed: int) -> Path:
    """Rows, one per test image: the low-resolution input (upsampled), ``n_samples``
    super-resolved samples, the ground truth."""
    from flowkit.runs.images import grid, save_png, to_uint8
    from flowkit.runs.sampling import saturate, seeded

    model = session.model
    if not isinstance(model, SuperResolution):
        raise FlowkitError(f"model {session.recipe.model.use} cannot super-resolve (it has no SuperResolution "
                           "capability); wavelet_flow can.")
    if not 0 <= from_level <= model.levels:
        raise FlowkitError(f"--from-level {from_level} is out of range; this model has levels 0..{model.levels}.")
    model.eval()
    x = session.test_x[:n_images].to(session.device)
    with seeded(session, seed):
        y, _ = session.objective.dequantize(x)
        low = model.reduce(y, from_level)
        samples = [saturate(model.superres(low, from_level, temperature=temperature))[0] for _ in range(n_samples)]
    side = x.shape[-1]
    up = torch.nn.functional.interpolate(model.low_to_image(low, from_level), size=(side, side), mode="nearest")
    columns = [up, *samples, (x.float() + 0.5) / 2**session.n_bits]
    rows = []
    for i in range(len(x)):
        rows.extend(to_uint8(saturate(torch.stack([c[i] for c in columns]))[0], session.n_bits))
    return save_png(grid(np.stack(rows), ncol=len(columns)), out, max(1, 96 // side))


@hookimpl
def flowkit_add_commands(cli: Any) -> None:
    import click

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
        from flowkit.cli.console import console
        from flowkit.cli.sample import load_trained

        rundir, session = load_trained(ctx, run_dir)
        out = rundir.samples / f"superres-from-level{from_level}-T{temperature:g}.png"
        path = superres_strip(session, out, from_level=from_level, n_images=images, n_samples=samples,
                              temperature=temperature, seed=seed)
        console.print(f"wrote {path}")
