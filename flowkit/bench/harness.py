"""A recipe's training step, ready to time: recipe -> Session -> Trainer on a throwaway run directory.

The step timed is the trainer's own (`Trainer.backward`, `Trainer.clip`, the optimiser's
step, and the weight average under ``train.ema``), on batches already on the device, so work
on the trainer, the objective or the parts shows up here unchanged. The bench leaves out what
the loop does around a step: the learning-rate schedule, logging, the loss read back to the
host, and ``train.level_threads``.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowkit.bench.timing import Contender
from flowkit.contracts.model import Reference
from flowkit.contracts.transform import InverseSolver, sequential_inverses, use_inverse_solver
from flowkit.errors import FlowkitError
from flowkit.plugins import Plugins
from flowkit.recipes.load import Recipe, load_recipe
from flowkit.runs.rundir import RunDir
from flowkit.runs.session import Session, build_session
from flowkit.runs.trainer import Trainer

#: Batches drawn once and used in turn, so no data loading is timed.
POOL = 4


@dataclass
class Prepared:
    """A trainer after its data-dependent initialisation, and batches on its device."""

    recipe: Recipe
    trainer: Trainer
    batches: list[Tensor]

    @property
    def session(self) -> Session:
        return self.trainer.s

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.session.dataset.shape


def write_synthetic_images(folder: Path, shape: tuple[int, int, int], train: int, test: int, seed: int = 0) -> Path:
    """An ``npz`` file of uniform random uint8 images of ``shape`` (C, H, W), for ``--shape``."""
    c, h, w = shape
    if c not in (1, 3, 4):
        raise FlowkitError(f"--shape {c},{h},{w}: synthetic images have 1, 3 or 4 channels (the npz dataset's "
                           f"layouts), got {c}.")
    rng = np.random.default_rng(seed)
    layout = (h, w) if c == 1 else (h, w, c)
    path = folder / "synthetic.npz"
    np.savez(path, x_train=rng.integers(0, 256, (train, *layout), dtype=np.uint8),
             x_test=rng.integers(0, 256, (test, *layout), dtype=np.uint8))
    return path


@contextlib.contextmanager
def prepared(path: str | Path, plugins: Plugins, *, preset: str | None = None, overrides: Sequence[str] = (),
             shape: tuple[int, int, int] | None = None, batch: int | None = None,
             device: str | None = None) -> Iterator[Prepared]:
    """The recipe at ``path`` (with ``preset`` and ``--set`` ``overrides``) built and initialised.

    ``batch`` and ``device`` set ``train.batch_size`` and ``train.device``. With ``shape``, the
    data are synthetic images of that shape (the recipe's ``[data]`` is replaced by an ``npz``
    file of them in a temporary folder, keeping its ``n_bits``), so no dataset file is needed.
    """
    with tempfile.TemporaryDirectory(prefix="flowkit-bench-") as tmp:
        overrides = [*overrides]
        if batch is not None:
            overrides.append(f"train.batch_size={batch}")
        if device is not None:
            overrides.append(f"train.device={json.dumps(device)}")
        recipe = load_recipe(path, plugins.registries, preset=preset, overrides=overrides)
        if shape is not None:
            train = recipe.train
            data = write_synthetic_images(Path(tmp), shape, max(train.batch_size, train.init_batch_size), train.batch_size)
            recipe = load_recipe(path, plugins.registries, preset=preset, overrides=[
                *overrides, 'data.use="npz"', f"data.path={json.dumps(str(data))}",
                f"data.n_bits={recipe.data.params.n_bits}"])
        session = build_session(recipe, plugins)
        trainer = Trainer(session, RunDir(Path(tmp) / "run"))
        trainer.initialize()
        session.model.train()
        session.dequantizer.train()
        draw = torch.Generator().manual_seed(recipe.train.seed)
        size = recipe.train.batch_size
        batches = [session.train_x[torch.randint(len(session.train_x), (size,), generator=draw)].to(session.device)
                   for _ in range(POOL)]
        yield Prepared(recipe, trainer, batches)


def tf32_enabled() -> tuple[bool, bool]:
    """Whether float32 work may round to TF32 on CUDA: (matmuls, cuDNN convolutions).

    Read through torch's ``fp32_precision`` settings ("none" defers to the level above): reading
    the older ``allow_tf32`` flags raises once anyone has set the newer ones.
    """
    b = torch.backends

    def resolve(*chain: str) -> bool:
        return next((value == "tf32" for value in chain if value != "none"), False)

    return (resolve(b.cuda.matmul.fp32_precision, b.fp32_precision),
            resolve(b.cudnn.conv.fp32_precision, b.cudnn.fp32_precision, b.fp32_precision))


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 on or off for both CUDA matmuls and cuDNN convolutions while inside (torch's defaults:
    off, on). The settings are process-wide, so the previous ones are put back on the way out:
    left set, they would change every later float32 result and make reading torch's older
    ``allow_tf32`` flags raise (`tf32_enabled`)."""
    b = torch.backends
    saved = b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision
    b.cuda.matmul.fp32_precision = b.cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"
    try:
        yield
    finally:
        b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision = saved


