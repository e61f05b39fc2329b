"""Level jobs: the levels of a model whose terms are densities of their own (Wavelet Flow),
trained by separate processes (GPUs, machines sharing a file system) into one run directory.

``flowkit run RECIPE --level i --out DIR`` is one job. Layout of ``DIR``::

    recipe.toml              the whole model's resolved recipe (train.level = -1), shared by the jobs
    levels/<term>/           one job's run directory (recipe.toml with train.level = i, metrics.jsonl,
                             summary.json, checkpoints/, .lock), e.g. levels/base, levels/level1
    summary.json report.md   the whole model, written once every level has finished (status
                             "retraining" while a level trains again with --overwrite)
    samples/                 the whole model's sample grids
    .lock                    held while a job assembles the whole model

Joining is race-free: ``DIR`` and ``levels/`` are made with ``exist_ok``, and ``recipe.toml`` is
created by hard-linking a complete temporary file to its name (``os.link`` fails when the name
exists), so of jobs started in the same millisecond exactly one writes it and every other
compares its own recipe against it. A job whose recipe differs in anything but train.level is
refused, naming the keys. Each level's directory is an ordinary `RunDir` with its own lock, so a
second job for a level that is training is refused while other levels proceed, and
``flowkit run --resume DIR/levels/<term>`` continues a level that stopped.

The terms share no parameters (`IndependentTerms`): a job that finishes its level takes
``DIR/.lock`` (waiting for a job assembling), and when every level has finished it loads each
level's parameters from that level's checkpoint (`load_levels`), evaluates the whole image's
bits/dim, samples and writes ``summary.json`` and ``report.md``. Otherwise it says which levels
are missing and how to train them. `flowkit.runs.trained.load_trained` loads ``DIR`` the same way.
"""

from __future__ import annotations

import dataclasses
import os
import time
import tomllib
from pathlib import Path
from typing import Any

import torch
from flowkit.errors import FlowkitError
from flowkit.plugins import Plugins
from flowkit.recipes.load import Recipe, load_recipe
from flowkit.runs.checkpoint import CheckpointError, latest_checkpoint, read_weights, weights_sha256
from flowkit.runs.execute import evaluate_and_sample, execute, summarise
from flowkit.runs.lock import LOCK_NAME
from flowkit.runs.report import write_report
from flowkit.runs.rundir import RunDir, write_atomic
from flowkit.runs.session import Session, build_session
from flowkit.runs.trainer import Reporter

LEVELS = RunDir.LEVELS


def is_level_jobs_dir(path: Path) -> bool:
    return (Path(path) / LEVELS).is_dir()


def term_names(session: Session) -> list[str]:
    """The model's terms in order: ``--level i`` trains ``term_names(session)[i]``."""
    return list(session.model.parameter_groups())  # type: ignore[attr-defined]


def whole_recipe(recipe: Recipe) -> Recipe:
    """The recipe every job of a directory shares: this job's with train.level = -1."""
    overrides = tuple(o for o in recipe.overrides if not o.replace(" ", "").startswith("train.level="))
    return recipe.replace(train=dataclasses.replace(recipe.train, level=-1), overrides=overrides)


