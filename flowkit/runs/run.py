"""``flowkit run`` without its console: a new run, a resumed one, or a level job, each in its
locked run directory (`flowkit.runs.execute` does the work; `flowkit.runs.level_jobs` the joining
and assembling of level jobs)."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

from flowkit.errors import FlowkitError
from flowkit.plugins import Plugins
from flowkit.recipes.load import load_recipe
from flowkit.runs import distributed, level_jobs
from flowkit.runs.execute import execute
from flowkit.runs.metrics import require_tensorboard
from flowkit.runs.rundir import RunDir
from flowkit.runs.session import build_session
from flowkit.runs.trainer import Reporter

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
        if distributed.is_main() and rundir.path.parent.name == level_jobs.LEVELS and (shared / RunDir.RECIPE).is_file():
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
