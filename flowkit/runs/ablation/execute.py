"""Running an ablation's runs: one ``flowkit run`` process per run, on this machine
(``--jobs N`` at a time) or as SLURM jobs through submitit; resumable.

Each run is an ordinary run directory, ``OUT/runs/<variant>-seed<s>``, so a run can be
inspected, resumed or sampled like any other. Rerunning the ablation skips finished runs,
resumes interrupted ones from their checkpoints and starts the others; a run that failed
(NaN, bad shape) stays failed, with its error in the report, unless ``retry_failed``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flowkit.errors import FlowkitError
from flowkit.recipes.load import load_recipe
from flowkit.registry import Registries
from flowkit.runs.ablation.spec import Ablation, Run, comparable
from flowkit.runs.checkpoint import has_checkpoint
from flowkit.runs.rundir import RunDir, write_atomic, write_json_atomic

MANIFEST = "ablation.json"


@dataclass(frozen=True)
class Job:
    run: Run
    rundir: Path
    log: Path
    argv: list[str]


def run_state(rundir: Path) -> str:
    """``finished``, ``failed``, ``interrupted`` (a checkpoint to resume from) or ``new``."""
    run = RunDir(rundir)
    status = run.read_summary().get("status")
    if status in ("finished", "failed"):
        return status
    if has_checkpoint(run.checkpoints):
        return "interrupted"
    if run.error_path.is_file():
        return "failed"
    return "new"


def check_same_recipe(run: Run, rundir: Path, registries: Registries) -> None:
    """A run directory from an earlier invocation must hold this run's recipe: otherwise its
    results would be reported under a variant they do not belong to."""
    path = RunDir(rundir).recipe_path
    if not path.is_file():
        return
    done = load_recipe(path, registries)
    # The seed is part of what must match; the thread count --jobs sets is not.
    ignore = ("recipe.", "train.threads")
    wanted, found = comparable(run.recipe.to_dict(), ignore), comparable(done.to_dict(), ignore)
    if wanted != found:
        keys = [k for k in wanted.keys() | found.keys() if wanted.get(k) != found.get(k)]
        raise FlowkitError(
            f"{rundir} was run with another recipe than variant \"{run.variant}\" now resolves to "
            f"(differs in {', '.join(sorted(keys)[:5])}); use another --out, or delete that directory."
        )


def plan(ablation: Ablation, out: Path, registries: Registries, *, jobs: int,
         retry_failed: bool = False) -> tuple[list[Job], dict[str, str]]:
    """The runs still to do (skipping finished ones and duplicates) and each run's state."""
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    todo, states = [], {}
    for run in ablation.runs:
        rundir = out / "runs" / run.slug
        check_same_recipe(run, rundir, registries)
        state = run_state(rundir)
        if run.variant in ablation.duplicates:
            state = "duplicate"
        states[run.slug] = state
        if state in ("finished", "duplicate") or (state == "failed" and not retry_failed):
            continue
        if state == "interrupted":
            argv = [sys.executable, "-m", "flowkit", "run", "--resume", str(rundir)]
        else:
            argv = [sys.executable, "-m", "flowkit", "run", str(run.recipe_path)]
            if run.preset:
                argv += ["--preset", run.preset]
            for item in run.overrides:
                argv += ["--set", item]
            if threads:  # runs side by side share the cores
                argv += ["--set", f"train.threads={threads}"]
            argv += ["--out", str(rundir), "--overwrite"]
        todo.append(Job(run, rundir, out / "logs" / f"{run.slug}.log", argv))
    return todo, states


def write_manifest(ablation: Ablation, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "source": str(ablation.source), "preset": ablation.preset, "name": ablation.params.name,
        "description": ablation.params.description, "budget": {ablation.budget.kind: getattr(ablation.budget,
                                                                                             ablation.budget.kind)},
        "target_bpd": ablation.params.target_bpd, "temperature": ablation.params.temperature,
        "variants": ablation.variants, "duplicates": ablation.duplicates,
        "runs": [{"variant": r.variant, "seed": r.seed, "dir": f"runs/{r.slug}", "overrides": list(r.overrides)}
                 for r in ablation.runs],
    }
    write_json_atomic(out / MANIFEST, manifest)