# -- joining ------------------------------------------------------------------------------
def join(out: Path, recipe: Recipe) -> None:
    """Creates ``out`` as a level-jobs directory, or joins the one there: refuses a folder that
    holds something else and a shared recipe that differs from this job's beyond train.level."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FlowkitError(f"--out {out} is a file, not a directory; choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    # levels/ is made before anything else a job writes here, so a folder with contents but no
    # levels/ is not ours. List first, then look for levels/: whatever another job wrote before
    # the listing was written after its levels/, which the second look then sees.
    contents = [p for p in out.iterdir() if p.name != LOCK_NAME]
    if contents and not is_level_jobs_dir(out):
        raise FlowkitError(
            f"--out {out} already holds something other than level jobs (it has no {LEVELS}/ folder): "
            "`--level i --out DIR` trains level i into DIR/levels/<level>/ beside the other levels' jobs. "
            "Choose another --out.")
    (out / LEVELS).mkdir(exist_ok=True)
    mine = whole_recipe(recipe).to_toml()
    shared = out / RunDir.RECIPE
    _create_if_absent(shared, mine)
    theirs = shared.read_text(encoding="utf-8")
    differing = _differing_keys(tomllib.loads(theirs), tomllib.loads(mine))
    # A [*.derived] value follows from the keys it is derived from: name those.
    differing = [k for k in differing if ".derived." not in k] or differing
    if differing:
        more = f" and {len(differing) - 12} more" if len(differing) > 12 else ""
        shown = ", ".join(differing[:12]) + more
        raise FlowkitError(
            f"{shared}, the recipe shared by the level jobs of {out}, differs from this job's recipe in: "
            f"{shown}. Every job of a directory trains the same model (only --level differs); start this "
            f"one with the same recipe, preset and --set, e.g. `flowkit run {shared} --level i --out {out}`, "
            "or give it another --out.")


def _create_if_absent(path: Path, text: str) -> None:
    """Writes ``path`` unless it exists (`write_atomic` with ``exclusive``: of jobs racing to
    create it, exactly one does), with a clear error on a file system without hard links."""
    try:
        write_atomic(path, text, exclusive=True)
    except OSError as exc:  # EPERM, EOPNOTSUPP, ...: a file system without hard links
        raise FlowkitError(
            f"cannot create {path.name} in {path.parent}: hard-linking a file there failed "
            f"({exc.strerror or exc}). Level jobs create their shared recipe by a hard link, the one "
            "race-free way to create a file on NFS too; give --out a folder on a file system with hard "
            "links (ext4, xfs, NFS, Lustre; not FAT or some FUSE and SMB mounts).") from None


def _differing_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        dotted = f"{prefix}{key}"
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            keys += _differing_keys(a[key], b[key], dotted + ".")
        elif key not in a or key not in b or a[key] != b[key]:
            keys.append(dotted)
    return keys


# -- state of the levels ------------------------------------------------------------------
def level_state(out: Path, name: str) -> str:
    """``finished``, ``failed``, ``unfinished`` (started: training, or stopped) or ``not started``."""
    level = RunDir(Path(out)).level(name)
    summary = level.read_summary() if level.path.is_dir() else {}
    if summary.get("status") in ("finished", "failed"):
        return summary["status"]
    return "unfinished" if level.recipe_path.is_file() else "not started"


def missing_levels(out: Path, names: list[str]) -> dict[str, str]:
    """The levels of ``names`` that have not finished, with their state."""
    states = {name: level_state(out, name) for name in names}
    return {name: state for name, state in states.items() if state != "finished"}


def missing_message(out: Path, names: list[str], missing: dict[str, str]) -> str:
    """Which levels ``out`` lacks and the command lines that train (or resume) them."""
    commands = []
    for name, state in missing.items():
        if state == "unfinished":
            commands.append(f"{name} (started but not finished: still training, or stopped; continue a "
                            f"stopped one with `flowkit run --resume {out / LEVELS / name}`)")
        else:
            retrain = " --overwrite" if state == "failed" else ""
            commands.append(f"{name} ({state}; train it with `flowkit run {out / RunDir.RECIPE} "
                            f"--level {names.index(name)} --out {out}{retrain}`)")
    return (f"{out} is a level-jobs directory missing {len(missing)} of its {len(names)} levels: "
            + "; ".join(commands) + ".")


# -- loading --------------------------------------------------------------------------------
def load_levels(session: Session, out: Path) -> dict[str, Path]:
    """Loads every level's parameters (and, with train.ema, their averages) from the latest
    checkpoint of that level's job, and what no level owns (parameter-free parts, the
    dequantizer) from the first level's; returns the checkpoint of each level. Raises
    `FlowkitError` naming the missing levels and the command lines that train them."""
    out = Path(out)
    names = term_names(session)
    missing = missing_levels(out, names)
    if missing:
        raise FlowkitError(missing_message(out, names, missing))
    owners = _owners(session, names)
    checkpoints: dict[str, Path] = {}
    state: dict[str, torch.Tensor] = {}
    for index, name in enumerate(names):
        path = checkpoints[name] = latest_checkpoint(RunDir(out).level(name).checkpoints)
        for key, value in read_weights(path, session.device).items():
            owner = _owner(key, owners)
            if owner == name or (owner is None and index == 0):
                state[key] = value
    for module_name, module in session.modules().items():
        prefix = f"{module_name}."
        try:
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        except RuntimeError as exc:  # missing, unexpected or reshaped tensors
            why = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"the level checkpoints in {out / LEVELS} do not fit the {module_name} "
                                  f"that {out / RunDir.RECIPE} builds: {why}") from None
    return checkpoints


def _owners(session: Session, names: list[str]) -> dict[str, tuple[str, ...]]:
    """The checkpoint key prefixes each term owns: the module that holds all of its parameter
    group (``model.flows.level1.``: its buffers too), and that module's averages under
    train.ema (``ema.model__flows__level1__``); the parameters one by one when they share no module."""
    groups = session.model.parameter_groups()  # type: ignore[attr-defined]
    by_id = {id(p): n for n, p in session.model.named_parameters()}
    owners = {}
    for name in names:
        paths = [by_id[id(p)].split(".") for p in groups[name] if id(p) in by_id]
        common = os.path.commonprefix([p[:-1] for p in paths]) if paths else []
        prefixes = [".".join(common) + "."] if common else [".".join(p) for p in paths]
        owners[name] = tuple(f"model.{p}" for p in prefixes) + tuple(f"ema.model__{p.replace('.', '__')}"
                                                                    for p in prefixes)
    return owners


def _owner(key: str, owners: dict[str, tuple[str, ...]]) -> str | None:
    for name, prefixes in owners.items():
        if any(key == p or (p.endswith(".") or p.endswith("__")) and key.startswith(p) for p in prefixes):
            return name
    return None


# -- the job ----------------------------------------------------------------------------------
def train_level(session: Session, reporter: Reporter, out: Path, *,
                overwrite: bool = False) -> tuple[RunDir, dict[str, Any]]:
    """One job's own part: joins ``out``, trains and evaluates its level alone in
    ``out/levels/<term>`` (`flowkit.runs.execute.execute`); returns that directory and summary.
    `flowkit.runs.run.start_run` then lets go of ``session`` and calls `assemble`, which builds
    the whole model: the two are never in memory together."""
    recipe = session.recipe
    name = term_names(session)[recipe.train.level]
    join(out, recipe)
    if overwrite:
        # Under DIR/.lock: an assembly loading this level's old checkpoints finishes before they
        # are removed, and none starts until the summary says the level is being retrained.
        shared = RunDir.existing(Path(out))
        with shared.lock("retrain a level of", wait=True):
            rundir = RunDir.create(name, shared.level(name).path, overwrite=True)
            supersede_whole_model(shared, name)
    else:
        rundir = RunDir.create(name, RunDir(Path(out)).level(name).path)
    with rundir:
        return rundir, execute(session, rundir, reporter)


def supersede_whole_model(shared: RunDir, level: str) -> None:
    """The whole model's summary.json and report.md describe the weights of every level as they
    were; once ``level`` trains again (``--overwrite``) its old weights are gone, so the summary
    becomes status "retraining" (the old one kept inside it, under "previous") and report.md
    becomes report.previous.md. Readers that want a finished run (reports, ablations) then say
    so instead of showing figures of weights that no longer exist; the job that finishes last
    assembles and writes them anew. The caller holds ``shared``'s lock."""
    previous = shared.read_summary()
    if not previous:
        return
    retraining = sorted({*previous.get("retraining", []), level})
    if previous.get("status") == "retraining":
        shared.write_summary({**previous, "retraining": retraining})
        return
    shared.write_summary({"status": "retraining", "retraining": retraining, "previous": previous})
    if shared.report_path.is_file():
        shared.report_path.replace(shared.previous_report_path)


