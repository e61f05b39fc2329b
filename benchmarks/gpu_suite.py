"""Every GPU figure of issue 11 in one run: at most about 8 minutes on one GPU.

Rows, in order of importance (a row that would start after ``--budget-minutes`` is reported as
skipped, not run):

1. Glow and Flow++ ``paper`` presets (recipes/glow.toml, recipes/flowpp.toml) at batch 64 and 256,
   eager, in fp32 (TF32 off for matmuls and cuDNN), TF32 (on for both) and bf16
   (``train.amp = "bf16"``, TF32 on for what stays in float32): train images/s and peak memory.
   ``train.accumulate = 1``: the batch is one micro-batch (Glow's preset accumulates 8 x 64).
2. Wavelet Flow's ``paper`` preset (recipes/wavelet_flow_affine.toml, 64x64) per level
   (``train.level = i``, each level's own step alone) at batch 64 in TF32, with its memory.
3. The same rows compiled (``train.compile = "default"``).

The first row of each recipe also checks that a training step makes no host synchronisation
(``torch.cuda.set_sync_debug_mode("error")`` around two steps after warm-up). Out of memory is
reported as OOM in the table; any other failure of a row as its error, and the suite goes on.

A training step is the trainer's own (`flowkit.bench.harness.flowkit_contender`: loss,
backward, clipping, optimiser step, EMA), on synthetic uint8 images of the preset's shape
already on the device (no dataset file is needed). Images/s: the steps of about
``--seconds`` seconds after two warm-up steps, synchronised at the ends only. Peak memory on
CUDA: ``torch.cuda.max_memory_allocated`` over those steps (model, optimiser state,
activations, batches); on the CPU torch keeps no peak, so the column gives the bytes autograd
saves for backward in one step's forward instead (`flowkit.bench.timing.saved_for_backward`).
TF32 is set per row and the process's settings are put back after it (`flowkit.bench.harness.tf32`).

Usage::

    python benchmarks/gpu_suite.py                          # the GPU figures (cuda)
    python benchmarks/gpu_suite.py --device cpu --tiny      # the same rows, tiny models, CPU: a check
    python benchmarks/gpu_suite.py --json suite.json        # also the figures as JSON

``--tiny``: the same recipes and presets with 1-2 steps per flow, nets 8-16 wide, batches 2 and
4 and fewer seconds per row, so the whole suite runs on a CPU in a couple of minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
GIB = 2**30

#: Recipe, image shape of its paper preset, and the --set overrides of --tiny.
MODELS: dict[str, tuple[str, tuple[int, int, int], list[str]]] = {
    "glow": ("glow.toml", (3, 32, 32), [
        "model.depth=2", "model.step.coupling.net.hidden=16", "train.init_batch_size=8"]),
    "flowpp": ("flowpp.toml", (3, 32, 32), [
        "model.step.coupling.net.hidden=8", "model.step.coupling.net.blocks=1", "model.step.coupling.components=4",
        "dequantizer.step.coupling.net.hidden=8", "dequantizer.step.coupling.net.blocks=1",
        "dequantizer.step.coupling.components=4", "dequantizer.context_channels=8", "dequantizer.context_blocks=1",
        "train.init_batch_size=8"]),
    "wavelet_flow": ("wavelet_flow_affine.toml", (3, 64, 64), [
        "model.depth=[1, 1, 1, 1, 1, 1, 1]", "model.hidden=[8, 8, 8, 8, 8, 8, 8]", "train.init_batch_size=4"]),
}
PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass
class Row:
    model: str
    batch: int
    precision: str
    compiled: bool = False
    level: int | None = None  # Wavelet Flow: train.level
    memory: str = "store"  # train.memory: "recompute" rebuilds activations in backward (Flow++'s 12 GiB target)
    check_syncs: bool = False
    # results
    images_per_s: float | None = None
    steps: int | None = None
    memory_bytes: int | None = None
    memory_kind: str = ""
    host_syncs: str = ""
    status: str = "not run"
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


COMPILE = "train.compile=default"  # the compiled rows: torch.compile of the model's terms for training


def plan(tiny: bool, device: str, with_compile: bool) -> tuple[list[Row], list[str]]:
    """The rows to run, most important first, and notes on what is left out."""
    from flowkit import load_recipe

    notes = []
    batches = (2, 4) if tiny else (64, 256)
    precisions = PRECISIONS if device.startswith("cuda") else ("fp32", "bf16")
    if not device.startswith("cuda"):
        notes.append("TF32 rows are CUDA-only: left out on the CPU.")
    rows = []
    for model in ("glow", "flowpp"):
        for batch in batches:
            for precision in precisions:
                rows.append(Row(model, batch, precision, check_syncs=(batch == batches[0] and precision == precisions[1])))
    levels = load_recipe(RECIPES / MODELS["wavelet_flow"][0], preset="paper").model.params.levels
    wavelet_precision = "tf32" if device.startswith("cuda") else "fp32"
    rows += [Row("wavelet_flow", batches[0], wavelet_precision, level=i, check_syncs=i == 0) for i in range(levels + 1)]
    if not with_compile:
        notes.append("compiled rows left out (--no-compile).")
    else:
        rows += [Row("glow", batches[-1], p, compiled=True) for p in precisions if p != "fp32"]
        rows += [Row("flowpp", batches[0], p, compiled=True) for p in precisions if p != "fp32"]
    # Flow++ at batch 64 in <= 12 GiB: public code needs ~50 GiB. The paper preset already
    # checkpoints each step (one step's activations plus every step's output are kept);
    # recompute drops the 10 + 4 step outputs too, at the price of their inverses in backward.
    rows += [Row("flowpp", batches[0], p, memory="recompute") for p in precisions if p != "fp32"]
    return rows, notes


def run_row(row: Row, plugins: Any, device: str, tiny: bool, seconds: float) -> Row:
    """Builds the row's recipe, times its training step and measures its memory, in place."""
    from flowkit.bench.harness import flowkit_contender, prepared, tf32
    from flowkit.bench.timing import host_syncs, saved_for_backward, synchronize, train_images_per_s

    recipe, shape, tiny_overrides = MODELS[row.model]
    overrides = ["train.accumulate=1", f'train.amp="{"bf16" if row.precision == "bf16" else "off"}"']
    # --tiny: one thread, since tiny tensors gain nothing from more and a shared machine's cores
    # make two threads wait on each other (10x slower steps measured).
    overrides += [*tiny_overrides, "train.threads=1"] if tiny else []
    if row.level is not None:
        overrides.append(f"train.level={row.level}")
    if row.compiled:
        overrides.append(COMPILE)
    if row.memory != "store":
        overrides.append(f'train.memory="{row.memory}"')
    cuda = device.startswith("cuda")
    start = time.perf_counter()
    try:
        # bf16: TF32 too, for what stays in float32; the process's settings are back after the row.
        with tf32(row.precision != "fp32"), prepared(RECIPES / recipe, plugins, preset="paper", overrides=overrides,
                                                     shape=shape, batch=row.batch, device=device) as prep:
            contender = flowkit_contender(prep)
            step, dev = contender.train_step, prep.session.device
            for x in prep.batches[:2]:  # warm-up (and, compiled, the compilation)
                step(x)
            if cuda:
                synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            row.images_per_s, row.steps = train_images_per_s(step, prep.batches, warmup=0, min_seconds=seconds)
            if cuda:
                row.memory_bytes, row.memory_kind = int(torch.cuda.max_memory_allocated(dev)), "max_memory_allocated"
            else:
                row.memory_bytes = saved_for_backward(lambda: contender.train_loss(prep.batches[0]), contender.modules)
                row.memory_kind = "saved for backward"
            if row.check_syncs:
                row.host_syncs = ("none" if (found := host_syncs(step, prep.batches)) is None else found) if cuda \
                    else "n/a (CPU)"
            row.extra = {"params": contender.params, "dtype": contender.dtype}
        row.status = "ok"
    except torch.OutOfMemoryError:
        row.status = "OOM"
    except Exception as exc:  # noqa: BLE001 - one failed row is reported; the suite goes on
        row.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        row.seconds = time.perf_counter() - start
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def _bytes(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def table(rows: list[Row], title: str, notes: list[str]) -> Any:
    from rich.table import Table

    kinds = sorted({r.memory_kind for r in rows if r.memory_kind})
    notes = [*notes, f"memory: {', '.join(kinds) or 'none measured'}; s: seconds the row took, build included."]
    t = Table(title=title, caption=" ".join(notes), caption_justify="left")
    for name in ("model", "batch", "precision", "compiled", "memory mode", "level", "train img/s", "steps", "memory",
                 "host syncs", "status", "s"):
        t.add_column(name, justify="right" if name in ("batch", "train img/s", "steps", "memory", "s") else "left")
    for r in rows:
        t.add_row(r.model, str(r.batch), r.precision, "yes" if r.compiled else "no", r.memory,
                  "" if r.level is None else str(r.level),
                  "" if r.images_per_s is None else f"{r.images_per_s:,.1f}", "" if r.steps is None else str(r.steps),
                  _bytes(r.memory_bytes), r.host_syncs, r.status, f"{r.seconds:.0f}")
    return t


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help='"cuda" (default), "cuda:1" or "cpu"')
    parser.add_argument("--tiny", action="store_true", help="tiny models and batches: a quick check on any machine")
    parser.add_argument("--budget-minutes", type=float, default=7.5, help="start no row after this (default 7.5)")
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per row (default 3; --tiny 0.3)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled rows")
    parser.add_argument("--only", help="run only the rows of this model (glow, flowpp, wavelet_flow)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device is available; use --device cpu (with --tiny).")

    from rich.console import Console

    from flowkit.plugins import make_plugins

    console = Console(width=max(Console().width, 140))
    plugins = make_plugins()
    seconds = args.seconds if args.seconds is not None else (0.3 if args.tiny else 3.0)
    rows, notes = plan(args.tiny, args.device, not args.no_compile)
    if args.only:
        rows = [r for r in rows if r.model == args.only]
    began = time.perf_counter()
    for row in rows:
        # A compiled row starts only with two minutes left: compiling a paper-size flow takes that.
        if time.perf_counter() - began > args.budget_minutes * 60 - (120 if row.compiled else 0):
            row.status = "skipped (time budget)"
            continue
        run_row(row, plugins, args.device, args.tiny, seconds)
        console.print(f"{row.model} batch {row.batch} {row.precision}{' compiled' if row.compiled else ''}"
                      f"{'' if row.memory == 'store' else f' {row.memory}'}"
                      f"{'' if row.level is None else f' level {row.level}'}: {row.status} ({row.seconds:.0f} s)",
                      highlight=False)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    title = (f"issue 11 GPU suite on {where}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}"
             f"{', --tiny' if args.tiny else ''}: {time.perf_counter() - began:.0f} s")
    console.print(table(rows, title, notes))
    if args.json:
        args.json.write_text(json.dumps({"title": title, "notes": notes, "rows": [asdict(r) for r in rows]}, indent=2))
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
