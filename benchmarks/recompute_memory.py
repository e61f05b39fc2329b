"""Memory of one Glow training step, activations stored against rebuilt by the inverse (train.memory).

Glow as in recipes/glow.toml's step (actnorm, LU 1x1 convolution, affine coupling with a
``glow_cnn`` net) in the multi-scale architecture, ``L = 3``, coupling nets ``--hidden`` wide,
swept over the depth ``K`` at one resolution and over the resolution at one depth. Each
configuration and mode (``store``, ``recompute``) runs in a fresh subprocess: build, data-dependent
initialisation, then forward + backward of ``-log p(y)`` (no optimiser step) on a batch.

Figures per configuration:

- ``saved``: bytes autograd saves for backward in one step, counted exactly with
  ``torch.autograd.graph.saved_tensors_hooks`` (each storage once, the parameters' own storages
  left out since they are held anyway). Deterministic; the activation memory the mode is about.
- ``peak``: on CPU, the process's peak resident set (``ru_maxrss``) minus its resident set
  just before the measured step: what the step's activations and temporaries took at their
  peak, allocator slack included; on CUDA, ``max_memory_allocated`` minus the memory allocated
  before the step. Measured once per fresh process, after a one-image warm-up step that loads
  libraries lazily loaded on first use and allocates the gradient buffers (so they are not
  counted; they are the same in both modes); its own peak is far below the measured one.
- ``ms/step``: the fastest forward + backward of each mode over ``--rounds`` rounds that
  alternate the modes on one model in one process (after a warm-up round), and the ratio
  recompute / store. On a shared machine timings are noisy; the memory figures are not.

Usage::

    python benchmarks/recompute_memory.py        # K = 4, 8, 16, 32 at 32x32; 16, 32, 64 at K = 8
    python benchmarks/recompute_memory.py --depths 2,4 --sizes 16 --hidden 16 --batch 4   # a quick look
    python benchmarks/recompute_memory.py --device cuda --batch 64
"""

from __future__ import annotations

import argparse
import json
import time

from _child import add_child_options, answer_as_child, measure_in_child

MIB = 2**20
MODES = ("store", "recompute")


def build(device: str, depth: int, size: int, hidden: int, batch: int):  # noqa: ANN201
    """The Glow and a batch, actnorm initialised on it."""
    import torch

    import flowkit

    torch.manual_seed(0)
    in_shape = (3, size, size)
    step = {"use": "glow", "invconv": "lu",
            "coupling": {"use": "affine", "mask": "channel", "net": {"use": "glow_cnn", "hidden": hidden}}}
    model = flowkit.build("model", "multiscale", in_shape=in_shape, levels=3, depth=depth, step=step)
    model = model.to(device)
    y = torch.rand(batch, *in_shape, device=device)
    model.initialize(y)
    return model, y


def train_step(model, y) -> float:  # noqa: ANN001
    """Seconds of one forward + backward of ``-log p(y)``."""
    import torch

    model.zero_grad(set_to_none=False)  # gradient buffers stay allocated from the first step on
    sync = torch.cuda.synchronize if y.is_cuda else (lambda: None)
    sync()
    tick = time.perf_counter()
    loss = -model.log_prob(y).mean()
    loss.backward()
    sync()
    return time.perf_counter() - tick


def memory(device: str, mode: str, depth: int, size: int, hidden: int, batch: int) -> dict:
    """Saved-for-backward bytes and peak memory of one step in ``mode`` (called in a fresh child)."""
    import resource

    import torch

    from flowkit.bench.timing import saved_for_backward
    from flowkit.contracts.transform import use_recompute

    model, y = build(device, depth, size, hidden, batch)
    use_recompute(model, enabled=mode == "recompute")

    # One image first: libraries and kernels load lazily on their first call, which the
    # measured step should not count (nor the gradient buffers it allocates, alike in both
    # modes); its own peak is far below the measured step's.
    train_step(model, y[:1])
    dev = y.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        with open("/proc/self/statm") as statm:
            before = int(statm.read().split()[1]) * resource.getpagesize()
    model.zero_grad(set_to_none=False)  # as train_step: the gradient buffers stay allocated
    saved = saved_for_backward(lambda: -model.log_prob(y).mean(), [model])  # forward + backward
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"mode": mode, "depth": depth, "size": size, "params": sum(p.numel() for p in model.parameters()),
            "saved_bytes": saved, "peak_bytes": int(peak), "threads": torch.get_num_threads()}