def assemble(out: Path, plugins: Plugins, reporter: Reporter) -> tuple[RunDir, dict[str, Any]] | None:
    """The whole model of level-jobs directory ``out`` evaluated, sampled and summarised once
    every level has finished (under ``out/.lock``: one job at a time, and not again for the same
    checkpoints); None, after saying which levels are missing, before then."""
    shared = RunDir.existing(out)
    with shared.lock("assemble the levels of", wait=True):
        recipe = load_recipe(shared.recipe_path, plugins.registries)
        session = build_session(recipe, plugins)
        names = term_names(session)
        missing = missing_levels(out, names)
        if missing:
            reporter.message(missing_message(out, names, missing) + " The job that finishes the last one "
                             "evaluates and samples the whole model.")
            return None
        previous = shared.read_summary()
        latest = {n: _identity(out, latest_checkpoint(shared.level(n).checkpoints)) for n in names}
        assembled = {n: {k: v.get(k) for k in ("checkpoint", "weights_sha256")}
                     for n, v in previous.get("levels", {}).items()}
        if previous.get("status") == "finished" and assembled == latest:
            return shared, previous  # another job assembled these very weights
        started = time.perf_counter()
        reporter.message(f"Every level of {out} has finished: evaluating and sampling the whole model...")
        load_levels(session, out)
        jobs = {n: shared.level(n).read_summary() for n in names}
        summary = whole_model_summary(session, shared, reporter, jobs, latest)
        summary["wall_s"] = time.perf_counter() - started
        shared.write_summary(summary)
        write_report(shared)
        shared.previous_report_path.unlink(missing_ok=True)  # superseded by the report just written
        shared.metrics.close()
        return shared, summary


