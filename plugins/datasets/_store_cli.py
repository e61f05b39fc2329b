"""The ``flowkit data`` command group of the store plugin: ``prepare``, ``verify``, ``bench``.

Private to ``flowkit_plugins.datasets``; `store` adds the group through ``flowkit_add_commands``.
Commands use only the CLI's public surface (`flowkit.cli.public`): errors raised as
`flowkit.FlowkitError` become a clean message and exit 2.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click


@contextmanager
def _progress(label: str) -> Iterator[Any]:
    """A rich progress bar on a terminal, plain lines otherwise; yields ``update(what, done, total)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from flowkit.cli.public import console, progress_enabled

    if not progress_enabled():
        last: dict[str, int] = {}

        def plain(what: str, done: int, total: int) -> None:
            if done == total or done - last.get(what, -total) >= max(total // 10, 1):
                last[what] = done
                console.print(f"{label} {what}: {done:,} of {total:,} images")

        yield plain
        return
    tasks: dict[str, Any] = {}
    with Progress(TextColumn(f"[bold]{label}[/] {{task.description}}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console) as bar:
        def update(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done)

        yield update


def data_group() -> click.Group:
    @click.group("data")
    def data() -> None:
        """Prepared stores: decode and resize images once into memory-mapped arrays (docs/data.md)."""

    @data.command("prepare")
    @click.argument("source", type=click.Path(path_type=Path))
    @click.option("--out", "out", type=click.Path(path_type=Path), required=True,
                  help="The store folder to write (new or empty, or an unfinished store of the same source to resume).")
    @click.option("--size", type=int, default=0, show_default=True,
                  help="0 keeps the size; S center-crops every image to a square and resizes it to SxS (Image.BOX).")
    @click.option("--labels", is_flag=True, help="Store the labels (class subfolders, y_train/y_test, the batches' "
                                                 "labels); refused where the source has none.")
    @click.option("--format", "source_format", default="auto", show_default=True,
                  type=click.Choice(["auto", "folder", "npz", "cifar10", "imagenet"]),
                  help="The source's format; auto tells them apart by their files.")
    @click.option("--chunk", "chunk_images", type=int, default=4096, show_default=True,
                  help="Images per checksummed chunk (and per step of a resume).")
    @click.option("--max-value", "max_value", type=int, default=255, show_default=True,
                  help="The largest pixel value of the format (16 for scikit-learn's digits).")
    def prepare_cmd(source: Path, out: Path, size: int, labels: bool, source_format: str, chunk_images: int,
                    max_value: int) -> None:
        """Decode and resize SOURCE once into a store at --out: a folder of PNG/JPEG/WebP images (train/ and
        test/ subfolders, class subfolders as labels), an .npz with x_train/x_test, the CIFAR-10 python
        folder or the downsampled-ImageNet .npz batches. Resumes where an interrupted prepare stopped."""
        from flowkit.cli.public import console
        from flowkit_plugins.datasets._arrays import local_path
        from flowkit_plugins.datasets._prepare import Options, open_source, prepare

        options = Options(size=size, labels=labels, chunk_images=chunk_images, max_value=max_value)
        out = local_path(str(out))
        src = open_source(local_path(str(source)), source_format, options)
        console.print(f"{src.kind} source {src.path}: {src.counts['train']:,} train and {src.counts['test']:,} test "
                      f"images of shape {src.shape}" + (f", {len(src.classes)} classes" if src.classes else ""))
        with _progress("prepare") as update:
            index, worked = prepare(src, out, update)
        if not worked:
            console.print(f"{out} already holds this store, complete; nothing to do.")
        for note in index["notes"]:
            console.print(f"  note: {note}")
        console.print(f"Store {out}: index {out / 'index.json'}; use it with --set data.use=store "
                      f"--set data.path={json.dumps(str(out))}" + (" --set data.labels=true" if index["classes"] else ""))

    @data.command("verify")
    @click.argument("store_dir", type=click.Path(path_type=Path))
    def verify_cmd(store_dir: Path) -> None:
        """Recompute every chunk's checksum of the store STORE_DIR and name each damaged chunk (exit 2)."""
        from flowkit.cli.public import console
        from flowkit_plugins.datasets._arrays import local_path
        from flowkit_plugins.datasets._store import check, open_store

        store = open_store(local_path(str(store_dir)))
        total = sum(int(store.index["splits"][s]["count"]) for s in ("train", "test"))
        done = 0
        with _progress("verify") as update:
            def step(count: int) -> None:
                nonlocal done
                done += count
                update("chunks", done, total)

            check(store, step)
        chunks = sum(len(store.index["splits"][s]["chunks"]) for s in ("train", "test"))
        console.print(f"{store.folder}: all {chunks} chunks ({total:,} images) match their checksums.")

    @data.command("bench")
    @click.argument("store_dir", type=click.Path(path_type=Path))
    @click.option("--batch-size", type=int, default=256, show_default=True)
    @click.option("--n-bits", type=int, default=8, show_default=True, help="Data levels kept, 1..8.")
    @click.option("--seconds", type=float, default=5.0, show_default=True, help="How long to time the whole path.")
    @click.option("--prefetch", type=int, default=2, show_default=True,
                  help="Batches read ahead in the background thread (0: on the timing thread), as train.prefetch.")
    @click.option("--device", default="cpu", show_default=True, help='"cpu", "cuda", "cuda:1" or "auto".')
    @click.option("--channels-last", is_flag=True, help="Time the channels-last layout change too (train.channels_last).")
    @click.option("--threads", type=int, default=1, show_default=True,
                  help="torch threads of the timing thread (0: all cores); the prefetch thread reads beside it.")
    @click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
    @click.pass_context
    def bench_cmd(ctx: click.Context, store_dir: Path, batch_size: int, n_bits: int, seconds: float, prefetch: int,
                  device: str, channels_last: bool, threads: int, as_json: bool) -> None:
        """Time the training input path on the store STORE_DIR: read, n_bits, host-to-device, layout and
        uniform dequantization of random batches, in batches/s and images/s, and each stage alone."""
        import os

        import torch
        from rich.table import Table

        import flowkit
        from flowkit.bench.data_path import measure, stage_times
        from flowkit.cli.public import console, get_plugins
        from flowkit.errors import FlowkitError
        from flowkit.runs.data import Split
        from flowkit.runs.session import pick_device
        from flowkit_plugins.datasets._arrays import local_path
        from flowkit_plugins.datasets._store import open_store

        if not 1 <= n_bits <= 8 or batch_size < 1 or prefetch < 0 or seconds <= 0:
            raise FlowkitError(f"--n-bits {n_bits} must be 1..8, --batch-size {batch_size} >= 1, --prefetch "
                               f"{prefetch} >= 0 and --seconds {seconds} > 0.")
        torch.set_num_threads(threads or os.cpu_count() or 1)
        store = open_store(local_path(str(store_dir)))
        split = Split(store.images["train"], None, n_bits, int(store.index.get("max_value", 255)))
        target = pick_device(device)
        dequantizer = flowkit.build("dequantizer", "uniform", plugins=get_plugins(ctx), in_shape=store.shape).to(target)

        def dequantize(x: torch.Tensor) -> torch.Tensor:
            return dequantizer(x, n_bits)[0]

        with torch.no_grad():
            stages = stage_times(split, dequantize, batch_size=batch_size, device=target, channels_last=channels_last)
            result = measure(split, dequantize, batch_size=batch_size, seconds=seconds, device=target,
                             prefetch=prefetch, channels_last=channels_last)
        result.stages_ms = stages
        load = os.getloadavg()[0]
        if as_json:
            console.print_json(json.dumps({**result.as_dict(), "load_1min": load, "store": str(store.folder)}))
            return
        table = Table(title=f"input path of {store.folder} ({len(split):,} train images {split.shape}, batch "
                            f"{result.batch_size}, n_bits {n_bits}, {target}, prefetch {prefetch})")
        table.add_column("measure")
        table.add_column("value", justify="right")
        table.add_row("images/s", f"{result.images_per_s:,.0f}")
        table.add_row("batches/s", f"{result.batches_per_s:,.1f}")
        table.add_row("MB/s (uint8 read)", f"{result.megabytes_per_s:,.0f}")
        table.add_row("batches timed", f"{result.batches} in {result.seconds:.1f} s")
        for stage, ms in stages.items():
            table.add_row(f"  {stage} alone, ms/batch", f"{ms:.2f}")
        table.add_row("load average (1 min)", f"{load:.2f}")
        console.print(table)

    return data
