"""A trained run loaded back: its resolved recipe rebuilt and its latest weights in place.

`load_trained` is the one way to load a trained run: ``flowkit sample``, the wavelet_flow
plugin's ``flowkit superres`` and the Python API (`flowkit.load_run` -> `TrainedRun`) use it.

Images in the Python API are data levels: uint8 tensors ``(B, C, H, W)`` with values
``0 .. 2^n_bits - 1``, the integers the model is a density of (``run.test_x`` holds the test
set so; with ``n_bits = 8`` they are ordinary 0..255 images). Every random draw is seeded, by
default with the seed the run itself used, so a loaded run reproduces the run's figures.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from flowkit.contracts.transform import InverseSolver
from flowkit.errors import FlowkitError, ShapeError
from flowkit.plugins import Plugins
from flowkit.recipes.load import Recipe, load_recipe
from flowkit.runs.bpd import bits_per_dim_to_nats, discrete_nll, figure_key
from flowkit.runs.checkpoint import latest_checkpoint, load_weights
from flowkit.runs.data import Split
from flowkit.runs.evaluate import per_image
from flowkit.runs.images import to_levels
from flowkit.runs.level_jobs import is_level_jobs_dir, load_levels
from flowkit.runs.rundir import RunDir
from flowkit.runs.sampling import denoise as denoise_step
from flowkit.runs.sampling import seeded_draw, solving, super_resolution
from flowkit.runs.score import scores
from flowkit.runs.session import Session, build_session


def load_trained(run_dir: Path, plugins: Plugins, *, device: str | torch.device | None = None
                 ) -> tuple[RunDir, Session]:
    """The run's recipe rebuilt and its latest weights loaded, in eval mode, on ``device`` (default:
    the recipe's train.device). With train.ema the averaged weights are loaded, as the run
    evaluated and sampled with them. The caller's random state and torch thread count are left as
    they were (building a session seeds torch and sets the thread count for training).

    A directory of level jobs (`flowkit.runs.level_jobs`) loads each level from its own job's
    checkpoint; a level that has not finished is a `FlowkitError` naming it and the command
    line that trains it."""
    rundir = RunDir.existing(run_dir)
    recipe = load_recipe(rundir.recipe_path, plugins.registries)
    if device is not None:
        recipe = recipe.replace(train=dataclasses.replace(recipe.train, device=str(device)))
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            session = build_session(recipe, plugins)
    finally:
        torch.set_num_threads(threads)
    if is_level_jobs_dir(rundir.path):  # `--level i --out DIR` jobs: each level from its own checkpoint
        load_levels(session, rundir.path)
    else:
        load_weights(latest_checkpoint(rundir.checkpoints), session.modules(), session.device)
    if session.average is not None:  # train.ema: the run evaluated and sampled with the average
        session.average.copy_to_weights()
    session.model.eval()
    session.dequantizer.eval()
    return rundir, session


class Samples(NamedTuple):
    """Images drawn from a model, and how many of them overflowed."""

    images: Tensor  #: (n, C, H, W) uint8 data levels 0..2^n_bits - 1, on the CPU
    overflowed: int  #: images whose inverse overflowed (non-finite), saturated (`flowkit.runs.sampling.saturate`)


class TrainedRun:
    """A trained run for use from Python (`flowkit.load_run`).

    Attributes: ``path``, ``recipe`` (the resolved `Recipe`), ``model`` and ``dequantizer`` (on
    ``device``, in eval mode), ``n_bits``, ``shape`` ``(C, H, W)``, ``test_x`` (the test set as
    data levels, read whole), ``test_labels`` (its labels when the run read labels, else None),
    ``test_split`` (the test set read per batch: a `flowkit.runs.data.Split`) and ``summary``
    (summary.json; empty for a run that has not finished).

    The density: ``log_prob(x)`` is the dequantized bound the run reports, in nats per image,

        log P(x) >= log p(y) - D log 2^n_bits - log q(u | x),   y = (x + u) / 2^n_bits,

    for one draw of the dequantization noise u (uniform, or the recipe's learned dequantizer),
    seeded; ``bpd(x) = -log_prob(x) / (D log 2)``. With the default seed, ``bpd(run.test_x).mean()``
    is the run's ``test_bpd`` (same noise, same batches; see `flowkit.runs.evaluate.evaluate`).

    Example:
        >>> run = flowkit.load_run("runs/wavelet_flow_affine-20261123-101500")  # doctest: +SKIP
        >>> run.bpd(run.test_x[:100]).mean()  # doctest: +SKIP
        >>> images, overflowed = run.sample(16, temperature=0.7)  # doctest: +SKIP

    A class-conditional run (data.labels): ``bpd(x, labels)`` is ``-log2 p(x | c) / D``, and
    without labels the "no class" model's; ``sample(n, T, labels=3, guidance=2.0)`` draws a class,
    guided; ``classify(x)`` gives the Bayes classifier's classes and ``log p(x | c)`` per class.
    """

    def __init__(self, rundir: RunDir, session: Session) -> None:
        self.session = session
        self.path = rundir.path
        self.summary: dict[str, Any] = rundir.read_summary()

    @property
    def recipe(self) -> Recipe:
        return self.session.recipe

    @property
    def model(self) -> torch.nn.Module:
        return self.session.model

    @property
    def dequantizer(self) -> torch.nn.Module:
        return self.session.dequantizer

    @property
    def device(self) -> torch.device:
        return self.session.device

    @property
    def n_bits(self) -> int:
        return self.session.n_bits

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.session.dataset.shape

    @property
    def test_x(self) -> Tensor:
        """The whole test set as one uint8 tensor of data levels (reads it; `test_split` does not)."""
        return self.session.test_x.all()

    @property
    def test_labels(self) -> Tensor | None:
        """The test set's labels, a LongTensor, when the run read labels (data.labels); else None."""
        return self.session.test_x.labels_at(slice(None))

    @property
    def test_split(self) -> Split:
        return self.session.test_x

    def __repr__(self) -> str:
        return (f"TrainedRun({str(self.path)!r}, model={self.recipe.model.use!r}, shape={self.shape}, "
                f"n_bits={self.n_bits}, device={str(self.device)!r})")

    # -- density ---------------------------------------------------------------------------
    @torch.no_grad()
    def per_image(self, x: Tensor | np.ndarray, labels: Tensor | np.ndarray | None = None, *,
                  seed: int | None = None) -> dict[str, Tensor]:
        """Every image's bits/dim, ``(B,)`` float64 on the CPU, by key: ``bpd`` (see the class
        docstring) and ``bpd/<term>`` (each term over its own dims, for models whose terms are
        densities of their own) or ``bpd_share/<term>`` (`flowkit.runs.evaluate.per_image`); for a
        run trained on noisy images (a ``noisy_nll`` dequantizer) the same keys say ``noisy_nll``.
        ``labels``: class indices ``(B,)`` (K for "no class") that condition a class-conditional
        model; an unconditional model ignores them. ``seed``: of the dequantization noise;
        default the run's test-evaluation seed."""
        x = self._levels_in(x, self.shape, "x")
        labels = self._labels_in(labels, len(x))
        seed = self.recipe.train.seed + 1 if seed is None else seed
        out: dict[str, list[Tensor]] = {}
        for values in per_image(self.session, x, labels, batch_size=self.recipe.train.eval_batch_size, seed=seed):
            for key, value in values.items():
                out.setdefault(key, []).append(value.cpu())
        if not out:
            return {self._figure: torch.zeros(0, dtype=torch.float64)}
        return {key: torch.cat(parts) for key, parts in out.items()}

    @property
    def _figure(self) -> str:
        return figure_key(self.dequantizer.figure)

    def bpd(self, x: Tensor | np.ndarray, labels: Tensor | np.ndarray | None = None, *,
            seed: int | None = None) -> Tensor:
        """Bits/dim of each image, ``(B,)`` float64 on the CPU (see the class docstring), given
        ``labels`` for a class-conditional model (`per_image`). ``seed``: of the dequantization
        noise; default the run's test-evaluation seed. A run trained on noisy images has no
        bits/dim (a `FlowkitError`): see `noisy_nll`."""
        if self._figure != "bpd":
            raise FlowkitError(f"this run was trained on noisy images (dequantizer {self.recipe.dequantizer.use}, "
                               "whose noise leaves each pixel's bin): its density bounds no bits/dim of the images. "
                               "run.noisy_nll(x) gives the noisy images' NLL.")
        return self.per_image(x, labels, seed=seed)["bpd"]

    def noisy_nll(self, x: Tensor | np.ndarray, labels: Tensor | np.ndarray | None = None, *,
                  seed: int | None = None) -> Tensor:
        """For a run trained on noisy images (a ``noisy_nll`` dequantizer): each image's noisy-data
        NLL in bits per dimension of the noisy image, one noise draw from ``seed``, ``(B,)``
        float64 on the CPU, given ``labels`` for a class-conditional model; the run's
        ``test_noisy_nll`` is its mean over the test set."""
        if self._figure != "noisy_nll":
            raise FlowkitError(f"dequantizer {self.recipe.dequantizer.use}'s noise stays in each pixel's bin: this "
                               "run's figure is bits/dim, run.bpd(x).")
        return self.per_image(x, labels, seed=seed)["noisy_nll"]

    def score(self, x: Tensor | np.ndarray, *, compressor: str = "png", reference: TrainedRun | None = None,
              seed: int | None = None) -> dict[str, np.ndarray]:
        """Per-image scores for telling images unlike the training data apart: bits/dim, per term,
        the compressor's bits/dim, input complexity and, with a ``reference`` run, the likelihood
        ratio (`flowkit.runs.score`; ``flowkit score`` from the command line)."""
        return scores(self, self._levels_in(x, self.shape, "x"), compressor=compressor, reference=reference,
                      seed=seed)

    def log_prob(self, x: Tensor | np.ndarray, labels: Tensor | np.ndarray | None = None, *,
                 seed: int | None = None) -> Tensor:
        """The dequantized bound on log P(x) in nats per image, ``(B,)`` float64 (class docstring),
        given ``labels`` for a class-conditional model; for a run trained on noisy images, the
        log-density of one noisy draw of x (on the data-level scale), which bounds nothing."""
        c, h, w = self.shape
        return -bits_per_dim_to_nats(self.per_image(x, labels, seed=seed)[self._figure], c * h * w)

    # -- sampling --------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, *, seed: int | None = None, solver: InverseSolver | None = None,
               denoise: bool = False, labels: Tensor | np.ndarray | int | None = None,
               guidance: float | None = None) -> Samples:
        """``n`` images at ``temperature``; ``seed`` default: the recipe's sample.seed, so that
        ``sample(sample.n, T)`` gives the run's own grid at T. ``solver``: how sequential
        inverses (TarFlow's) are solved (None: the recipe's [sample] settings); ``denoise``: one
        score-based denoising step (`flowkit.runs.sampling.denoise`; runs trained with Gaussian noise;
        a class-conditional draw is denoised by its class's density).
        A class-conditional run draws class ``labels`` (an int, or one per image; None: "no class"),
        with classifier-free ``guidance`` ``w`` when given (``h = h_c + w (h_c - h_u)``; a guided
        sample has no exact density)."""
        if n < 1:
            raise FlowkitError(f"n = {n}: ask for at least one sample.")
        seed = self.recipe.sample.seed if seed is None else seed
        conditioning = self.session.conditioning
        if conditioning is None and (labels is not None or guidance is not None):
            raise FlowkitError(f"{self.path} is not class-conditional (data.labels = false): it samples "
                               "without labels or guidance.")
        if conditioning is not None:
            if isinstance(labels, int):
                self._labels_in(torch.tensor([labels]), 1)
            elif labels is not None:
                labels = self._labels_in(labels, n)

        def draw() -> Tensor:
            if conditioning is None:
                y = self.model.sample(n, temperature=float(temperature))
                return denoise_step(self.session, y) if denoise else y
            y = conditioning.sample(n, float(temperature), labels, guidance)
            # denoised by the density of its own class (unguided), as class_grids does
            return denoise_step(self.session, y, conditioning.context(labels, n)) if denoise else y

        with solving(self.session, solver):
            y, overflowed = seeded_draw(self.session, draw, seed)
        return Samples(self._levels_out(y), overflowed)

    @torch.no_grad()
    def classify(self, x: Tensor | np.ndarray, *, seed: int | None = None) -> tuple[Tensor, Tensor]:
        """The Bayes classifier of a class-conditional run: ``argmax_c p(x | c) p(c)`` per image
        (a LongTensor ``(B,)``) and ``log p(x | c)`` ``(B, K)`` float64 nats (the dequantized
        bound, one noise draw per image shared by the classes), ``p(c)`` the training labels'
        frequencies (`flowkit.runs.classes`)."""
        from flowkit.runs.classes import class_log_prior, conditioning_of, per_class_batches

        conditioning = conditioning_of(self.session)
        x = self._levels_in(x, self.shape, "x")
        seed = self.recipe.train.seed + 1 if seed is None else seed
        prior = class_log_prior(self.session.train_x.labels, conditioning.num_classes)
        predicted, log_px = [], []
        c, h, w = self.shape
        for per_class, log_q, _ in per_class_batches(self.session, x, None, batch_size=self.recipe.train.eval_batch_size,
                                                     seed=seed):
            predicted.append(conditioning.bayes_classify(per_class, prior.to(per_class.device)).cpu())
            log_px.append(-discrete_nll(per_class, c * h * w, self.n_bits, log_q[:, None]).cpu())
        return torch.cat(predicted), torch.cat(log_px)

    @torch.no_grad()
    def downsample(self, x: Tensor | np.ndarray, level: int) -> Tensor:
        """Images reduced to ``level``'s resolution as the model sees them (its low-pass image,
        shown by ``low_to_image``), as data levels: the input `superres` takes."""
        model = self._super_resolution(level)
        y = (self._levels_in(x, self.shape, "x").to(self.device).float() + 0.5) / 2**self.n_bits
        return self._levels_out(model.low_to_image(model.reduce(y, level), level))

    @torch.no_grad()
    def superres(self, x_low: Tensor | np.ndarray, level: int, temperature: float = 1.0, *,
                 seed: int | None = None) -> Samples:
        """Full-resolution images sampled given low-resolution ones at ``level`` (0 = the
        coarsest), for models with the `SuperResolution` capability (Wavelet Flow).

        ``x_low``: ``(B, C, h, w)`` data levels at the level's resolution (`downsample` gives
        them). They enter as the model's low-pass image of ``x_low`` upsampled by pixel
        repetition, taken at bin centres: exactly ``x_low`` for a Haar pyramid, whose low-pass
        image is the block average; a smoothed ``x_low`` for longer wavelets.
        """
        model = self._super_resolution(level)
        c, h, w = self.shape
        low_shape = tuple(model.low_to_image(model.reduce(torch.zeros(1, c, h, w, device=self.device), level),
                                             level).shape[1:])
        x_low = self._levels_in(x_low, low_shape, "x_low")
        factor = (h // low_shape[1], w // low_shape[2])
        y_low = (x_low.to(self.device).float() + 0.5) / 2**self.n_bits
        y_up = y_low.repeat_interleave(factor[0], dim=2).repeat_interleave(factor[1], dim=3)
        seed = self.recipe.sample.seed if seed is None else seed
        y, overflowed = seeded_draw(
            self.session, lambda: model.superres(model.reduce(y_up, level), level, temperature=float(temperature)), seed)
        return Samples(self._levels_out(y), overflowed)

    # -- checks and conversions ------------------------------------------------------------
    def _super_resolution(self, level: int) -> Any:
        return super_resolution(self.model, self.recipe.model.use, level, "level =")

    def _levels_in(self, x: Tensor | np.ndarray, shape: tuple[int, ...], name: str) -> Tensor:
        """``x`` checked: uint8 data levels of shape ``(B, *shape)``."""
        x = torch.as_tensor(x)
        if x.dtype != torch.uint8:
            raise FlowkitError(f"{name} must be uint8 data levels 0..{2**self.n_bits - 1}, got dtype {x.dtype}.")
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
            raise ShapeError(f"{name} must have shape (B, {', '.join(map(str, shape))}), got {tuple(x.shape)}"
                             + (f"; for one image use {name}[None]." if x.ndim == 3 else "."))
        top = int(x.max()) if x.numel() else 0
        if top >= 2**self.n_bits:
            raise FlowkitError(f"{name} holds the value {top}, but this run models n_bits = {self.n_bits} "
                               f"(levels 0..{2**self.n_bits - 1}); reduce images with "
                               "flowkit.runs.bpd.reduce_bits(x, n_bits) first.")
        return x

    def _labels_in(self, labels: Tensor | np.ndarray | None, n: int) -> Tensor | None:
        """``labels`` checked: integers ``(n,)`` in 0..K (K: "no class"), as a LongTensor."""
        if labels is None:
            return None
        labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise FlowkitError(f"labels must be integer class indices, got dtype {labels.dtype}.")
        if labels.shape != (n,):
            raise ShapeError(f"labels must have shape ({n},), one per image, got {tuple(labels.shape)}.")
        k = self.session.dataset.num_classes
        if n and (int(labels.min()) < 0 or int(labels.max()) > k):
            raise FlowkitError(f"labels must be class indices 0..{k - 1} (or {k} for no class) of this run's "
                               f"{k} classes, got values {int(labels.min())}..{int(labels.max())}.")
        return labels.long()

    def _levels_out(self, y: Tensor) -> Tensor:
        return to_levels(y, self.n_bits).to(torch.uint8)