def precision(amp: str, device: torch.device) -> str:
    """The dtype column: train.amp, and on CUDA whether float32 matmuls and convolutions use TF32."""
    label = "bf16 autocast" if amp == "bf16" else "float32"
    if device.type == "cuda":
        label += {(True, True): ", TF32", (False, False): ", no TF32", (False, True): ", TF32 in cuDNN only",
                  (True, False): ", TF32 in matmuls only"}[tf32_enabled()]
    return label


def flowkit_contender(prep: Prepared) -> Contender:
    """The trainer's step, the objective's bits/dim without gradients, the model's samples (T = 1)."""
    trainer, s = prep.trainer, prep.session

    def train_step(x: Tensor) -> None:
        trainer.train_step(x)

    def log_likelihood(x: Tensor) -> Tensor:
        return s.objective.loss(x)[0]

    def train_loss(x: Tensor) -> Tensor:  # what `Trainer.backward` differentiates, micro-batch by micro-batch
        return trainer.objective.loss(x.chunk(trainer.cfg.accumulate)[0], trainer.parts)[0]

    def sampler(solver: InverseSolver) -> Callable[[int], Tensor]:
        def sample(n: int) -> Tensor:
            with use_inverse_solver(solver, s.model):
                return s.model.sample(n, temperature=1.0)
        return sample

    # A model whose steps invert position by position (TarFlow) samples two ways: both are timed.
    settings = prep.recipe.sample
    sequential = bool(sequential_inverses(s.model))
    jacobi = InverseSolver("jacobi", settings.jacobi_tol, settings.jacobi_max_iter)
    return Contender("flowkit", train_step, log_likelihood, sampler(InverseSolver("sequential")),
                     [s.model, s.dequantizer], trainer.optimizer,
                     dtype=precision(prep.recipe.train.amp, s.device), compile=prep.recipe.train.compile,
                     train_loss=train_loss, sampler="sequential" if sequential else "",
                     other_samplers={f"jacobi (tol {jacobi.tol:g})": sampler(jacobi)} if sequential else {})


def reference_contender(name: str, reference: Reference, recipe: Recipe, device: torch.device) -> Contender:
    """A reference implementation (`flowkit.contracts.model.Reference`) with its own Adam (the
    recipe's lr and betas) and the recipe's clipping, in float32, eager."""
    reference = reference.to(device)
    train = recipe.train
    optimizer = torch.optim.Adam(reference.parameters(), lr=train.lr, betas=tuple(train.betas))

    def train_step(x: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        reference.loss(x).backward()
        if train.grad_clip:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), train.grad_clip)
        optimizer.step()

    return Contender(name, train_step, reference.loss, reference.sample, [reference], optimizer,
                     dtype=precision("off", device), train_loss=reference.loss)