def _identity(out: Path, checkpoint: Path) -> dict[str, Any]:
    """A level's checkpoint and the sha256 of its weights (state.json records it): a level
    trained again (``--overwrite``) has the same checkpoint name but other weights."""
    return {"checkpoint": str(checkpoint.relative_to(out)), "weights_sha256": weights_sha256(checkpoint)}


def whole_model_summary(session: Session, shared: RunDir, reporter: Reporter, jobs: dict[str, dict[str, Any]],
                        checkpoints: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The whole model's summary, as `flowkit.runs.execute.execute` reports a run's (its
    evaluation and summary, shared): test and train bits/dim over every dimension, the sample
    grids; training figures add up the level jobs' (``levels`` keeps each job's own)."""
    evaluated = evaluate_and_sample(session, shared, reporter)
    seconds = sum(job["train_seconds"] for job in jobs.values())
    images = sum(job["train_images_per_s"] * job["train_seconds"] for job in jobs.values())
    first = next(iter(jobs.values()))
    training = {
        "preset": first.get("preset", ""),
        "steps": sum(job["steps"] for job in jobs.values()),  # of all jobs together
        "train_images_per_s": images / max(seconds, 1e-9),  # per second of one job's training
        "train_seconds": seconds,
        "peak_memory_bytes": max(job["peak_memory_bytes"] for job in jobs.values()),  # of the largest job
        "peak_memory_kind": first["peak_memory_kind"],
    }
    summary = summarise(session, shared, evaluated, training)
    summary["levels"] = {name: {**checkpoints[name], "steps": job["steps"], "train_seconds": job["train_seconds"],
                                "test_bpd": job["test_bpd"], "peak_memory_bytes": job["peak_memory_bytes"],
                                "device": job["device"]}
                         for name, job in jobs.items()}
    return summary
