"""Sample grids and super-resolution strips from a trained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flowkit.errors import FlowkitError
from flowkit.runs.images import grid, save_png, to_uint8
from flowkit.runs.session import Session


def _fork(session: Session, seed: int):
    devices = [session.device] if session.device.type == "cuda" else []
    rng = torch.random.fork_rng(devices=devices)
    rng.__enter__()
    torch.manual_seed(seed)
    return rng


@torch.no_grad()
def sample_grids(session: Session, out_dir: Path, *, n: int, temperatures: tuple[float, ...] | list[float],
                 seed: int, prefix: str = "samples") -> tuple[list[Path], dict[str, int]]:
    """One PNG grid per temperature: ``<prefix>-T<temperature>.png``; also the number of images
    per temperature whose inverse overflowed (saturated to 0/1 in the grid)."""
    session.model.eval()
    paths = []
    overflowed: dict[str, int] = {}
    for temperature in temperatures:
        rng = _fork(session, seed)
        try:
            y = session.model.sample(n, temperature=float(temperature))
        finally:
            rng.__exit__(None, None, None)
        # An inverse can overflow on some latents (a small affine scale divides, MaCow's
        # row-by-row solve amplifies); those images saturate and are counted, not fatal.
        bad = int((~torch.isfinite(y)).flatten(1).any(1).sum())
        if bad:
            y = torch.nan_to_num(y, nan=1.0, posinf=1.0, neginf=0.0)
        overflowed[f"T{temperature:g}"] = bad
        scale = max(1, 128 // session.dataset.shape[1])
        paths.append(save_png(grid(to_uint8(y, session.n_bits)), out_dir / f"{prefix}-T{temperature:g}.png", scale))
    return paths, overflowed


@torch.no_grad()
def superres_strip(session: Session, out: Path, *, from_level: int, n_images: int, n_samples: int,
                   temperature: float, seed: int) -> Path:
    """Rows: low-res input (upsampled), ``n_samples`` super-resolved samples, ground truth."""
    model = session.model
    if not hasattr(model, "superres"):
        raise FlowkitError(f"model {session.recipe.model.use} has no super-resolution; only wavelet_flow has.")
    model.eval()
    x = session.test_x[:n_images].to(session.device)
    rng = _fork(session, seed)
    try:
        y, _ = session.dequantizer(x, session.n_bits)
        low = model.reduce(y, from_level)
        samples = [model.superres(low, from_level, temperature=temperature) for _ in range(n_samples)]
    finally:
        rng.__exit__(None, None, None)
    h = x.shape[-1]
    up = torch.nn.functional.interpolate(model.low_to_image(low, from_level), size=(h, h), mode="nearest")
    columns = [up] + samples + [(x.float() + 0.5) / 2**session.n_bits]
    rows = []
    for i in range(len(x)):
        rows.extend(to_uint8(torch.stack([c[i] for c in columns]).clamp(0, 1 - 1e-6), session.n_bits))
    scale = max(1, 96 // h)
    return save_png(grid(np.stack(rows), ncol=len(columns)), out, scale)
