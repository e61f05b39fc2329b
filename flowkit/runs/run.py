"""One run from a recipe: train, evaluate, sample, summarise."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch

from flowkit.contracts.model import LatentVariable
from flowkit.errors import FlowkitError
from flowkit.plugins import Plugins
from flowkit.recipes.load import load_recipe
from flowkit.runs import distributed
from flowkit.runs.evaluate import evaluate, evaluate_iw
from flowkit.runs.metrics import require_tensorboard
from flowkit.runs.report import write_report
from flowkit.runs.rundir import RunDir
from flowkit.runs.sampling import sample_grids
from flowkit.runs.session import Session, build_session
from flowkit.runs.trainer import Reporter, Trainer, peak_memory_bytes

DENSITY = "dequantized bound: -log p(y) + D log 2^n_bits + log q(u|x), over all C*H*W dims"
DENSITY_ALONE = ("term {term} alone, a density of its own: -log p(term) + D_t log 2^n_bits over its own D_t dims "
                 "(the model's other terms were not trained)")
DENSITY_ELBO = ("evidence lower bound (ELBO) of a latent-variable model, one draw z ~ q(z|y) per image: "
                "-log p(y|z) + KL(q(z|y) || p(z)) + D log 2^n_bits + log q(u|x), over all C*H*W dims")
TRAIN_EVAL_IMAGES = 10_000  # train bpd is measured on this many training images, like the test set


def count_parameters(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


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
        rundir.recipe_path.write_text(recipe.to_toml(), encoding="utf-8")
    if recipe.log.tensorboard:  # the same records as metrics.jsonl, and the sample grids, in tb/
        rundir.metrics.open_tensorboard(rundir.path / "tb")
    trainer = Trainer(session, rundir, reporter)
    trainer.train(resume=resume, from_checkpoint=from_checkpoint)
    cfg = recipe.train
    reporter.message(f"Evaluating on {len(session.test_x)} test images...")
    alone = trainer.parts[0] if trainer.parts else None
    train_x = session.train_x[:TRAIN_EVAL_IMAGES]
    samples, overflowed_by_t = [], {}
    with session.evaluation_weights():
        test = evaluate(session, session.test_x, batch_size=cfg.eval_batch_size, seed=cfg.seed + 1, alone=alone)
        train = evaluate(session, train_x, batch_size=cfg.eval_batch_size, seed=cfg.seed + 2, alone=alone)
        if trainer.parts is None:
            samples, overflowed_by_t = sample_grids(session, rundir.samples, n=recipe.sample.n,
                                                    temperatures=recipe.sample.temperatures, seed=recipe.sample.seed,
                                                    metrics=rundir.metrics, step=trainer.state.step)
        iw = importance_weighted(session, reporter) if trainer.parts is None else {}
    memory, memory_kind = peak_memory_bytes(session.device)
    st = trainer.state
    summary: dict[str, Any] = {
        "status": "finished",
        "recipe": recipe.meta.name,
        "preset": recipe.preset,
        "dataset": session.dataset.name,
        "image_shape": list(session.dataset.shape),
        "n_bits": session.n_bits,
        "density": (DENSITY_ELBO if isinstance(session.model, LatentVariable) else DENSITY) if alone is None
                   else DENSITY_ALONE.format(term=alone),
        "test_bpd": test["bpd"],
        "train_bpd": train["bpd"],
        # Terms that are densities of their own (Wavelet Flow's levels): bits/dim over their own dims.
        "test_bpd_per_part": _by_prefix(test, "bpd/"),
        "train_bpd_per_part": _by_prefix(train, "bpd/"),
        # Terms that are not (Glow's levels): each one's share of the whole image's bits/dim.
        "test_bpd_share_per_part": _by_prefix(test, "bpd_share/"),
        "test_images": len(session.test_x),
        "train_eval_images": len(train_x),
        "params": count_parameters(session.model, session.dequantizer),
        "steps": st.step,
        "train_images_per_s": st.images / max(st.train_seconds, 1e-9),
        "train_seconds": st.train_seconds,
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
        "device": str(session.device),
        "torch": torch.__version__,
        "wall_s": time.perf_counter() - started,
        "samples": [str(p.relative_to(rundir.path)) for p in samples],
        "level": cfg.level,
        "weights": f"exponential moving average, decay {cfg.ema}" if cfg.ema else "trained (no averaging)",
        **({"world_size": world.size} if world.size > 1 else {}),  # processes of torchrun; images/s counts all
        **iw,
    }
    if samples:
        summary["samples_overflowed"] = overflowed_by_t  # images per grid whose inverse overflowed
    if alone is not None:
        summary["trained_part"] = alone
    rundir.log({"step": st.step, "final": True, **{f"test_{k}": v for k, v in test.items()}})
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
    x = session.test_x[: cfg.iw_images] if cfg.iw_images else session.test_x
    reporter.message(f"Importance-weighted evaluation: {cfg.iw_samples} samples per image, {len(x)} test images...")
    batch = cfg.iw_batch_size or session.recipe.train.eval_batch_size
    bpd = evaluate_iw(session, x, k=cfg.iw_samples, batch_size=batch, seed=session.recipe.train.seed + 3)
    return {"test_bpd_iw": bpd, "iw_samples": cfg.iw_samples, "iw_images": len(x)}


def _by_prefix(result: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: v for k, v in result.items() if k.startswith(prefix)}


def start_run(recipe_path: Path | None, plugins: Plugins, reporter: Reporter, *, preset: str | None = None,
              overrides: tuple[str, ...] = (), out: Path | None = None, overwrite: bool = False,
              resume: Path | None = None, from_checkpoint: str | None = None) -> tuple[RunDir | None, dict[str, Any]]:
    """The `flowkit run` command without its console: returns the run directory and summary.
    The run directory is locked (`RunDir.lock`) while this runs: a second process is refused.
    train.level >= 0 (``--level``) with ``out`` is a level job: it trains into ``out/levels/<term>``
    beside the other levels' jobs (`flowkit.runs.level_jobs`). Under torchrun, the process
    group is left on the way out, however it ends."""
    try:
        return _start_run(recipe_path, plugins, reporter, preset=preset, overrides=overrides, out=out,
                          overwrite=overwrite, resume=resume, from_checkpoint=from_checkpoint)
    finally:
        distributed.shutdown()


def _start_run(recipe_path: Path | None, plugins: Plugins, reporter: Reporter, *, preset: str | None,
               overrides: tuple[str, ...], out: Path | None, overwrite: bool, resume: Path | None,
               from_checkpoint: str | None) -> tuple[RunDir | None, dict[str, Any]]:
    from flowkit.runs import level_jobs  # it imports this module

    if resume is not None:
        if level_jobs.is_level_jobs_dir(resume):
            raise FlowkitError(f"{resume} holds level jobs: resume one level's job with "
                               f"`flowkit run --resume {Path(resume) / level_jobs.LEVELS / '<level>'}`.")
        with _lock_on_rank_0(RunDir.existing(resume), "resume") as rundir:
            recipe = load_recipe(rundir.recipe_path, plugins.registries)
            if recipe.log.tensorboard:
                require_tensorboard()
            summary = execute(build_session(recipe, plugins), rundir, reporter, resume=True,
                              from_checkpoint=from_checkpoint)
        shared = rundir.path.parent.parent
        if distributed.is_main() and rundir.path.parent.name == level_jobs.LEVELS and (shared / "recipe.toml").is_file():
            free_memory()  # the level's session was execute's alone; assemble builds the whole model
            return level_jobs.assemble(shared, plugins, reporter) or (rundir, summary)
        return rundir, summary
    recipe = load_recipe(recipe_path, plugins.registries, preset=preset, overrides=overrides)
    if recipe.log.tensorboard:
        require_tensorboard()
    # Everything that can fail on bad input (data files, shapes) fails before the directory exists.
    session = build_session(recipe, plugins)
    if not distributed.is_main():  # torchrun's other ranks: no run directory, nothing written
        return None, execute(session, None, reporter)
    if recipe.train.level >= 0 and out is not None:  # rank 0 of a level job joins, writes and assembles
        rundir, summary = level_jobs.train_level(session, reporter, out, overwrite=overwrite)
        del session  # its model, optimizer state and data: assemble builds the whole model next
        free_memory()
        return level_jobs.assemble(Path(out), plugins, reporter) or (rundir, summary)
    with RunDir.create(recipe.meta.name + (f"-{preset}" if preset else ""), out, overwrite=overwrite) as rundir:
        return rundir, execute(session, rundir, reporter)


def free_memory() -> None:
    """Gives back what objects no longer referenced hold (cycles too), and on CUDA the cached
    blocks of the freed tensors, before a second model is built in the same process."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _lock_on_rank_0(rundir: RunDir, what: str) -> RunDir:
    """The run directory, locked by rank 0 under torchrun; the other ranks only read it (a resume's
    checkpoint), and a lock file is a write."""
    return rundir.lock(what) if distributed.is_main() else rundir
