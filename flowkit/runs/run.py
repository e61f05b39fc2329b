"""One run from a recipe: train, evaluate, sample, summarise."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from flowkit.plugins import Plugins
from flowkit.recipes.load import Recipe, load_recipe
from flowkit.runs.evaluate import evaluate, evaluate_iw
from flowkit.runs.rundir import RunDir
from flowkit.runs.sampling import sample_grids
from flowkit.runs.session import Session, build_session
from flowkit.runs.trainer import Reporter, Trainer, peak_memory_bytes

DENSITY = "dequantized bound: -log p(y) + D log 2^n_bits + log q(u|x), over all C*H*W dims"
DENSITY_ALONE = ("term {term} alone, a density of its own: -log p(term) + D_t log 2^n_bits over its own D_t dims "
                 "(the model's other terms were not trained)")
TRAIN_EVAL_IMAGES = 10_000  # train bpd is measured on this many training images, like the test set


def count_parameters(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def execute(session: Session, rundir: RunDir, reporter: Reporter, *, resume: bool = False,
            iw_samples: int = 0) -> dict[str, Any]:
    """Trains, evaluates on the full test set, samples; writes summary.json and report.md."""
    started = time.perf_counter()
    recipe = session.recipe
    if not resume:
        rundir.recipe_path.write_text(recipe.to_toml(), encoding="utf-8")
    trainer = Trainer(session, rundir, reporter)
    trainer.train(resume=resume)
    cfg = recipe.train
    reporter.message(f"Evaluating on {len(session.test_x)} test images...")
    alone = trainer.parts[0] if trainer.parts else None
    test = evaluate(session, session.test_x, batch_size=cfg.eval_batch_size, seed=cfg.seed + 1, alone=alone)
    train_x = session.train_x[:TRAIN_EVAL_IMAGES]
    train = evaluate(session, train_x, batch_size=cfg.eval_batch_size, seed=cfg.seed + 2, alone=alone)
    samples, overflowed_by_t = [], {}
    if trainer.parts is None:
        samples, overflowed_by_t = sample_grids(session, rundir.samples, n=recipe.sample.n,
                               temperatures=recipe.sample.temperatures, seed=recipe.sample.seed)
    memory, memory_kind = peak_memory_bytes(session.device)
    st = trainer.state
    summary: dict[str, Any] = {
        "status": "finished",
        "recipe": recipe.meta.name,
        "preset": recipe.preset,
        "dataset": session.dataset.name,
        "image_shape": list(session.dataset.shape),
        "n_bits": session.n_bits,
        "density": DENSITY if alone is None else DENSITY_ALONE.format(term=alone),
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
    }
    if samples:
        summary["samples_overflowed"] = overflowed_by_t  # images per grid whose inverse overflowed
    if iw_samples and trainer.parts is None:
        reporter.message(f"Importance-weighted evaluation with {iw_samples} samples...")
        summary["test_bpd_iw"] = evaluate_iw(session, session.test_x, k=iw_samples,
                                             batch_size=cfg.eval_batch_size, seed=cfg.seed + 3)
        summary["iw_samples"] = iw_samples
    if alone is not None:
        summary["trained_part"] = alone
    rundir.log({"step": st.step, "final": True, **{f"test_{k}": v for k, v in test.items()}})
    rundir.write_summary(summary)
    write_report(rundir, recipe, summary)
    return summary


def _by_prefix(result: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: v for k, v in result.items() if k.startswith(prefix)}


def part_rows(summary: dict[str, Any]) -> list[tuple[str, float]]:
    """Per-term figures labelled for what they are (the report and the final table)."""
    rows = [(f"test bits/dim of {part} (over its own dims)", v) for part, v in summary["test_bpd_per_part"].items()]
    shares = summary["test_bpd_share_per_part"]
    if len(shares) > 1:
        rows += [(f"share of test bits/dim from {part} (-log p term / (D log 2))", v) for part, v in shares.items()]
    return rows


def write_report(rundir: RunDir, recipe: Recipe, summary: dict[str, Any]) -> None:
    lines = [f"# {recipe.meta.name}", "", recipe.meta.description, "",
             "| metric | value |", "| --- | --- |"]
    for key in ("test_bpd", "train_bpd", "params", "steps", "train_images_per_s", "peak_memory_bytes",
                "wall_s", "device"):
        value = summary.get(key)
        lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    for label, value in part_rows(summary):
        lines.append(f"| {label} | {value:.4f} |")
    for temperature, count in summary.get("samples_overflowed", {}).items():
        lines.append(f"| samples overflowed at {temperature} | {count} of {recipe.sample.n} |")
    lines += ["", f"Density reported: {summary['density']}.", ""]
    lines += [f"![{p}]({p})" for p in summary.get("samples", [])]
    (rundir.path / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def start_run(recipe_path: Path | None, plugins: Plugins, reporter: Reporter, *, preset: str | None = None,
              overrides: tuple[str, ...] = (), out: Path | None = None, overwrite: bool = False,
              resume: Path | None = None, iw_samples: int = 0) -> tuple[RunDir, dict[str, Any]]:
    """The `flowkit run` command without its console: returns the run directory and summary."""
    if resume is not None:
        rundir = RunDir.existing(resume)
        recipe = load_recipe(rundir.recipe_path, plugins.registries)
        return rundir, execute(build_session(recipe, plugins), rundir, reporter, resume=True, iw_samples=iw_samples)
    recipe = load_recipe(recipe_path, plugins.registries, preset=preset, overrides=overrides)
    # Everything that can fail on bad input (data files, shapes) fails before the directory exists.
    session = build_session(recipe, plugins)
    rundir = RunDir.create(recipe.meta.name + (f"-{preset}" if preset else ""), out, overwrite=overwrite)
    return rundir, execute(session, rundir, reporter, iw_samples=iw_samples)
