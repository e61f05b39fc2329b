"""How each model family's cost grows with the image: 32, 64, 128 and 256 pixels a side.

For every family of ``benchmarks/resolution_scaling.toml`` (a recipe and preset, scaled with the
image as its paper scales it; any recipe joins by adding a table) and every size, in a fresh
process on synthetic RGB images of that size (a flow's cost does not depend on the content):

- ``params``: the parameters of the whole model (and dequantizer);
- ``train ms/image``: the median of ``--steps`` optimiser steps (`Trainer.train_step`: forward,
  backward, clipping, update) after one warm-up step, over the batch;
- ``activations/image``: the bytes autograd saves for backward in one training step
  (`flowkit.bench.timing.saved_for_backward`, exact), over the batch, with the activations stored
  (``train.memory = "store"``) and rebuilt by the inverse (``"recompute"``);
- ``sample images/s``: ``model.sample(n, temperature=1)`` timed after a one-image warm-up;
- for a model with independent terms (Wavelet Flow's levels): each term trained alone, as a level
  job trains it (forward and backward of its own bits/dim, crops as in training), in ms per
  image, beside the whole model's forward and backward timed the same way. Run as parallel jobs,
  one per GPU or machine, the wall time of a step is the largest level's (``levels in
  parallel``); one after another it is about their sum, the whole model's.

Usage::

    python benchmarks/resolution_scaling.py                     # every family, 32..256; about 20 min on 2 cores
    python benchmarks/resolution_scaling.py --families glow --sizes 32,64 --steps 2
    python benchmarks/resolution_scaling.py --json out.json --plot docs/images/resolution_scaling.png

The table and plot of docs/performance.md ("Cost against resolution") come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import tomllib
from pathlib import Path

from _child import add_child_options, answer_as_child, measure_in_child

ROOT = Path(__file__).resolve().parents[1]
SPEC = Path(__file__).with_name("resolution_scaling.toml")
MIB = 2**20


def batch_for(size: int, base: int) -> int:
    """Images per measured step: ``base`` at 32x32, fewer as the image grows (at least 1), so each
    step holds about the same number of pixels."""
    return max(1, base * 32 * 32 // (size * size))


def _train_seconds(trainer, x) -> float:  # noqa: ANN001
    import torch

    tick = time.perf_counter()
    loss, _, _ = trainer.train_step(x, len(x))
    float(loss)  # waits for the step (a host read): the step's time, not its enqueueing
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - tick


def measure_one(recipe: str, preset: str, overrides: list[str], size: int, batch: int, steps: int,
                sample_n: int, device: str) -> dict:
    """Every figure of one family at one size (run in a fresh child process)."""
    import torch

    from flowkit.bench.harness import prepared
    from flowkit.bench.timing import saved_for_backward
    from flowkit.contracts.model import IndependentTerms
    from flowkit.contracts.transform import use_recompute
    from flowkit.plugins import make_plugins

    threads = torch.get_num_threads()
    with prepared(ROOT / recipe, make_plugins(), preset=preset or None,
                  overrides=[*overrides, f"train.init_batch_size={batch}", f"train.threads={threads}",
                             "train.accumulate=1",
                             "train.level_threads=1", "train.channels_last=false", "train.memory=store"],
                  shape=(3, size, size), batch=batch, device=device) as prep:
        trainer, session = prep.trainer, prep.session
        torch.set_num_threads(threads)
        model, dequantizer = session.model, session.dequantizer
        x = prep.batches[0]
        out: dict = {"size": size, "batch": batch, "threads": threads,
                     "params": sum(p.numel() for m in (model, dequantizer) for p in m.parameters())}
        _train_seconds(trainer, x)  # warm-up: lazy initialisation, first allocations
        seconds = [_train_seconds(trainer, prep.batches[(i + 1) % len(prep.batches)]) for i in range(steps)]
        out["train_ms_per_image"] = 1000 * statistics.median(seconds) / batch
        objective = session.objective
        for mode in ("store", "recompute"):
            use_recompute(model, dequantizer, enabled=mode == "recompute")
            trainer.optimizer.zero_grad(set_to_none=True)
            out[f"saved_bytes_per_image_{mode}"] = saved_for_backward(lambda: objective.loss(x)[0],
                                                                     [model, dequantizer]) / batch
        use_recompute(model, dequantizer, enabled=False)
        trainer.optimizer.zero_grad(set_to_none=True)
        if isinstance(model, IndependentTerms):
            def forward_backward(names: list[str] | None) -> float:
                tick = time.perf_counter()
                loss, _ = objective.loss(x, names)
                loss.backward()
                float(loss)
                return time.perf_counter() - tick

            levels = {}
            for name in [None, *model.part_dims()]:  # the whole model's forward and backward, then each level's
                forward_backward(name and [name])
                ms = 1000 * statistics.median(forward_backward(name and [name]) for _ in range(steps)) / batch
                trainer.optimizer.zero_grad(set_to_none=True)
                if name is None:
                    out["forward_backward_ms_per_image"] = ms
                else:
                    levels[name] = ms
            out["level_ms_per_image"] = levels
        model.eval()
        with torch.no_grad():
            model.sample(1)
            tick = time.perf_counter()
            model.sample(sample_n)
            out["sample_images_per_s"] = sample_n / (time.perf_counter() - tick)
        return out


def run_one(*config: object) -> dict:
    return measure_one(*config)  # type: ignore[arg-type]


def families(spec: Path, names: list[str] | None) -> dict[str, dict]:
    found = tomllib.loads(spec.read_text(encoding="utf-8"))["families"]
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            raise SystemExit(f"{spec} has no famil{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)}; "
                             f"it has {', '.join(found)}.")
        found = {n: found[n] for n in names}
    return found


def table(rows: list[dict]) -> str:
    head = ("| family | size | params | batch | train ms/image | activations/image, store | "
            "activations/image, recompute | sample images/s | forward+backward ms/image: whole | "
            "levels in parallel (slowest level) |")
    out = [head, "|---" * (head.count("|") - 1) + "|"]
    for row in rows:
        cells = [row["family"], f"{row['size']}x{row['size']}"]
        if row.get("status") != "ok":
            out.append("| " + " | ".join(cells + [row.get("status", "?")] + ["-"] * 7) + " |")
            continue
        levels = row.get("level_ms_per_image")
        slowest = max(levels, key=levels.get) if levels else None
        cells += [f"{row['params']:,}", str(row["batch"]), f"{row['train_ms_per_image']:.1f}",
                  f"{row['saved_bytes_per_image_store'] / MIB:.2f} MiB",
                  f"{row['saved_bytes_per_image_recompute'] / MIB:.2f} MiB", f"{row['sample_images_per_s']:.2f}",
                  f"{row['forward_backward_ms_per_image']:.1f}" if levels else "-",
                  f"{levels[slowest]:.1f} ({slowest})" if levels else "-"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    """Three panels against the image side (log-log): training ms per image (and, dashed, the
    slowest level of a model with independent terms, the wall time of its levels as parallel jobs),
    activations per image (dotted: recomputed), sampling images/s. One colour per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    names = list(dict.fromkeys(r["family"] for r in ok))
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    panels = [("train_ms_per_image", "training step, ms per image", 1.0),
              ("saved_bytes_per_image_store", "activations saved for backward, MiB per image", 1 / MIB),
              ("sample_images_per_s", "sampling, images/s", 1.0)]
    for ax, (key, title, scale) in zip(axes, panels, strict=True):
        for name in names:
            mine = [r for r in ok if r["family"] == name]
            sizes = [r["size"] for r in mine]
            ax.plot(sizes, [r[key] * scale for r in mine], marker="o", color=colours[name], label=name)
            if key == "train_ms_per_image" and all("level_ms_per_image" in r for r in mine):
                ax.plot(sizes, [max(r["level_ms_per_image"].values()) for r in mine], marker="s", linestyle="--",
                        color=colours[name], label=f"{name}: levels as parallel jobs (slowest level)")
            if key == "saved_bytes_per_image_store":
                ax.plot(sizes, [r["saved_bytes_per_image_recompute"] * scale for r in mine], marker="x",
                        linestyle=":", color=colours[name], label=f"{name}: train.memory = recompute")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([32, 64, 128, 256], ["32", "64", "128", "256"])
        ax.set_xlabel("image side, pixels")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=SPEC, help="the families (default: resolution_scaling.toml)")
    parser.add_argument("--families", default="", help="comma-separated family names (default: all of the spec)")
    parser.add_argument("--sizes", default="32,64,128,256", help="image sides")
    parser.add_argument("--batch", type=int, default=16, help="images per step at 32x32 (fewer as the image grows)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (median) after one warm-up")
    parser.add_argument("--sample", type=int, default=4, help="images sampled in the timed draw")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per family and size")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    parser.add_argument("--plot", type=Path, default=None, help="also plot the rows to this PNG")
    parser.add_argument("--from-json", type=Path, default=None, help="table and plot from rows written before")
    add_child_options(parser)
    args = parser.parse_args()
    if answer_as_child(args, run_one):
        return
    if args.from_json:
        rows = json.loads(args.from_json.read_text())
    else:
        rows = []
        sizes = [int(s) for s in args.sizes.split(",") if s]
        started = time.perf_counter()
        for name, family in families(args.spec, [n for n in args.families.split(",") if n]).items():
            for size in sizes:
                per_size = family.get("sizes", {})
                if str(size) not in per_size:
                    rows.append({"family": name, "size": size, "status": "not in its scaling (see the spec)"})
                    continue
                config = [family["recipe"], family.get("preset", ""), [*family.get("overrides", []),
                          *per_size[str(size)]], size, batch_for(size, args.batch), args.steps, args.sample,
                          args.device]
                tick = time.perf_counter()
                row = {"family": name, **measure_in_child(__file__, config, args.threads, args.timeout)}
                row.setdefault("size", size)
                row["wall_s"] = time.perf_counter() - tick
                rows.append(row)
                print(table([row]).splitlines()[-1], f"({row['wall_s']:.0f} s)", flush=True)
        print(f"\n{time.perf_counter() - started:.0f} s in all; load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
