"""The pictures of ``flowkit swap`` and ``flowkit interpolate``: test images split into their
global latent z and their local latent (the decoder's latent given z), recombined.

Images enter at their bin centres, ``y = (x + 1/2) / 2^n_bits``, so an image decoded from its
own two latents shows the image itself again, up to rounding. The reference's figures
(XuezheMax/wolf, ``experiments/synthesize.py``: ``switch``, ``interpolate``) use the
posterior mean of z and interpolate linearly, as the default here does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowkit import FlowkitError


def pick_test_images(session: Any, count: int, seed: int, option: str, per_item: int = 1) -> Tensor:
    """``count`` test images chosen at random (by ``seed``), integer-valued, on the session's device."""
    available = len(session.test_x)
    if count < per_item or count > available:
        raise FlowkitError(f"{option} {count // per_item} is out of range: the test set holds {available} images, "
                           f"and each item takes {per_item}; use 1 to {available // per_item}.")
    chosen = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:count]
    return session.test_x[chosen].to(session.device)


def bin_centres(x: Tensor, n_bits: int, like: Tensor) -> Tensor:
    return ((x.double() + 0.5) / 2**n_bits).to(dtype=like.dtype, device=like.device)


def _save(session: Any, tiles: Tensor, ncol: int, path: Path) -> Path:
    """Saturated tiles (`flowkit.runs.sampling.seeded_draw`) as one PNG grid."""
    from flowkit.runs.images import grid, save_png, to_uint8

    images = to_uint8(tiles, session.n_bits)
    side = int(tiles.shape[-1])
    return save_png(grid(np.ascontiguousarray(images), ncol=ncol), path, max(1, 96 // side))


def _weights(model: Any) -> Tensor:
    return model.encoder.head.weight


@torch.no_grad()
def swap_tiles(model: Any, y: Tensor, temperature: float) -> Tensor:
    """``(n + 1)^2`` tiles, row-major: a blank corner and the images across the top, then one row
    per image r: the image, and ``decode(local latent of image c, z of image r)`` for each c."""
    z = model.encode_global(y, temperature)
    local = model.encode_local(y, z)
    n = len(y)
    rows = [torch.cat([torch.ones_like(y[:1]), y])]
    for r in range(n):
        rows.append(torch.cat([y[r : r + 1], model.decode(local, z[r : r + 1].expand(n, -1))]))
    return torch.cat(rows)


@torch.no_grad()
def write_swap_grid(session: Any, model: Any, x: Tensor, out: Path, *, temperature: float, seed: int) -> Path:
    from flowkit.runs.sampling import seeded_draw

    y = bin_centres(x, session.n_bits, _weights(model))
    tiles, _ = seeded_draw(session, lambda: swap_tiles(model, y, temperature), seed)
    return _save(session, tiles, len(y) + 1, out)


@torch.no_grad()
def interpolation_tiles(model: Any, ya: Tensor, yb: Tensor, steps: int, temperature: float) -> tuple[Tensor, Tensor]:
    """Two tile sets, one row per pair (a, b), each row ``a, steps images, b``: z moving linearly
    from a's to b's with a's local latent, and the local latent moving from a's to b's with a's z."""
    z = model.encode_global(torch.cat([ya, yb]), temperature)
    za, zb = z.chunk(2)
    local_a, local_b = model.encode_local(ya, za), model.encode_local(yb, zb)
    t = torch.linspace(0.0, 1.0, steps, dtype=za.dtype, device=za.device)
    z_rows, local_rows = [], []
    for i in range(len(ya)):
        ends = (ya[i : i + 1], yb[i : i + 1])
        fixed_local = [part[i : i + 1].expand(steps, *part.shape[1:]) for part in local_a]
        z_path = za[i] + (zb[i] - za[i]) * t[:, None]
        z_rows.append(torch.cat([ends[0], model.decode(fixed_local, z_path), ends[1]]))
        local_path = [pa[i : i + 1] + (pb[i : i + 1] - pa[i : i + 1]) * t.view(-1, *[1] * (pa.dim() - 1))
                      for pa, pb in zip(local_a, local_b, strict=True)]
        local_rows.append(torch.cat([ends[0], model.decode(local_path, za[i : i + 1].expand(steps, -1)), ends[1]]))
    return torch.cat(z_rows), torch.cat(local_rows)


@torch.no_grad()
def write_interpolation_grids(session: Any, model: Any, xa: Tensor, xb: Tensor, out_dir: Path, *, steps: int,
                              temperature: float, seed: int) -> list[Path]:
    from flowkit.runs.rundir import grid_name
    from flowkit.runs.sampling import seeded_draw

    like = _weights(model)
    ya, yb = bin_centres(xa, session.n_bits, like), bin_centres(xb, session.n_bits, like)
    tiles, _ = seeded_draw(session, lambda: torch.cat(interpolation_tiles(model, ya, yb, steps, temperature)), seed)
    z_tiles, local_tiles = tiles.chunk(2)
    return [_save(session, z_tiles, steps + 2, out_dir / grid_name("interpolate-z", temperature, ".png")),
            _save(session, local_tiles, steps + 2, out_dir / grid_name("interpolate-local", temperature, ".png"))]
