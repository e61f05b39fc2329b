"""Wavelet Flow ablations level by level, and the throughput of training the levels side by side.

Wavelet Flow's terms are independent, so a variant can be judged on one level alone
(`train.level`) in a fraction of a full run. ``ablate`` trains each (variant, level) for a
fixed number of steps in its own single-threaded subprocess, ``--jobs`` at a time (on 2 cores,
two single-threaded runs go as fast as one: the tiny convolutions use threads badly), and
prints each level's test bits/dim over its own dimensions, plus what the variant would give
the whole image (``Σ dims_l · bpd_l / D``) when all levels were run.

``throughput`` times training steps of the full model, in one process, side by side: torch's
intra-op threads on the joint loss (``train.level_threads = 1``) against the levels in
threads (``train.level_threads = 2``), at the same number of cores.

Usage::

    python benchmarks/wavelet_flow_levels.py ablate --steps 800 \\
        --variant "adamax 2e-3=train.optimizer=adamax;train.lr=2e-3" \\
        --variant "wider level 2=model.hidden=[64, 64, 96]"
    python benchmarks/wavelet_flow_levels.py throughput --steps 40
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flowkit.runs.trainer import SilentReporter

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "wavelet_flow_affine.toml"


def train_level(recipe: str, level: int, steps: int, test_images: int, overrides: list[str]) -> dict:
    """One level trained alone for ``steps`` (in this process), then its test bits/dim."""
    from flowkit.api import default_plugins
    from flowkit.recipes.load import load_recipe
    from flowkit.runs.evaluate import evaluate
    from flowkit.runs.rundir import RunDir
    from flowkit.runs.session import build_session
    from flowkit.runs.trainer import Trainer

    plugins = default_plugins()
    budget = [f"train.level={level}", "train.minutes=0", f"train.steps={steps}", "train.threads=1",
              f"data.limit_test={test_images}"]
    recipe_ = load_recipe(recipe, plugins.registries, overrides=budget + overrides)
    session = build_session(recipe_, plugins)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(session, RunDir.create("ablate", Path(tmp) / "run"))
        tick = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - tick
        part = trainer.parts[0]
        result = evaluate(session, session.test_x, batch_size=500, seed=1, parts=[part])
    return {"part": part, "dims": session.model.part_dims()[part], "num_dims": session.num_dims,
            "test_bpd": result[f"bpd/{part}"], "steps": trainer.state.step, "train_s": seconds}


def ablate(args: argparse.Namespace) -> None:
    variants = ([] if args.no_recipe else [("recipe", [])]) + [parse_variant(v) for v in args.variant]
    jobs = [(name, over, level) for name, over in variants for level in args.levels]

    def run(job: tuple[str, list[str], int]) -> dict:
        name, over, level = job
        cmd = [sys.executable, __file__, "_level", "--recipe", args.recipe, "--level", str(level),
               "--steps", str(args.steps), "--test-images", str(args.test_images), *[f"--set={o}" for o in over]]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            return {"variant": name, "level": level, "error": out.stderr.strip().splitlines()[-1:]}
        return {"variant": name, "level": level, **json.loads(out.stdout.strip().splitlines()[-1])}

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run, jobs))
    print(f"{args.steps} steps per level unless a variant sets train.steps; test bits/dim of each "
          f"level's own dims on {args.test_images} test images ({args.recipe}):")
    levels = sorted({r["level"] for r in rows})
    print("| variant | " + " | ".join(f"level {lv}" for lv in levels) + " | whole image | training s |")
    print("|---" * (len(levels) + 3) + "|")
    for name, _ in variants:
        mine = {r["level"]: r for r in rows if r["variant"] == name}
        cells = [f"{mine[lv]['test_bpd']:.3f}" if "test_bpd" in mine[lv] else "failed" for lv in levels]
        ok = [r for r in mine.values() if "test_bpd" in r]
        whole = ""  # only when every level of the model ran
        if ok and len(ok) == len(mine) and sum(r["dims"] for r in ok) == ok[0]["num_dims"]:
            whole = f"{sum(r['dims'] * r['test_bpd'] for r in ok) / ok[0]['num_dims']:.3f}"
        seconds = " + ".join(f"{r['train_s']:.0f}" for r in ok)  # one per level, single-threaded
        print(f"| {name} | " + " | ".join(cells) + f" | {whole} | {seconds} |")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']}, level {r['level']}: {r['error']}", file=sys.stderr)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"name=key=value;key=value"`` → (name, overrides); ``;`` since values may hold commas."""
    name, _, rest = text.partition("=")
    return name, [item.strip() for item in rest.split(";") if item.strip()]


