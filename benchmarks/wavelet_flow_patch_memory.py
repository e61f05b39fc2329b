"""Memory of one Wavelet Flow training step per level, at 64, 128 and 256 pixels, with and
without patch-wise training of the top levels (``model.crops``).

The model is recipes/wavelet_flow_256.toml's (Haar, Glow steps with affine couplings, a
conditioning net per level), with one depth and one width for every level and as many levels
as take the image down to an 8x8 base (3 at 64, 4 at 128, 5 at 256). "With crops", every level
whose details are wider than ``--patch`` trains on random ``--patch`` x ``--patch`` windows of
them (crops = detail side / patch), as the recipe's two finest levels do at 256; "without",
every level sees its whole details.

Each (resolution, level, crops) is measured in a fresh subprocess: the model is built, a batch
of ``--batch`` random images is made, then one training step of that level alone (its term's
forward, ``backward``) runs. Two figures:

- ``saved``: the bytes autograd keeps for the backward pass (`torch.autograd.graph.saved_tensors_hooks`,
  each storage counted once): the activation memory of the step, exact and independent of the
  allocator and of other processes. It is what grows with the resolution.
- ``peak``: on CPU, the process's peak resident set (``ru_maxrss``) after the step minus the
  resident set just before it, in that fresh process; on CUDA ``torch.cuda.max_memory_allocated``
  over the step minus the memory allocated before it. On CPU it includes the allocator's
  caching and the backward's temporaries (gradients, the conv workspace), and it depends on
  the allocator's reuse, so it is noisier; a ``peak`` below ``saved`` means memory freed and
  reused during the step.

Neither figure counts the model's weights, the optimizer state (both tiny and the same with or
without crops) or the data set.

Usage::

    python benchmarks/wavelet_flow_patch_memory.py                       # CPU, batch 4
    python benchmarks/wavelet_flow_patch_memory.py --device cuda --batch 16
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "wavelet_flow_256.toml"
MIB = 2**20
BASE = 8  # side of the base image at every resolution


def levels_for(resolution: int) -> int:
    return int(math.log2(resolution // BASE))


def crops_for(resolution: int, patch: int) -> list[int]:
    """Per term (base first): how many times each side of its variable is cut to reach ``patch``."""
    levels = levels_for(resolution)
    sides = [BASE] + [resolution // 2 ** (levels - j + 1) for j in range(1, levels + 1)]
    return [max(1, side // patch) for side in sides]


def detail_sides(resolution: int) -> list[int]:
    levels = levels_for(resolution)
    return [BASE] + [resolution // 2 ** (levels - j + 1) for j in range(1, levels + 1)]


def measure_one(resolution: int, term: int, cropped: bool, args: argparse.Namespace) -> dict:
    """One training step of ``term`` (in this process: called in a child)."""
    import resource

    import torch

    from flowkit.api import default_plugins
    from flowkit.build import Builder
    from flowkit.recipes.load import load_recipe

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    crops = crops_for(resolution, args.patch) if cropped else [1]
    plugins = default_plugins()
    recipe = load_recipe(RECIPE, plugins.registries, overrides=[
        f"model.levels={levels_for(resolution)}", f"model.depth=[{args.depth}]",
        f"model.hidden=[{args.hidden}]", f"model.crops={crops}"])
    device = torch.device(args.device)
    model = Builder(plugins.registries)(recipe.model, in_shape=(1, resolution, resolution)).to(device)
    model.train()
    name = list(model.parameter_groups())[term]
    y = torch.rand(args.batch, 1, resolution, resolution, device=device)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _rss_now()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = -model.log_prob_terms(y, [name])[name].mean()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024 - before
    if not math.isfinite(float(loss.detach())):
        raise SystemExit(f"the loss of {name} is {float(loss)}")
    return {"term": name, "saved": sum(storages.values()), "peak": peak}


def _rss_now() -> int:
    """The resident set now (Linux /proc; else the peak so far, an upper bound)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_child(resolution: int, term: int, cropped: bool, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "_one", "--resolution", str(resolution), "--term", str(term),
           "--device", args.device, "--batch", str(args.batch), "--patch", str(args.patch),
           "--depth", str(args.depth), "--hidden", str(args.hidden), "--threads", str(args.threads)]
    if cropped:
        cmd.append("--cropped")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="table", choices=["table", "_one"])
    parser.add_argument("--resolutions", default="64,128,256")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=32,
                        help="side of the training windows of the top levels")
    parser.add_argument("--depth", type=int, default=8, help="steps per level")
    parser.add_argument("--hidden", type=int, default=32, help="coupling-net width of every level")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--term", type=int)
    parser.add_argument("--cropped", action="store_true")
    args = parser.parse_args()
    if args.command == "_one":
        print(json.dumps(measure_one(args.resolution, args.term, args.cropped, args)))
        return
    print(f"Wavelet Flow, one training step of one level: batch {args.batch}, depth {args.depth}, "
          f"width {args.hidden}, patches {args.patch}x{args.patch}, {args.device}, {args.threads} thread(s); "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}.")
    print("MiB; saved = kept for backward (exact); peak = peak RSS (CUDA: allocated) increase over the step.")
    print()
    print("| resolution | level | variable | crops | window | saved, whole | saved, crops | peak, whole "
          "| peak, crops |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    worst: dict[int, dict[str, int]] = {}
    for resolution in [int(r) for r in args.resolutions.split(",")]:
        crops, sides = crops_for(resolution, args.patch), detail_sides(resolution)
        for term, (crop, side) in enumerate(zip(crops, sides, strict=True)):
            whole = run_child(resolution, term, False, args)
            cut = run_child(resolution, term, True, args) if crop > 1 else whole  # crops 1: the same step
            if "error" in whole or "error" in cut:
                print(f"| {resolution} | {term} | error: {whole.get('error') or cut.get('error')} |")
                continue
            channels = 1 if term == 0 else 3
            print(f"| {resolution} | {whole['term']} | {channels}x{side}x{side} | {crop} | {side // crop} | "
                  f"{mib(whole['saved'])} | {mib(cut['saved'])} | {mib(whole['peak'])} | "
                  f"{mib(cut['peak'])}{'' if crop > 1 else ' (same step)'} |", flush=True)
            w = worst.setdefault(resolution, dict.fromkeys(("saved_whole", "saved_crops", "peak_whole",
                                                            "peak_crops"), 0))
            for key, row in (("whole", whole), ("crops", cut)):
                w[f"saved_{key}"] = max(w[f"saved_{key}"], row["saved"])
                w[f"peak_{key}"] = max(w[f"peak_{key}"], row["peak"])
    print()
    print("Largest level per resolution (what one job per level needs at most):")
    print()
    print("| resolution | saved, whole | saved, crops | peak, whole | peak, crops |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for resolution, w in worst.items():
        print(f"| {resolution} | {mib(w['saved_whole'])} | {mib(w['saved_crops'])} | "
              f"{mib(w['peak_whole'])} | {mib(w['peak_crops'])} |")


if __name__ == "__main__":
    main()