def run_command(argv: list[str], log: str, rundir: str) -> int:
    """One run as a process, its output in ``log``; on failure the error lands in
    ``rundir/error.txt`` (for the report). Module-level, so submitit can pickle it."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    record_failure(code, Path(log), Path(rundir))
    return code


def record_failure(code: int, log: Path, rundir: Path) -> None:
    if code == 0:
        return
    text = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    errors = [line for line in text if line.startswith("Error:")] or text[-3:]
    rundir.mkdir(parents=True, exist_ok=True)
    write_atomic(RunDir(rundir).error_path, "\n".join(errors) + f"\n(exit {code}; log: {log})\n")


def run_local(jobs: list[Job], parallel: int, say: Callable[[str], None]) -> dict[str, int]:
    """Runs ``parallel`` jobs at a time as child processes; Ctrl-C stops them (they resume later)."""
    pending, running, codes = list(jobs), [], {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                say(f"run {job.run.slug} ({'resumed' if '--resume' in job.argv else 'started'})")
                RunDir(job.rundir).error_path.unlink(missing_ok=True)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                log = open(job.log, "w", encoding="utf-8")  # noqa: SIM115 - closed when the process ends
                proc = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT)
                running.append((job, proc, log))
            time.sleep(0.2)
            for job, proc, log in list(running):
                if proc.poll() is not None:
                    running.remove((job, proc, log))
                    log.close()
                    record_failure(proc.returncode, job.log, job.rundir)
                    codes[job.run.slug] = proc.returncode
                    say(f"run {job.run.slug}: " + ("done" if proc.returncode == 0 else f"failed (exit {proc.returncode})"))
    except KeyboardInterrupt:
        for _, proc, _ in running:
            proc.terminate()
        raise
    return codes


def require_submitit():  # noqa: ANN201 - the submitit module
    try:
        import submitit
    except ImportError:
        raise FlowkitError("--executor slurm needs submitit: pip install 'flowkit[ablate]'.") from None
    return submitit


def run_submitit(jobs: list[Job], ablation: Ablation, out: Path, say: Callable[[str], None]) -> dict[str, int]:
    """One SLURM job per run through submitit (``[slurm] cluster = "local"``: the same jobs
    as local processes, which is how the tests exercise this path). Waits for all of them."""
    submitit = require_submitit()
    slurm = ablation.slurm
    folder = out / "submitit"
    if slurm.cluster == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=slurm.timeout_min)
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        executor.update_parameters(
            timeout_min=slurm.timeout_min, cpus_per_task=slurm.cpus_per_task, mem_gb=slurm.mem_gb,
            gpus_per_node=slurm.gpus_per_node, name=f"flowkit-{ablation.params.name}",
            **({"slurm_partition": slurm.partition} if slurm.partition else {}),
        )
    submitted = []
    for job in jobs:
        RunDir(job.rundir).error_path.unlink(missing_ok=True)
        handle = executor.submit(run_command, job.argv, str(job.log), str(job.rundir))
        say(f"run {job.run.slug}: submitted as job {handle.job_id}")
        submitted.append((job, handle))
    codes = {}
    for job, handle in submitted:
        try:
            codes[job.run.slug] = handle.result()
        except Exception as exc:  # noqa: BLE001 - a job that died (time limit, node failure) is one failed run
            job.rundir.mkdir(parents=True, exist_ok=True)
            write_atomic(RunDir(job.rundir).error_path, f"the submitit job {handle.job_id} failed: {exc}\n")
            codes[job.run.slug] = 1
        say(f"run {job.run.slug}: " + ("done" if codes[job.run.slug] == 0 else "failed"))
    return codes
