"""What a run does once built, and what it reports: train, evaluate, sample, summarise.

`execute` runs one run directory (`flowkit run`, and each job of `--level i --out DIR`);
`evaluate_and_sample` and `summarise` are the evaluation and the summary.json of a run, shared
with `flowkit.runs.level_jobs.assemble`, which evaluates the whole model once its level jobs have
trained it. A summary's keys, and which density its bits/dim are of, are stated here alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flowkit.contracts.model import LatentVariable
from flowkit.contracts.transform import sequential_inverses
from flowkit.runs import distributed
from flowkit.runs.bpd import FIGURE_NAMES, figure_key
from flowkit.runs.classes import class_figures, class_grids
from flowkit.runs.evaluate import evaluate, evaluate_iw, nonfinite_figures
from flowkit.runs.inspect import count_parameters
from flowkit.runs.report import write_report
from flowkit.runs.rundir import RunDir
from flowkit.runs.sampling import sample_grids
from flowkit.runs.session import Session
from flowkit.runs.trainer import Reporter, Trainer, peak_memory_bytes

DENSITY = "dequantized bound: -log p(y) + D log 2^n_bits + log q(u|x), over all C*H*W dims"
DENSITY_ALONE = ("term {term} alone, a density of its own: -log p(term) + D_t log 2^n_bits over its own D_t dims "
                 "(the model's other terms were not trained)")
DENSITY_CONDITIONAL = ("class-conditional dequantized bound: -log p(y | c) + D log 2^n_bits + log q(u|x) of each test image "
                       "under its own class c, over all C*H*W dims (test_bpd_marginal: the same with "
                       "p(y) = sum_c p(y | c) p(c), p(c) the training-set class frequencies)")
DENSITY_NOISY = ("noisy-data NLL, not a bound on the images' bits/dim: -log p(y) + D log 2^n_bits for noisy images "
                 "y = (x + 1/2) / 2^n_bits + noise that leaves the bin (the dequantizer's), in bits per dim of the "
                 "noisy image 2^n_bits y, over all C*H*W dims")
DENSITY_ELBO = ("evidence lower bound (ELBO) of a latent-variable model, one draw z ~ q(z|y) per image: "
                "-log p(y|z) + KL(q(z|y) || p(z)) + D log 2^n_bits + log q(u|x), over all C*H*W dims")
TRAIN_EVAL_IMAGES = 10_000  # train bpd is measured on this many training images, like the test set


@dataclass
class Evaluated:
    """A trained model's figures: bits/dim on the test set and on the first training images (the
    `flowkit.runs.evaluate.evaluate` dictionaries), its sample grids and ``extra``: the summary keys
    of sampling (``sample_images_per_s`` of the grids' draws; ``sample_solver`` for a sequential
    inverse), of the importance-weighted estimate (unless eval.iw_samples = 0) and of a
    class-conditional run's marginal bits/dim and Bayes classifier (`flowkit.runs.classes`)."""

    test: dict[str, float]
    train: dict[str, float]
    train_images: int
    samples: list[Path]
    overflowed: dict[str, int]
    extra: dict[str, Any]


def evaluate_and_sample(session: Session, rundir: RunDir, reporter: Reporter, *, alone: str | None = None,
                        step: int = 0, log_samples: bool = False) -> Evaluated:
    """Test and train bits/dim (of the term ``alone``, when one term trained alone), then, for the
    whole model, the sample grids of [sample] and the importance-weighted estimate, all with the
    weights the recipe evaluates with (the average under train.ema). ``log_samples``: also log the
    grids to the run's metrics at ``step``."""
    recipe, cfg = session.recipe, session.recipe.train
    reporter.message(f"Evaluating on {len(session.test_x)} test images...")
    train_x = session.train_x.first(TRAIN_EVAL_IMAGES)
    samples: list[Path] = []
    overflowed: dict[str, int] = {}
    extra: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    conditional = session.conditioning is not None
    with session.evaluation_weights():
        test = evaluate(session, session.test_x, session.test_x.labels, batch_size=cfg.eval_batch_size,
                        seed=cfg.seed + 1, alone=alone)
        train = evaluate(session, train_x, train_x.labels, batch_size=cfg.eval_batch_size, seed=cfg.seed + 2,
                         alone=alone)
        if alone is None and conditional:
            words = FIGURE_NAMES[session.dequantizer.figure]
            reporter.message(f"Marginal {words} and the Bayes classifier (one evaluation per class)...")
            extra.update(class_figures(session, seed=cfg.seed + 1))  # the test figure's noise: the same y
        if alone is None:
            grids = class_grids if conditional else sample_grids
            common = dict(n=recipe.sample.n, temperatures=recipe.sample.temperatures, seed=recipe.sample.seed,
                          metrics=rundir.metrics if log_samples else None, step=step)
            if conditional:
                common["guidance"] = recipe.sample.guidance
            samples, overflowed = grids(session, rundir.samples, seconds=seconds, **common)
            if seconds:  # the grids' draws: sampling images/s of every model, one number (ablation reports)
                extra["sample_images_per_s"] = recipe.sample.n * len(seconds) / max(sum(seconds.values()), 1e-9)
                if sequential_inverses(session.model):  # TarFlow: which inverse drew them
                    extra["sample_solver"] = recipe.sample.solver
            if recipe.sample.denoise:  # the same draws, denoised: grids that pair up (samples-denoised-*)
                more, counts = grids(session, rundir.samples, denoised=True, **common)
                samples += more
                overflowed.update({f"denoised-{k}": v for k, v in counts.items()})
            extra.update(importance_weighted(session, reporter))
    return Evaluated(test, train, len(train_x), samples, overflowed, extra)