def timing(device: str, depth: int, size: int, hidden: int, batch: int, rounds: int) -> dict:
    """The fastest step of each mode over ``rounds`` alternating rounds, one model, one process."""
    from flowkit.contracts.transform import use_recompute

    model, y = build(device, depth, size, hidden, batch)
    best = {}
    for round_ in range(rounds + 1):  # round 0 warms both modes up
        for mode in MODES:
            use_recompute(model, enabled=mode == "recompute")
            seconds = train_step(model, y)
            if round_:
                best[mode] = min(best.get(mode, seconds), seconds)
    return {f"ms_{mode}": 1000 * seconds for mode, seconds in best.items()}


def run_one(kind: str, *args: object) -> dict:
    return memory(*args) if kind == "memory" else timing(*args)


def measure(config: list, threads: int, timeout: float) -> dict:
    return measure_in_child(__file__, config, threads, timeout)


def table(rows: list[dict]) -> str:
    head = ("| sweep | K | image | params | saved, store | saved, recompute | peak, store | peak, recompute "
            "| ms/step, store | ms/step, recompute | time ratio |")
    out = [head, "|---" * (head.count("|") - 1) + "|"]
    for row in rows:
        s, r, t = row["store"], row["recompute"], row["time"]
        cells = [row["sweep"], str(row["depth"]), f"{row['size']}x{row['size']}",
                 f"{s['params'] / 1e6:.2f}M" if "params" in s else "-"]
        for m in (s, r):
            cells.append(f"{m['saved_bytes'] / MIB:.1f} MiB" if m["status"] == "ok" else m["status"])
        for m in (s, r):
            cells.append(f"{m['peak_bytes'] / MIB:.0f} MiB" if m["status"] == "ok" else "-")
        if t["status"] == "ok":
            ratio = t["ms_recompute"] / t["ms_store"]
            cells += [f"{t['ms_store']:.0f}", f"{t['ms_recompute']:.0f}", f"{ratio:.2f}"]
        else:
            cells += [t["status"], "-", "-"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--depths", default="4,8,16,32", help="K values of the depth sweep (at --size)")
    parser.add_argument("--size", type=int, default=32, help="image side of the depth sweep")
    parser.add_argument("--sizes", default="16,32,64", help="image sides of the resolution sweep, at --depth")
    parser.add_argument("--depth", type=int, default=8, help="K of the resolution sweep")
    parser.add_argument("--hidden", type=int, default=128, help="coupling-net width")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (0: no timing)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    add_child_options(parser)
    args = parser.parse_args()
    if answer_as_child(args, run_one):
        return
    configs = [("depth", int(k), args.size) for k in args.depths.split(",") if k]
    configs += [("resolution", args.depth, int(s)) for s in args.sizes.split(",") if s]
    shape = [args.hidden, args.batch]
    rows, done = [], {}
    for sweep, depth, size in configs:
        if (depth, size) not in done:  # the sweeps share a configuration (K = 8 at 32x32 by default)
            run = {"threads": args.threads, "timeout": args.timeout}
            found = {mode: measure(["memory", args.device, mode, depth, size, *shape], **run)
                     for mode in MODES}
            timed = ["time", args.device, depth, size, *shape, args.rounds]
            found["time"] = measure(timed, **run) if args.rounds else {"status": "not timed"}
            done[depth, size] = found
        rows.append({"sweep": sweep, "depth": depth, "size": size, **done[depth, size]})
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    threads = next((r["store"]["threads"] for r in rows if r["store"]["status"] == "ok"), "?")
    print(f"\nGlow, L = 3, affine coupling, LU 1x1, nets {args.hidden} wide, batch {args.batch}, device "
          f"{args.device}, {threads} torch threads. Memory: one forward + backward per fresh process. "
          f"Time: the fastest of {args.rounds} alternating rounds (store, recompute) in one process.\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)


if __name__ == "__main__":
    main()