class StepTimes(SilentReporter):
    """A trainer reporter that keeps the seconds of every step."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.seconds: list[float] = []

    def step(self, step: int, metrics: dict[str, float]) -> None:
        self.seconds.append(self.batch_size / metrics["images_per_s"])


def throughput(args: argparse.Namespace) -> None:
    import statistics

    from flowkit.api import default_plugins
    from flowkit.recipes.load import load_recipe
    from flowkit.runs.rundir import RunDir
    from flowkit.runs.session import build_session
    from flowkit.runs.trainer import Trainer

    plugins = default_plugins()
    modes = {"joint loss, intra-op threads": "train.level_threads=1",
             "levels side by side in threads": f"train.level_threads={args.threads}"}
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    # Rounds alternate the modes, so a slow spell of a shared machine hits both.
    for _ in range(args.rounds):
        for mode, over in modes.items():
            recipe = load_recipe(args.recipe, plugins.registries,
                                 overrides=[over, f"train.threads={args.threads}", "train.minutes=0",
                                            f"train.steps={args.steps}", *args.set])
            session = build_session(recipe, plugins)
            reporter = StepTimes(recipe.train.batch_size)
            with tempfile.TemporaryDirectory() as tmp:
                Trainer(session, RunDir.create("throughput", Path(tmp) / "run"), reporter).train()
            times[mode] += reporter.seconds[3:]  # the first steps warm up (and plan the threads)
    batch = recipe.train.batch_size
    print(f"Training steps of the full model at batch {batch} on {args.threads} cores, median over "
          f"{args.rounds} alternating rounds of {args.steps} steps ({args.recipe}):")
    print("| mode | ms/step | images/s |")
    print("|---|---|---|")
    for mode, seconds in times.items():
        median = statistics.median(seconds)
        print(f"| {mode} | {1000 * median:.0f} | {batch / median:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("ablate", help="train each level alone per variant; a table of test bits/dim")
    a.add_argument("--recipe", default=str(RECIPE))
    a.add_argument("--steps", type=int, default=800)
    a.add_argument("--levels", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    a.add_argument("--test-images", type=int, default=2000)
    a.add_argument("--jobs", type=int, default=2, help="single-threaded runs at a time")
    a.add_argument("--variant", action="append", default=[], help='"name=key=value;key=value" (repeatable)')
    a.add_argument("--no-recipe", action="store_true", help="leave out the recipe as it is (the reference row)")
    t = sub.add_parser("throughput", help="joint loss vs levels in threads, ms per training step")
    t.add_argument("--recipe", default=str(RECIPE))
    t.add_argument("--steps", type=int, default=40)
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--set", action="append", default=[])
    one = sub.add_parser("_level")  # internal: one (variant, level) in a child process
    one.add_argument("--recipe", required=True)
    one.add_argument("--level", type=int, required=True)
    one.add_argument("--steps", type=int, required=True)
    one.add_argument("--test-images", type=int, required=True)
    one.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    if args.command == "ablate":
        ablate(args)
    elif args.command == "throughput":
        throughput(args)
    else:
        print(json.dumps(train_level(args.recipe, args.level, args.steps, args.test_images, args.set)))


if __name__ == "__main__":
    main()
