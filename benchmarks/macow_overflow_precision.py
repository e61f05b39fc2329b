"""Is an overflowing MaCow sample the model's or the arithmetic's?

Draws the same latents (the run's sampling seed, float32 noise in both cases) and runs the exact
row-by-row inverse in float32 and in float64, counting the images with a non-finite or huge value.
If float64 (range 1e308, 16 digits) overflows on the same images, the inverse map itself sends
those latents out of range: the recurrence the model learned is unstable there, and no change of
arithmetic (or of code following the same formula, as the reference's does) would avoid it.

    python benchmarks/macow_overflow_precision.py RUN_DIR [--n 64]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flowkit.api import default_plugins
from flowkit.runs.trained import load_trained


def overflowed(y: torch.Tensor) -> torch.Tensor:
    flat = y.flatten(1)
    return ~torch.isfinite(flat).all(1) | (flat.abs().amax(1) > 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--n", type=int, default=64)
    args = parser.parse_args()
    _, session = load_trained(args.run_dir, default_plugins(), device="cpu")
    model, seed = session.model.eval(), session.recipe.sample.seed
    randn_like, randn = torch.randn_like, torch.randn

    # The same draws in both precisions: float32 noise, cast to the model's dtype.
    torch.randn_like = lambda t, **kw: randn_like(t, dtype=torch.float32).to(t.dtype)
    torch.randn = lambda *size, dtype=None, **kw: randn(*size, dtype=torch.float32, **kw).to(dtype or torch.float32)
    print("| T | overflowed, float32 | overflowed, float64 | the same images |")
    print("|---|---|---|---|")
    for temperature in session.recipe.sample.temperatures:
        torch.manual_seed(seed)
        with torch.no_grad():
            single = overflowed(model.float().sample(args.n, temperature))
            torch.manual_seed(seed)
            double = overflowed(model.double().sample(args.n, temperature))
        print(f"| {temperature:g} | {int(single.sum())} | {int(double.sum())} | {bool((single == double).all())} |")


if __name__ == "__main__":
    main()
