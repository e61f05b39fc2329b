"""The one table of ``flowkit bench``: a row per figure, a column per implementation, and the
ratio flowkit / reference. Built here, printed by the CLI."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.markup import escape
from rich.table import Table

from flowkit.bench.side_by_side import BenchResult
from flowkit.bench.timing import Figures

MIB = 2**20


def _number(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / MIB:,.1f} MiB"


def bench_table(result: BenchResult) -> Table:
    figures = result.figures
    c, h, w = result.shape
    title = f"flowkit bench {result.recipe}" + (f" --preset {result.preset}" if result.preset else "")
    title += f" on {c}x{h}x{w} images"
    first = figures[0]
    caption = [f"{result.rounds} alternating rounds of {first.steps} training steps (and {first.steps} evaluation "
               f"batches, {first.sample_batches} sampling batch) each, in one process; best = the fastest round."]
    if result.check is not None:
        caption.append(result.check.sentence() + ".")
    table = Table(title=escape(title), caption=escape(" ".join(caption)), caption_justify="left")
    table.add_column("figure")
    for f in figures:
        table.add_column(escape(f.name), justify="right")
    compared = len(figures) > 1
    if compared:
        table.add_column(escape(f"{figures[0].name} / {figures[1].name}"), justify="right")

    def row(label: str, show: Callable[[Figures], str], key: str | None = None) -> None:
        cells = [show(f) for f in figures]
        if compared:
            ratio = result.ratio(key) if key else None
            cells.append("" if ratio is None else f"{ratio:.2f}x")
        table.add_row(label, *cells)

    def attr(name: str, fmt: Callable[[Any], str] = str) -> Callable[[Figures], str]:
        return lambda f: fmt(getattr(f, name))

    row("parameters", attr("params", lambda v: f"{v:,}"), "params")
    row(f"train images/s, best of {result.rounds}", attr("train_images_per_s", _number), "train_images_per_s")
    row("train images/s, median", attr("train_images_per_s_median", _number), "train_images_per_s_median")
    row("ms/step, best", attr("ms_per_step", _number), "ms_per_step")
    row("eval images/s (log-likelihood, no grad)", attr("eval_images_per_s", _number), "eval_images_per_s")
    row("sampling images/s (T = 1" + (f", {first.sampler} inverse" if first.sampler else "")
        + (f"; {figures[1].name}: inverse from its prior)" if compared else ")"),
        attr("sample_images_per_s", _number),
        "sample_images_per_s")
    for name in first.other_sample_seconds:  # TarFlow's Jacobi sampler beside its sequential one
        row(f"sampling images/s (T = 1, {name} inverse)",
            lambda f, name=name: _number(f.other_sample_images_per_s(name)))
    if first.device.startswith("cuda"):
        row("peak CUDA memory of a step (max_memory_allocated, less the other's resident)",
            attr("peak_memory_bytes", _mib), "peak_memory_bytes")
    row("activations saved for backward (autograd's saved tensors)", attr("saved_bytes", _mib), "saved_bytes")
    row("device", attr("device"))
    row("dtype (train.amp)", attr("dtype"))
    row("compile (train.compile)", attr("compile"))
    row("threads", attr("threads"))
    row("batch", attr("batch"))
    return table
