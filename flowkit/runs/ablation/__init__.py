"""Ablations: a grid or a list of variants, run at one budget over seeds, compared in one report.

- `spec`: the ablation file, resolved and validated before anything runs; duplicates found.
- `execute`: the runs as ``flowkit run`` processes, locally or through submitit; resumable.
- `report`, `plots`: the comparison, from the run directories alone (also `flowkit compare`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from flowkit.errors import FlowkitError
from flowkit.registry import Registries
from flowkit.runs.ablation import plots
from flowkit.runs.ablation.execute import plan, require_submitit, run_local, run_submitit, write_manifest
from flowkit.runs.ablation.report import write_report
from flowkit.runs.ablation.results import VariantRow, group_by_recipe, read_run
from flowkit.runs.ablation.spec import Ablation, load_ablation
from flowkit.runs.rundir import RunDir


def run_ablation(path: Path, registries: Registries, *, preset: str | None = None, out: Path | None = None,
                 jobs: int | None = None, executor: str = "local", cluster: str | None = None,
                 retry_failed: bool = False,
                 say: Callable[[str], None] = print) -> Path:
    """Validates, runs what is not done yet, and writes the report; returns report.md."""
    ablation = load_ablation(path, registries, preset=preset)
    if cluster is not None:
        ablation = dataclasses.replace(ablation, slurm=dataclasses.replace(ablation.slurm, cluster=cluster))
    plots.require_matplotlib()  # before hours of training, not after
    if executor == "slurm":
        require_submitit()
    out = out or ablation.default_out
    jobs = jobs or ablation.params.jobs
    for twin, first in ablation.duplicates.items():
        say(f'variant "{twin}" resolves to the same recipe as "{first}": reported as a duplicate, not run.')
    todo, states = plan(ablation, out, registries, jobs=jobs, retry_failed=retry_failed)
    write_manifest(ablation, out)
    done = sum(1 for s in states.values() if s == "finished")
    say(f"{len(ablation.runs)} runs ({len(ablation.variants)} variants x {len(ablation.params.seeds)} seeds): "
        f"{done} finished, {len(todo)} to run, into {out}")
    if todo:
        if executor == "slurm":
            run_submitit(todo, ablation, out, say)
        else:
            run_local(todo, jobs, say)
    return report_ablation(ablation, out, jobs=jobs, executor=executor)


def report_ablation(ablation: Ablation, out: Path, *, jobs: int = 1, executor: str = "local") -> Path:
    rows: dict[str, VariantRow] = {}
    for run in ablation.runs:
        row = rows.setdefault(run.variant, VariantRow(run.variant, []))
        twin = ablation.duplicates.get(run.variant)
        if twin:
            row.duplicate_of = twin
            continue
        row.runs.append(read_run(out / "runs" / run.slug, run.variant, run.seed, run.recipe.to_dict()))
    for row in rows.values():  # a duplicate shows its twin's results
        if row.duplicate_of:
            row.runs = rows[row.duplicate_of].runs
    notes = []
    if jobs > 1 and executor == "local" and ablation.budget.kind == "minutes":
        notes.append(f"**Time budgets are unfair here:** {jobs} runs shared this machine's cores at a time "
                     "(--jobs), so a variant's minutes bought less than alone. Rerun with --jobs 1 to compare.")
    budget = f"{ablation.budget.kind} = {getattr(ablation.budget, ablation.budget.kind)}"
    title = f"Ablation {ablation.params.name}" + (f" (preset {ablation.preset})" if ablation.preset else "")
    description = (ablation.params.description + "\n\n" if ablation.params.description else "") + (
        f"Budget per run: {budget}; seeds {list(ablation.params.seeds)}; from `{ablation.source}`.")
    return write_report(out, list(rows.values()), title=title, description=description, notes=notes,
                        target_bpd=ablation.params.target_bpd, temperature=ablation.params.temperature)


def compare(paths: list[Path], out: Path, *, temperature: float = 1.0) -> Path:
    """The report of existing run directories, runs of one recipe up to the seed grouped."""
    missing = [str(p) for p in paths if not RunDir(p).recipe_path.is_file()]
    if missing:
        raise FlowkitError(f"not run directories (no recipe.toml): {', '.join(missing)}.")
    return write_report(out, group_by_recipe(paths), title="Comparison of " + ", ".join(p.name for p in paths),
                        temperature=temperature)