def summarise(session: Session, rundir: RunDir, evaluated: Evaluated, training: dict[str, Any], *,
              alone: str | None = None) -> dict[str, Any]:
    """summary.json of a run: what was trained and how (``training``: preset, steps,
    train_images_per_s, train_seconds, peak_memory_bytes, peak_memory_kind, and anything a caller
    adds), which density the figures are of, and the figures of ``evaluated``."""
    recipe, cfg = session.recipe, session.recipe.train
    test, train = evaluated.test, evaluated.train
    figure = session.dequantizer.figure
    key = figure_key(figure)  # "bpd", or "noisy_nll" where the noise leaves the bin: never called bits/dim
    if figure == "noisy_nll":
        density = DENSITY_NOISY
    elif alone is not None:
        density = DENSITY_ALONE.format(term=alone)
    elif session.conditioning is not None:
        density = DENSITY_CONDITIONAL
    else:
        density = DENSITY_ELBO if isinstance(session.model, LatentVariable) else DENSITY
    summary: dict[str, Any] = {
        "status": "finished",
        "recipe": recipe.meta.name,
        "preset": training.pop("preset"),
        "dataset": session.dataset.name,
        "image_shape": list(session.dataset.shape),
        "n_bits": session.n_bits,
        "density": density,
        "figure": figure,
        f"test_{key}": test[key],
        f"train_{key}": train[key],
        # Terms that are densities of their own (Wavelet Flow's levels): bits/dim over their own dims.
        f"test_{key}_per_part": _by_prefix(test, f"{key}/"),
        f"train_{key}_per_part": _by_prefix(train, f"{key}/"),
        # Terms that are not (Glow's levels): each one's share of the whole image's bits/dim.
        f"test_{key}_share_per_part": _by_prefix(test, f"{key}_share/"),
        "test_images": len(session.test_x),
        "train_eval_images": evaluated.train_images,
        "params": count_parameters(session.model, session.dequantizer),
        **training,
        "device": str(session.device),
        "torch": torch.__version__,
        "samples": [str(p.relative_to(rundir.path)) for p in evaluated.samples],
        "level": cfg.level,
        "weights": f"exponential moving average, decay {cfg.ema}" if cfg.ema else "trained (no averaging)",
        **evaluated.extra,
    }
    if evaluated.samples:
        summary["samples_overflowed"] = evaluated.overflowed  # images per grid whose inverse overflowed
    if alone is not None:
        summary["trained_part"] = alone
    bad = nonfinite_figures(summary)
    if bad:  # a NaN anywhere (test_bpd, a level, the marginal, a class's accuracy) is named, not buried
        summary["nonfinite"] = bad
    return summary


def execute(session: Session, rundir: RunDir | None, reporter: Reporter, *, resume: bool = False,
            from_checkpoint: str | None = None) -> dict[str, Any]:
    """Trains, evaluates on the full test set, samples; writes summary.json and report.md.

    Evaluation and sampling use the weights the recipe evaluates with (the average under
    train.ema); the importance-weighted estimate runs when eval.iw_samples is set.

    Under torchrun only rank 0 writes ``rundir``, evaluates and samples; the other ranks train
    their share of each batch and return an empty summary (``rundir``: None for a new run)."""
    started = time.perf_counter()
    recipe = session.recipe
    world = distributed.world()
    if not world.main:
        Trainer(session, rundir, reporter).train(resume=resume, from_checkpoint=from_checkpoint)
        return {}
    if not resume:
        rundir.write_recipe(recipe.to_toml())
    if recipe.log.tensorboard:  # the same records as metrics.jsonl, and the sample grids, in tb/
        rundir.metrics.open_tensorboard(rundir.tensorboard)
    trainer = Trainer(session, rundir, reporter)
    trainer.train(resume=resume, from_checkpoint=from_checkpoint)
    alone = trainer.parts[0] if trainer.parts else None
    st = trainer.state
    evaluated = evaluate_and_sample(session, rundir, reporter, alone=alone, step=st.step, log_samples=True)
    memory, memory_kind = peak_memory_bytes(session.device)
    training = {
        "preset": recipe.preset,
        "steps": st.step,
        "train_images_per_s": st.images / max(st.train_seconds, 1e-9),
        "train_seconds": st.train_seconds,
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
        **({"world_size": world.size} if world.size > 1 else {}),  # processes of torchrun; images/s counts all
    }
    summary = summarise(session, rundir, evaluated, training, alone=alone)
    summary["wall_s"] = time.perf_counter() - started
    rundir.log({"step": st.step, "final": True, **{f"test_{k}": v for k, v in evaluated.test.items()}})
    rundir.write_summary(summary)
    write_report(rundir)
    rundir.metrics.close()
    return summary


def importance_weighted(session: Session, reporter: Reporter) -> dict[str, Any]:
    """The importance-weighted test bits/dim of eval.iw_samples samples per image (what Flow++ and
    MaCow report), over eval.iw_images test images; empty when eval.iw_samples = 0."""
    cfg = session.recipe.eval
    if not cfg.iw_samples:
        return {}
    x = session.test_x.first(cfg.iw_images)
    reporter.message(f"Importance-weighted evaluation: {cfg.iw_samples} samples per image, {len(x)} test images...")
    batch = cfg.iw_batch_size or session.recipe.train.eval_batch_size
    bpd = evaluate_iw(session, x, x.labels, k=cfg.iw_samples, batch_size=batch, seed=session.recipe.train.seed + 3)
    return {"test_bpd_iw": bpd, "iw_samples": cfg.iw_samples, "iw_images": len(x)}


def _by_prefix(result: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: v for k, v in result.items() if k.startswith(prefix)}
