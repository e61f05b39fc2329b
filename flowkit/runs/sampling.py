"""Drawing images from a trained model: `seeded_draw` is the one sequence every sampler uses (a
seeded draw, overflowed images saturated and counted), `sample_grids` writes the grids of a run,
`denoise` is the score-based denoising step of a model trained on noisy images, and
`solving` the solver of sequential inverses (TarFlow's) a draw runs with."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowkit.contracts.transform import InverseSolver, use_inverse_solver
from flowkit.errors import FlowkitError
from flowkit.runs.images import grid, save_png, to_uint8
from flowkit.runs.metrics import MetricsSink
from flowkit.runs.rundir import grid_name
from flowkit.runs.session import Session


@contextmanager
def seeded(session: Session, seed: int) -> Iterator[None]:
    """Draws from ``seed`` without disturbing the global random state."""
    devices = [session.device] if session.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def saturate(y: Tensor) -> tuple[Tensor, int]:
    """Samples on the data scale to images in ``[0, 1)``, and how many overflowed.

    Models return samples unclamped. An inverse can overflow on some latents (a small affine
    scale divides, MaCow's row-by-row solve amplifies, most of all in an under-trained model at
    temperature 1): such an image, one with a non-finite value, is counted; every value is
    saturated into ``[0, 1)`` (+inf and NaN -> 1, so that a diverged image shows white, not as
    background; -inf -> 0), so one bad image never spoils a grid.
    """
    finite = torch.isfinite(y)
    overflowed = int((~finite).flatten(1).any(1).sum())
    y = torch.where(finite, y, ((y > 0) | torch.isnan(y)).to(y.dtype))
    below_one = torch.nextafter(torch.ones((), dtype=y.dtype), torch.zeros((), dtype=y.dtype)).to(y.device)
    return torch.minimum(y.clamp(min=0.0), below_one), overflowed


@torch.no_grad()
def seeded_draw(session: Session, draw: Callable[[], Tensor], seed: int) -> tuple[Tensor, int]:
    """``draw()`` run from ``seed`` without disturbing the global random state, its images
    saturated into ``[0, 1)`` and the overflowed ones counted (`saturate`): what sample grids,
    ``run.sample``, super-resolution strips and the VAE-flow's grids all draw through. Convert
    the result with `flowkit.runs.images.to_levels` (data levels) or ``to_uint8`` (pixels)."""
    with seeded(session, seed):
        return saturate(draw())


def denoise(session: Session, y: Tensor, context: Tensor | None = None) -> Tensor:
    r"""One step of score-based denoising, ``y + σ² ∇_y \log p(y)``, with σ the standard
    deviation of the run's Gaussian noise (``dequantizer.noise_std``).

    A model trained on ``y = x + σ ε`` is a density of noisy images, and its samples are noisy;
    by Tweedie's formula ``E[x | y] = y + σ² ∇_y \log p(y)`` (Efron 2011), so one gradient step
    of the model's own log-density gives the posterior mean of the clean image: TarFlow's
    post-training denoising (apple/ml-tarflow ``sample.ipynb``: ``x - lr ∇ loss`` with
    ``lr = B D σ²`` on its per-dimension mean loss, the same step). ``context``: the model's
    context (a class one-hot), if it takes one. A `FlowkitError` for a run whose noise is not
    Gaussian (uniform noise: nothing to remove)."""
    sigma = session.dequantizer.noise_std
    if sigma is None:
        raise FlowkitError(f'denoising needs a model trained with Gaussian noise (dequantizer.use = "gaussian"); this '
                           f'run\'s dequantizer "{session.recipe.dequantizer.use}" declares no noise_std.')
    with torch.enable_grad():
        v = y.detach().requires_grad_(True)
        log_p = session.model.log_prob(v) if context is None else session.model.log_prob(v, context)
        (score,) = torch.autograd.grad(log_p.sum(), v)
    return (y + sigma**2 * score).detach()


@contextmanager
def solving(session: Session, solver: InverseSolver | None) -> Iterator[None]:
    """While inside, the model's sequential inverses (TarFlow's steps) use ``solver`` (None: the
    recipe's [sample] settings); models that invert in closed form are unaffected."""
    with use_inverse_solver(solver or session.recipe.sample.inverse_solver(), session.model):
        yield


@torch.no_grad()
def sample_grids(session: Session, out_dir: Path, *, n: int, temperatures: tuple[float, ...] | list[float],
                 seed: int, prefix: str = "samples", metrics: MetricsSink | None = None,
                 step: int = 0, draw: Callable[[float], Tensor] | None = None,
                 solver: InverseSolver | None = None, denoised: bool = False,
                 seconds: dict[str, float] | None = None, ncol: int | None = None,
                 ) -> tuple[list[Path], dict[str, int]]:
    """One PNG grid per temperature: ``<prefix>-T<temperature>.png``; also the number of images
    per temperature whose inverse overflowed (`saturate`). With ``metrics`` (a run's sink), each
    grid is also logged as image ``<prefix>/T<temperature>`` at ``step``. ``draw(temperature)``
    replaces ``model.sample(n, temperature)`` (annealed sampling, `flowkit.runs.mcmc`; a class-
    conditional run's draws by class, `flowkit.runs.classes`); ``ncol``: images per grid row
    (default: a square grid).
    ``solver``: how sequential inverses are solved (None: the recipe's). ``denoised``: every
    draw is denoised (`denoise`) before it is saturated, into ``<prefix>-denoised-T<t>.png``;
    the same seed draws the same images as without, so the grids pair up. ``seconds``: filled
    with each draw's wall time by ``T<temperature>`` (the run's sampling images/s)."""
    session.model.eval()
    draw = draw or (lambda temperature: session.model.sample(n, temperature=temperature))
    if denoised:
        plain, prefix = draw, f"{prefix}-denoised"
        draw = lambda temperature: denoise(session, plain(temperature))  # noqa: E731
    paths = []
    overflowed: dict[str, int] = {}
    for temperature in temperatures:
        tick = time.perf_counter()
        with solving(session, solver):
            y, overflowed[f"T{temperature:g}"] = seeded_draw(session, lambda t=float(temperature): draw(t), seed)
        if seconds is not None:
            seconds[f"T{temperature:g}"] = time.perf_counter() - tick
        scale = max(1, 128 // session.dataset.shape[1])
        images = to_uint8(y, session.n_bits)
        mosaic = grid(images, ncol)
        paths.append(save_png(mosaic, out_dir / grid_name(prefix, temperature, ".png"), scale))
        if metrics is not None:
            metrics.image(f"{prefix}/T{temperature:g}", mosaic, step)
        np.save(out_dir / grid_name(prefix, temperature, ".npy"), images)  # NHWC uint8, for comparison mosaics
    return paths, overflowed


def super_resolution(model: Any, name: str, level: int, option: str = "level") -> Any:
    """``model`` as a `SuperResolution` model that can start at ``level``, or a `FlowkitError`
    naming the model (``name``, its recipe's ``use``) or the ``option`` that is out of range."""
    from flowkit.contracts.model import SuperResolution
    from flowkit.errors import FlowkitError

    if not isinstance(model, SuperResolution):
        raise FlowkitError(f"model {name} cannot super-resolve (it has no SuperResolution capability); "
                           "wavelet_flow can.")
    if not 0 <= level <= model.levels:
        raise FlowkitError(f"{option} {level} is out of range; this model has levels 0..{model.levels}.")
    return model
